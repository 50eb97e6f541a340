"""One live client per worker id: a second client (session) using a live client's worker id is
refused, changing nothing, instead of having its pushes swallowed as duplicates. On the store
with a fake clock, then through a real ps-server process."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import ps_pb2, rpc
from protos.status import WORKER_ID_IN_USE, reason_of
from ps_server import checkpoint
from ps_server.errors import FailedPrecondition, WorkerIdInUse
from ps_server.sessions import LIVENESS_S
from ps_server.store import ParameterStore, Waiter
from scheduler.launch import servers
from tests import serverkit
from tests.serverkit import refused, status
from tests.storekit import FakeClock, make_job, new_store, push, weights

IN_USE = r"worker id 'worker-0' is already used by another live client \(last seen 0\.4 s ago\)"


def test_a_second_live_client_with_the_same_worker_id_is_refused_and_changes_nothing():
    clock = FakeClock()
    store, job = new_store("async", now=clock)
    for c in (1, 2, 3):
        assert push(store, job, "worker-0", c, 1.0, session="first").applied
    clock.advance(0.4)
    before, values = store.view(), weights(store)
    with pytest.raises(WorkerIdInUse, match=IN_USE + r"; give each process its own worker_id"):
        push(store, job, "worker-0", 1, 1.0, session="second")  # was a silent duplicate
    with pytest.raises(WorkerIdInUse, match=IN_USE):
        store.pull_decision("job", "worker-0", 0, 0, "second")
    with pytest.raises(WorkerIdInUse, match=IN_USE):
        store.pull("job", "worker-0", session="second")
    with pytest.raises(WorkerIdInUse, match=IN_USE):
        store.check_contact("job", "worker-0", "second")
    assert store.view() == before
    assert all(torch.equal(values[k], v) for k, v in weights(store).items())
    version, _, _ = store.pull("job", "worker-0", observe=True, session="second")  # evaluation
    assert version == 3
    # the live client goes on; its retries are duplicates as before
    assert push(store, job, "worker-0", 3, 1.0, session="first").duplicate
    assert push(store, job, "worker-0", 4, 1.0, session="first").applied


def test_a_client_quiet_for_the_liveness_window_is_replaced_by_the_next():
    clock = FakeClock()
    store, job = new_store("async", now=clock)
    for c in (1, 2, 3):
        push(store, job, "worker-0", c, 1.0, session="crashed")
    clock.advance(LIVENESS_S - 0.1)
    with pytest.raises(WorkerIdInUse):
        push(store, job, "worker-0", 1, 1.0, session="restarted")
    clock.advance(0.1)
    # the restarted process (the same rank's id) starts its clock again: applied, not swallowed
    result = push(store, job, "worker-0", 1, 1.0, session="restarted")
    assert result.applied and not result.duplicate and store.version == 4
    with pytest.raises(WorkerIdInUse, match=r"last seen 0\.0 s ago"):
        push(store, job, "worker-0", 4, 1.0, session="crashed")  # the old one, back: refused


def test_a_waiting_pull_keeps_its_client_live():
    clock = FakeClock()
    store, job = new_store("ssp", now=clock, workers=["worker-0", "b"], staleness=0)
    push(store, job, "worker-0", 1, 1.0, session="first")
    assert not store.pull_decision("job", "worker-0", 1, 0, "first").ready
    token = store.add_waiter(Waiter("worker-0", 1, 0, "first"))
    clock.advance(10 * LIVENESS_S)  # waiting for b all this time
    with pytest.raises(WorkerIdInUse, match="it has a pull waiting now"):
        push(store, job, "worker-0", 1, 1.0, session="second")
    ((waiter, decision),) = store.waiting()  # the waiting pull itself is not refused
    assert waiter.session == "first" and decision.waiting_for == ("b",)
    push(store, job, "b", 1, 1.0, session="sb")
    store.remove_waiter(token)
    store.pull("job", "worker-0", session="first")  # served: seen now
    clock.advance(LIVENESS_S - 1)
    with pytest.raises(WorkerIdInUse):
        push(store, job, "worker-0", 2, 1.0, session="second")


def test_a_new_client_of_a_sync_worker_whose_gradient_is_in_the_step_is_dropped_not_refused():
    clock = FakeClock()
    store, job = new_store("sync", now=clock, workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="old")  # then a's process dies
    clock.advance(LIVENESS_S)
    again = push(store, job, "a", 1, 5.0, session="new")  # the same step from its new process
    assert again.dropped and not again.applied and store.view().contributors == ("a",)
    assert push(store, job, "a", 2, 5.0, session="new").dropped  # still not its gradient
    push(store, job, "b", 1, 3.0, session="sb")
    assert store.version == 1


def test_a_new_client_that_pulls_first_then_pushes_the_step_its_old_one_gave_is_dropped():
    """A restarted rank (ps-worker, DistributedOptimizer) pulls before its first push."""
    clock = FakeClock()
    store, job = new_store("sync", now=clock, workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="old")  # then a's process dies
    clock.advance(LIVENESS_S)
    store.pull_decision("job", "a", 0, 0, "new")  # the new process takes the id over
    store.pull("job", "a", session="new")
    again = push(store, job, "a", 1, 5.0, session="new")
    assert again.dropped and store.view().contributors == ("a",)
    push(store, job, "b", 1, 3.0, session="sb")
    assert store.version == 1


def test_the_same_client_giving_a_second_gradient_for_a_sync_step_is_refused():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="s")
    with pytest.raises(FailedPrecondition, match="already pushed a gradient for sync step 0"):
        push(store, job, "a", 2, 5.0, session="s")


def test_sessions_are_not_checkpointed_the_first_seen_after_a_restore_claims_the_id(tmp_path):
    store, job = new_store("async")
    push(store, job, "worker-0", 1, 1.0, session="before")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    copy = ParameterStore()
    checkpoint.restore(copy, checkpoint.read(tmp_path))
    assert push(copy, job, "worker-0", 1, 1.0, session="after").duplicate  # its clock is kept
    assert push(copy, job, "worker-0", 2, 1.0, session="after").applied
    with pytest.raises(WorkerIdInUse):
        push(copy, job, "worker-0", 3, 1.0, session="before")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_readme_trap_two_processes_with_worker_id_worker_0_the_second_is_refused(tmp_path):
    """Two clients both named worker-0 (the README snippet run in two processes): the second's
    push was acknowledged as a duplicate and lost; now it fails with WORKER_ID_IN_USE."""
    job = make_job("async")
    with servers(1, tmp_path) as (server,), grpc.insecure_channel(server.address) as channel:
        calls = rpc.calls(channel)
        assert serverkit.init(calls, job).created
        for clock in (1, 2):
            assert serverkit.push(calls, job, "worker-0", clock, "process-1").applied
        error = refused(lambda: serverkit.push(calls, job, "worker-0", 1, "process-2"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(error) == WORKER_ID_IN_USE
        details = error.details() or ""
        assert "worker id 'worker-0' is already used by another live client" in details
        assert "give each process its own worker_id (e.g. from its rank)" in details
        pull = ps_pb2.PullRequest(job_id="job", worker_id="worker-0", session="process-2")
        error = refused(lambda: list(calls.pull(pull, timeout=10)))
        assert reason_of(error) == WORKER_ID_IN_USE
        after = status(calls)
        assert (after.pushes_received, after.duplicates, after.version) == (2, 0, 2)
        # the first client leaves: the id is free for the second
        calls.leave(ps_pb2.LeaveRequest(job_id="job", worker_id="worker-0", session="process-1"))
        assert serverkit.push(calls, job, "worker-0", 1, "process-2").applied
