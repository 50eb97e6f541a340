"""A scheduler killed and restarted on its state file finishes the job: a lease stays tied
to work in progress, so none is held forever by a live worker that is not working on it.

The trap: a Lease whose write was durable but whose reply died with the scheduler left
the shard leased to a live worker that never knew; its heartbeats kept the lease alive,
it sat idle ("every remaining shard is leased") and the job never finished.
"""

from __future__ import annotations

from pathlib import Path

from protos.jobspec import JobSpec
from scheduler.state import Completion, SchedulerState

SHARDS = 2
SPEC = JobSpec(data_dir="d", epochs=1, lease_timeout_s=10.0)


def finish(state: SchedulerState, worker: str, task, now: float) -> bool:
    c = Completion(task.epoch, task.shard, worker, task.lease_id, 0, 1, [[1]], 10)
    return state.complete(c, now)


def killed_after_a_lost_lease_reply(path: Path) -> tuple[SchedulerState, str, str, object]:
    """Worker a finished one shard; b was leased the last one, but the reply was lost in
    the kill. Returns the state restarted on its file, a, b and b's unseen task."""
    state = SchedulerState(str(path))
    state.create_or_resume(SPEC, SHARDS)
    a, b = state.register("h", "cpu", 0.0), state.register("h", "cpu", 0.0)
    assert finish(state, a, state.lease(a, 1.0, held=()).task, 2.0)
    lost = state.lease(b, 2.0, held=()).task  # durable, but b never hears of it
    state.close()  # SIGKILL
    resumed = SchedulerState(str(path))
    assert not resumed.create_or_resume(SPEC, SHARDS)
    resumed.resume_grace(100.0)
    return resumed, a, b, lost


def test_a_lease_whose_reply_was_lost_goes_back_when_its_worker_asks_for_work(tmp_path):
    state, a, b, lost = killed_after_a_lost_lease_reply(tmp_path / "job.db")
    # b retried its Lease on the new scheduler, working on nothing; a asks too.
    state.heartbeat(b, 0, 0.0, 100.5, lease_ids=())
    decision = state.lease(b, 101.0, held=())
    assert decision.released == 1
    assert (decision.task.epoch, decision.task.shard) == (lost.epoch, lost.shard)
    assert decision.task.lease_id != lost.lease_id
    assert finish(state, b, decision.task, 102.0)
    evaluation = state.lease(a, 103.0, held=())
    assert evaluation.evaluate_epoch == 0 and evaluation.task is None
    assert state.record_evaluation(0, 0.5, 0.5, a, 104.0)
    assert state.finished() and state.lease(b, 105.0, held=()).done
    assert sorted((c.epoch, c.shard) for c in state.completions()) == [(0, 0), (0, 1)]


def test_heartbeats_keep_only_the_leases_their_worker_reports(tmp_path):
    """A live worker that never asks again (its lease unreported) loses the lease when its
    deadline passes; one it reports is kept however long it takes."""
    state, a, b, _ = killed_after_a_lost_lease_reply(tmp_path / "job.db")
    now = 100.0
    while now < 130.0:  # three lease timeouts of heartbeats that report nothing
        now += 3.0
        state.heartbeat(b, 0, 0.0, now, lease_ids=())
        state.heartbeat(a, 0, 0.0, now, lease_ids=())
        assert state.expire(now) == []  # both live
    p = state.progress(now)
    assert (p.leased, p.pending) == (0, 1) and state.expired_leases() == 1
    kept = state.lease(a, now, held=()).task
    for _ in range(10):
        now += 3.0
        state.heartbeat(a, 0, 0.0, now, lease_ids=[kept.lease_id])
        state.expire(now)
    assert state.progress(now).leased == 1
    assert finish(state, a, kept, now)
