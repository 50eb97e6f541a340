"""The scheduler's state machine, driven directly with an explicit clock."""

import pytest

from protos.jobspec import JobSpec, SpecError
from scheduler.state import Completion, OtherJob, SchedulerState, StateError, UnknownWorker

SHARDS = 4


def new_state(path=":memory:", **kw):
    state = SchedulerState(str(path))
    spec = JobSpec(data_dir="d", epochs=2, lease_timeout_s=10.0, **kw)
    state.create_or_resume(spec, SHARDS)
    return state


def finish(state, worker, task, now, clocks=(0, 5)):
    return state.complete(
        Completion(task.epoch, task.shard, worker, task.lease_id, *clocks, [[1, 1]], 100), now
    )


def test_epochs_in_order_with_shuffled_shards():
    state = new_state(seed=3)
    w = state.register("h", "cpu", 0.0)
    seen = []
    for _ in range(2 * SHARDS):
        decision = state.lease(w, 1.0)
        seen.append((decision.task.epoch, decision.task.shard))
        finish(state, w, decision.task, 2.0)
    assert [e for e, _ in seen] == [0] * SHARDS + [1] * SHARDS
    assert sorted(s for e, s in seen if e == 0) == list(range(SHARDS))
    again = new_state(seed=3)
    assert [
        r[1] for r in again.db.execute("SELECT epoch, shard FROM tasks ORDER BY epoch, position")
    ] == [s for _, s in seen]


def test_completion_is_recorded_once():
    state = new_state()
    w = state.register("h", "cpu", 0.0)
    task = state.lease(w, 1.0).task
    assert finish(state, w, task, 2.0)
    assert not finish(state, w, task, 3.0)
    assert len(state.completions()) == 1


def test_heartbeats_extend_leases_until_they_stop():
    state = new_state()
    a = state.register("h", "cpu", 0.0)
    b = state.register("h", "cpu", 0.0)
    state.lease(a, 1.0)
    state.heartbeat(a, 0, 0.0, 5.0)  # a's lease now runs to 15
    state.heartbeat(b, 0, 0.0, 9.0)
    assert state.expire(12.0) == [] and state.progress(12.0).leased == 1
    assert state.expired_leases() == 0
    assert state.expire(16.0) == [a]
    assert state.expired_leases() == 1
    assert state.active_workers() == [b]
    assert state.progress(16.0).leased == 0 and state.progress(16.0).pending == 2 * SHARDS


def test_dead_worker_releases_its_lease_to_another():
    state = new_state()
    a = state.register("h", "cpu", 0.0)
    b = state.register("h", "cpu", 0.0)
    task = state.lease(a, 1.0).task
    state.heartbeat(b, 0, 0.0, 12.0)
    assert state.expire(12.0) == [a]
    assert state.active_workers() == [b] and state.expired_leases() == 1
    with pytest.raises(StateError, match="is dead"):
        state.lease(a, 12.5)
    retry = state.lease(b, 13.0).task
    assert (retry.epoch, retry.shard) == (task.epoch, task.shard)
    assert finish(state, b, retry, 14.0)
    with pytest.raises(StateError, match="already done, under another lease"):
        finish(state, a, task, 15.0)  # the dead worker's late report: its lease was requeued


def test_idle_workers_leave_the_membership_and_come_back():
    state = SchedulerState(":memory:")
    state.create_or_resume(JobSpec(data_dir="d", epochs=1), 1)
    a = state.register("h", "cpu", 0.0)
    b = state.register("h", "cpu", 0.0)
    task = state.lease(a, 1.0).task
    decision = state.lease(b, 1.0)
    assert decision.task is None and "leased" in decision.reason
    assert state.active_workers() == [a]
    state.heartbeat(b, 0, 0.0, 20.0)
    state.expire(20.0)  # a died: its shard is pending again
    assert state.lease(b, 20.0).task.shard == task.shard
    assert state.active_workers() == [b]


def test_membership_gate_and_expected_workers():
    state = SchedulerState(":memory:")
    state.create_or_resume(JobSpec(data_dir="d", epochs=1, expected_workers=2), 2)
    a = state.register("h", "cpu", 0.0)
    assert "1 of 2 registered" in state.lease(a, 0.0).reason
    b = state.register("h", "cpu", 0.0)
    waiting = state.lease(a, 0.0, members=frozenset({b}))
    assert waiting.awaiting_membership and "servers to count" in waiting.reason
    assert state.lease(a, 0.0, members=frozenset({a, b})).task is not None


def test_evaluation_after_each_epoch_and_finish():
    state = new_state()
    w = state.register("h", "cpu", 0.0)
    for _ in range(SHARDS):
        finish(state, w, state.lease(w, 1.0).task, 1.0)
    decision = state.lease(w, 2.0)
    assert decision.evaluate_epoch == 0 and decision.task.epoch == 1
    state.record_evaluation(0, 0.5, 0.8, w, 3.0)
    for _ in range(SHARDS - 1):
        finish(state, w, state.lease(w, 4.0).task, 4.0)
    finish(state, w, decision.task, 4.0)
    last = state.lease(w, 5.0)
    assert last.evaluate_epoch == 1 and not last.done and last.task is None
    state.record_evaluation(1, 0.3, 0.9, w, 6.0)
    assert state.lease(w, 7.0).done and state.finished()
    progress = state.progress(8.0)
    assert progress.completions_per_epoch == [SHARDS, SHARDS]
    assert [e["accuracy"] for e in progress.evaluations] == [0.8, 0.9]


def test_restart_on_the_same_file_continues(tmp_path):
    path = tmp_path / "state.db"
    state = new_state(path)
    w = state.register("h", "cpu", 0.0)
    done = []
    for _ in range(3):
        task = state.lease(w, 1.0).task
        finish(state, w, task, 1.0)
        done.append((task.epoch, task.shard))
    leased = state.lease(w, 1.0).task
    state.close()
    resumed = SchedulerState(str(path))
    assert not resumed.create_or_resume(
        JobSpec(data_dir="d", epochs=2, lease_timeout_s=10.0), SHARDS
    )
    resumed.resume_grace(100.0)
    assert resumed.expire(105.0) == []  # the grace period holds
    handed = []
    for _ in range(2 * SHARDS - 4):
        task = resumed.lease(w, 106.0).task
        handed.append((task.epoch, task.shard))
        finish(resumed, w, task, 106.0)
    assert not set(handed) & set(done)
    assert (leased.epoch, leased.shard) not in handed  # still leased to w
    with pytest.raises(
        OtherJob, match=r"another job 'job': it differs in data_dir \(d, now other\)"
    ):
        resumed.create_or_resume(JobSpec(data_dir="other", epochs=2, lease_timeout_s=10.0), SHARDS)


def test_a_state_file_of_another_job_names_what_differs_and_can_be_discarded(tmp_path):
    state = new_state(tmp_path / "job.db", servers=("127.0.0.1:7001", "127.0.0.1:7002"))
    w = state.register("h", "cpu", 0.0)
    finish(state, w, state.lease(w, 1.0).task, 2.0)
    other = JobSpec(data_dir="d", epochs=3, lease_timeout_s=10.0, servers=("127.0.0.1:9",))
    with pytest.raises(OtherJob) as info:
        state.create_or_resume(other, SHARDS)
    assert str(info.value) == (
        "the state file holds another job 'job': it differs in epochs (2, now 3); "
        "servers (127.0.0.1:7001, 127.0.0.1:7002, now 127.0.0.1:9)"
    )
    assert state.discard()
    assert state.create_or_resume(other, SHARDS)  # a new job, from its start
    assert state.completions() == [] and state.registered_count() == 0
    assert state.progress(3.0).epochs == 3 and state.progress(3.0).done == 0
    assert not SchedulerState(":memory:").discard()  # nothing to discard


def test_unknown_worker_and_bad_input():
    state = new_state()
    with pytest.raises(UnknownWorker):
        state.lease("ghost", 0.0)
    w = state.register("h", "cpu", 0.0)
    with pytest.raises(StateError, match="no task"):
        state.complete(Completion(9, 0, w, "x", 0, 0, [], 0), 0.0)
    with pytest.raises(StateError, match="accuracy"):
        state.record_evaluation(0, 0.1, 1.5, w, 0.0)
    with pytest.raises(SpecError, match="unknown job field"):
        JobSpec.from_dict({"data_dir": "d", "epoch": 3})
