"""Worker clocks across a server restart, and claims a client cannot poison them with."""

from __future__ import annotations

import pytest

from ps_server import checkpoint
from ps_server.clocks import MAX_CLOCK_LEAD
from ps_server.errors import InvalidArgument
from ps_server.store import ParameterStore
from tests.storekit import new_store, push


def clocks(store: ParameterStore) -> dict[str, int]:
    return {w.worker_id: w.clock for w in store.view().workers}


def restarted(store: ParameterStore, tmp_path) -> ParameterStore:
    """The store a server restarted on the checkpoint ``store`` wrote comes back with."""
    fresh = ParameterStore()
    checkpoint.restore(fresh, checkpoint.read(tmp_path))
    return fresh


@pytest.mark.parametrize("mode", ["ssp", "async", "sync"])
def test_a_restored_server_takes_the_live_workers_clocks_and_no_pull_waits_forever(tmp_path, mode):
    """The ssp job of a SIGKILLed server: its checkpoint's clocks (3) are behind the live
    workers' (6); their pushes, computed on weights it lost, are dropped, but must move the
    clocks, or every pull waits for clocks no one will push again."""
    store, job = new_store(mode, workers=["a", "b"], staleness=1)
    for clock in range(1, 4):
        for w in "ab":
            push(store, job, w, clock, 0.1, session=f"s{w}")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    for clock in range(4, 7):  # lost with the server
        for w in "ab":
            push(store, job, w, clock, 0.1, session=f"s{w}")
    lost_version = store.version
    copy = restarted(store, tmp_path)
    assert clocks(copy) == {"a": 3, "b": 3}

    assert push(copy, job, "a", 7, 0.1, pulled=lost_version, session="sa").dropped
    assert clocks(copy)["a"] == 7
    if mode == "ssp":  # b is at 6 really, at 3 here: a waits for b's next push, not forever
        assert not copy.pull_decision("job", "a", 7, 0, "sa").ready
    assert push(copy, job, "b", 7, 0.1, pulled=lost_version, session="sb").dropped
    assert clocks(copy) == {"a": 7, "b": 7}
    for w in "ab":
        assert copy.pull_decision("job", w, 7, lost_version + 1, f"s{w}").ready
        version, clock, _ = copy.pull("job", w, session=f"s{w}", clock=7)
        assert clock == 7 and version == copy.version
    for w in "ab":  # training goes on from the restored weights
        assert push(copy, job, w, 8, 0.1, session=f"s{w}").applied
    assert copy.view().counters.stale_dropped == 2


def test_a_pull_that_joins_a_restored_server_starts_at_its_own_clock(tmp_path):
    store, _ = new_store("ssp", workers=["a", "b"], staleness=1)
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    copy = restarted(store, tmp_path)
    _, clock, _ = copy.pull("job", "a", session="sa", clock=40)  # its first contact
    assert clock == 40 and clocks(copy) == {"a": 40, "b": 0}
    _, clock, _ = copy.pull("job", "c", session="sc", clock=0)  # a newcomer: the slowest's
    assert clock == 0


def test_a_clock_beyond_what_the_job_can_reach_is_refused_and_changes_nothing():
    store, job = new_store("ssp", workers=["a"], staleness=1)
    push(store, job, "a", 1, 0.1, session="sa")
    before = store.view()
    for worker, session in (("a", "sa"), ("newcomer", "sn")):
        for clock in (2**63, 2**64 - 1, 1 + MAX_CLOCK_LEAD + 1):
            with pytest.raises(InvalidArgument, match="ahead of the fastest clock"):
                push(store, job, worker, clock, 0.1, session=session)
            with pytest.raises(InvalidArgument, match="ahead of the fastest clock"):
                store.pull("job", f"{worker}-puller", session=f"{session}-pull", clock=clock)
    assert store.view() == before
    assert push(store, job, "newcomer", 1 + MAX_CLOCK_LEAD, 0.1, session="sn").applied
    assert clocks(store) == {"a": 1, "newcomer": 1 + MAX_CLOCK_LEAD}
    assert push(store, job, "a", 2, 0.1, session="sa").applied  # the others are unharmed
