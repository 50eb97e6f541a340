"""What a store holds and says stays bounded, whatever clients send."""

from __future__ import annotations

import pytest

from ps_server.errors import ResourceExhausted
from ps_server.records import Waiter
from ps_server.store import WAITING_LISTED
from ps_server.workers import MAX_WORKERS, NAMED
from tests.storekit import new_store, push


def test_workers_beyond_the_limit_are_refused_and_change_nothing():
    store, job = new_store("sync", workers=["w0"])
    members = [f"w{i}" for i in range(MAX_WORKERS)]
    store.set_membership("job", members)
    before = store.view()
    with pytest.raises(ResourceExhausted, match=f"limit of {MAX_WORKERS}"):
        store.set_membership("job", [*members, "one-more"])
    with pytest.raises(ResourceExhausted):
        push(store, job, "one-more", 1, 0.1, session="s")
    with pytest.raises(ResourceExhausted):
        store.pull("job", "one-more", session="s")
    assert store.view() == before
    store.pull("job", "w5", session="s5")  # a member still takes part


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_a_waiting_pulls_reason_names_a_few_workers_and_status_lists_a_bounded_few(mode):
    workers = [f"worker-{i:05d}" for i in range(WAITING_LISTED + 50)]
    store, job = new_store(mode, workers=workers, staleness=0)
    push(store, job, workers[0], 1, 0.1, session="s0")
    for i, w in enumerate(workers):
        for _ in range(3):  # several pulls per worker wait (one client may open many)
            store.add_waiter(Waiter(w, 1, 1, f"s{i}"))
    waiting = store.waiting()
    assert 0 < len(waiting) <= WAITING_LISTED
    assert len({w.worker_id for w, _ in waiting}) == len(waiting)  # one per worker
    for _, decision in waiting:
        assert len(decision.waiting_for) <= NAMED
        assert decision.reason.count("worker-") <= NAMED
        assert f"and {len(workers) - 1 - NAMED} more" in decision.reason
