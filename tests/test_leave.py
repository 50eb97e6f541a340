"""Leave: a client that is done stops counting for the sync barrier and the ssp bound at once;
driven on the store directly, then through a real ps-server process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import ps_pb2, rpc
from protos.codec import decode_frame
from ps_server import checkpoint
from ps_server.errors import FailedPrecondition, InvalidArgument, NotFound, WorkerIdInUse
from ps_server.sessions import LIVENESS_S
from ps_server.store import ParameterStore
from scheduler.launch import servers
from tests import serverkit
from tests.serverkit import status, wait_until
from tests.storekit import FakeClock, initial_values, make_job, new_store, push, weights

# ------------------------------------------------------------------ the store


def test_a_leaving_sync_worker_completes_the_step_its_absence_completes():
    store, job = new_store("sync", workers=["a", "b", "c"])
    push(store, job, "a", 1, 1.0, session="sa")
    push(store, job, "b", 1, 3.0, session="sb")
    assert store.version == 0 and not store.pull_decision("job", "a", 1, 1, "sa").ready
    assert store.leave("job", "c", "sc") == ["a", "b"]
    assert store.version == 1  # the mean of a's and b's gradients, applied now
    assert store.pull_decision("job", "a", 1, 1, "sa").ready
    for name, value in initial_values().items():
        assert weights(store)[name].sub(value - 2.0).abs().max() < 1e-6
    assert store.required_workers() == 2


def test_a_worker_that_leaves_after_pushing_does_not_complete_the_step_alone():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="sa")
    assert store.leave("job", "a", "sa") == ["b"]
    assert store.version == 0  # b's gradient is still to come
    decision = store.pull_decision("job", "b", 0, 1, "sb")
    assert not decision.ready and decision.waiting_for == ("b",)
    assert "have 0 of 1" in decision.reason
    result = push(store, job, "b", 1, 3.0, session="sb")
    assert result.applied and not result.dropped and result.staleness == 0
    assert store.version == 1 and store.view().counters.stale_dropped == 0
    for name, value in initial_values().items():  # the mean of a's and b's: a's stayed in
        assert weights(store)[name].sub(value - 2.0).abs().max() < 1e-6


def test_the_last_worker_to_leave_applies_the_gradients_in():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="sa")
    store.leave("job", "a", "sa")
    store.leave("job", "b", "sb")
    assert store.version == 1
    for name, value in initial_values().items():
        assert weights(store)[name].sub(value - 1.0).abs().max() < 1e-6


def test_a_leaving_ssp_worker_releases_the_bound():
    store, job = new_store("ssp", workers=["a", "b"], staleness=0)
    push(store, job, "a", 1, 1.0, session="sa")
    decision = store.pull_decision("job", "a", 1, 0, "sa")
    assert not decision.ready and decision.waiting_for == ("b",)
    store.leave("job", "b", "sb")
    assert store.pull_decision("job", "a", 1, 0, "sa").ready


def test_leaving_twice_or_as_a_worker_never_seen_is_harmless():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="sa")
    before = store.view()
    assert store.leave("job", "ghost", "sg") == ["a", "b"]
    assert store.view() == before
    assert store.leave("job", "b", "sb") == ["a"]
    after = store.view()
    assert store.leave("job", "b", "sb") == ["a"]  # again: nothing changes
    assert store.view() == after
    assert [(w.worker_id, w.active, w.left) for w in after.workers] == [
        ("a", True, False),
        ("b", False, True),
    ]


def test_a_bad_leave_is_refused_and_changes_nothing():
    clock = FakeClock()
    store, job = new_store("sync", now=clock, workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="sa")
    before = store.view()
    with pytest.raises(InvalidArgument, match="worker_id is empty"):
        store.leave("job", "", "sa")
    with pytest.raises(NotFound, match="unknown job 'other'"):
        store.leave("other", "a", "sa")
    with pytest.raises(WorkerIdInUse, match="'a' is already used by another live client"):
        store.leave("job", "a", "not-a")  # another live client's worker id: not ended
    assert store.view() == before
    clock.advance(LIVENESS_S)  # a's client went quiet: its id may be ended by another
    assert store.leave("job", "a", "not-a") == ["b"]
    with pytest.raises(FailedPrecondition, match="not initialised"):
        ParameterStore().leave("job", "a", "sa")


def test_a_new_client_rejoins_a_worker_that_left_and_the_old_one_stays_out():
    store, job = new_store("async", workers=["a", "b"])
    for clock in (1, 2, 3):
        push(store, job, "a", clock, 1.0, session="old")
    store.leave("job", "a", "old")
    with pytest.raises(FailedPrecondition, match="this client left the job"):
        push(store, job, "a", 4, 1.0, session="old")
    with pytest.raises(FailedPrecondition, match="this client left the job"):
        store.pull("job", "a", session="old")
    # a new process with the same rank's id: its clock starts again, nothing is a duplicate
    result = push(store, job, "a", 1, 1.0, session="new")
    assert result.applied and not result.duplicate
    assert store.active_workers() == ["a", "b"]
    assert push(store, job, "a", 1, 1.0, session="new").duplicate  # its own retry still is


def test_a_left_worker_pulls_back_in_at_the_slowest_clock():
    store, job = new_store("ssp", workers=["a", "b"], staleness=1)
    for clock in (1, 2):
        push(store, job, "a", clock, 0.0, session="sa")
        push(store, job, "b", clock, 0.0, session="sb")
    push(store, job, "a", 3, 0.0, session="sa")
    store.leave("job", "b", "sb")
    _, clock, _ = store.pull("job", "b", session="sb2")
    assert clock == 3 and store.active_workers() == ["a", "b"]


def test_removed_by_membership_is_not_left_and_stays_refused():
    store, job = new_store("sync", workers=["a", "b"])
    store.leave("job", "b", "sb")
    store.set_membership("job", ["a"])  # the scheduler's word: b is out until it says so
    with pytest.raises(FailedPrecondition, match="'b' has left the job"):
        push(store, job, "b", 1, 1.0, session="sb2")
    store.set_membership("job", ["a", "b"])
    assert push(store, job, "b", 1, 1.0, session="sb2").applied


def test_a_left_worker_is_left_after_a_checkpoint(tmp_path):
    store, job = new_store("sync", workers=["a", "b"])
    store.leave("job", "b", "sb")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    copy = ParameterStore()
    checkpoint.restore(copy, checkpoint.read(tmp_path))
    assert copy.view().workers == store.view().workers
    assert copy.active_workers() == ["a"]
    assert push(copy, job, "b", 1, 1.0, session="sb2").applied  # it may come back


# ------------------------------------------------------------ a real server


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_leaving_worker_releases_the_other_workers_waiting_sync_pull(tmp_path):
    job = make_job("sync", workers=["a", "b"])
    with (
        servers(1, tmp_path) as (server,),
        grpc.insecure_channel(server.address) as channel,
        ThreadPoolExecutor(1) as pool,
    ):
        calls = rpc.calls(channel)
        assert serverkit.init(calls, job).created
        assert serverkit.push(calls, job, "a", 1, "sa").applied
        request = ps_pb2.PullRequest(
            job_id="job", worker_id="a", clock=1, min_version=1, session="sa"
        )
        pulled = pool.submit(lambda: list(calls.pull(request, timeout=50)))
        wait_until(lambda: status(calls).waiting or pulled.done(), "a's pull to wait for b")
        (waiter,) = status(calls).waiting
        assert waiter.worker_id == "a" and list(waiter.waiting_for) == ["b"]
        left = calls.leave(ps_pb2.LeaveRequest(job_id="job", worker_id="b", session="sb"))
        assert list(left.active_workers) == ["a"]
        reply = pulled.result(timeout=20)  # released by the leave, not by a timeout
        assert ps_pb2.PullHeader.FromString(bytes(decode_frame(reply[0]).header)).version == 1
        after = status(calls)
        assert after.version == 1 and not after.waiting
        assert [(w.worker_id, w.active) for w in after.workers] == [("a", True), ("b", False)]
