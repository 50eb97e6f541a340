"""Local SGD on the store against a plain-torch reference of the same rule (issue 16).

Every mode's update is ``settings.server_optimizer`` at ``settings.server_lr(steps)``: in
the local modes the outer SGD step on the workers' changes, whatever the job's optimizer
(Adam here, so that running the job's optimizer on the server would show).
"""

import pytest
import torch

from protos.optimizers import Adam
from protos.schedule import LrSchedule
from tests.storekit import chunks_for, initial_values, new_store, weights

pytestmark = pytest.mark.timeout(60)


def local_weights(seed: int, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A worker's weights after its local steps: ``start`` moved by a random amount."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: v + torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
        for n, v in start.items()
    }


def push_delta(store, job, worker, clock, pulled_weights, local, pulled_version):
    """Push ``delta = w_pulled - w_local`` as the worker's gradient."""
    delta = {n: pulled_weights[n] - local[n] for n in local}
    return store.push("job", worker, clock, pulled_version, chunks_for(job, delta))


def pull(store, worker, clock=0):
    assert store.pull_decision("job", worker, clock, 0).ready
    store.pull("job", worker, clock=clock)
    return store.version, weights(store)


def close(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)


def test_local_with_outer_lr_1_averages_the_workers_weights():
    workers = ("a", "b", "c")
    store, job = new_store("local", workers=workers, optimizer=Adam(), lr=0.01)
    w = weights(store)
    for rnd in range(1, 4):
        local = {x: local_weights(10 * rnd + i, w) for i, x in enumerate(workers)}
        for x in workers:
            result = push_delta(store, job, x, rnd, w, local[x], rnd - 1)
            assert result.applied and result.lr == 1.0
        assert store.version == rnd  # one update per round, at the barrier
        mean = {n: sum(local[x][n] for x in workers) / len(workers) for n in w}
        w = weights(store)
        close(w, mean)


def test_local_outer_nesterov_matches_torch_sgd_on_the_mean_delta():
    workers = ("a", "b")
    store, job = new_store(
        "local", workers=workers, optimizer=Adam(), lr=0.01, outer_lr=0.7, outer_momentum=0.9
    )
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values().items()}
    opt = torch.optim.SGD(ref.values(), lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    w = weights(store)
    for rnd in range(1, 6):
        local = {x: local_weights(7 * rnd + i, w) for i, x in enumerate(workers)}
        for x in workers:
            assert push_delta(store, job, x, rnd, w, local[x], rnd - 1).lr == 0.7
        for n, p in ref.items():
            p.grad = sum(w[n] - local[x][n] for x in workers) / len(workers)
        opt.step()
        w = weights(store)
        close(w, {n: p.detach() for n, p in ref.items()})


@pytest.mark.parametrize("aware", [False, True])
def test_local_async_applies_each_delta_at_once_with_staleness_aware_outer_lr(aware):
    store, job = new_store(
        "local-async", optimizer=Adam(), lr=0.01, outer_lr=0.5, staleness_aware_lr=aware
    )
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values().items()}
    opt = torch.optim.SGD(ref.values(), lr=0.5, foreach=False)
    pulled = {x: pull(store, x) for x in ("a", "b", "c")}  # all at version 0
    clocks = {"a": 0, "b": 0, "c": 0}
    for i, x in enumerate(["a", "b", "c", "a", "b", "c", "c"]):
        version, w = pulled[x]
        local = local_weights(i, w)
        clocks[x] += 1
        staleness = store.version - version
        result = push_delta(store, job, x, clocks[x], w, local, version)
        lr = 0.5 / max(1, staleness) if aware else 0.5
        assert result.applied and result.staleness == staleness and result.lr == lr
        for n, p in ref.items():
            p.grad = w[n] - local[n]
        opt.param_groups[0]["lr"] = lr
        opt.step()
        close(weights(store), {n: p.detach() for n, p in ref.items()})
        pulled[x] = pull(store, x, clocks[x])
    assert store.version == 7


def test_warm_up_ramps_the_async_lr_but_not_the_outer_lr():
    store, job = new_store("async", lr=0.8, lr_schedule=LrSchedule(warmup_steps=4))
    lrs = [
        store.push("job", "a", c, store.version, chunks_for(job, initial_values())).lr
        for c in range(1, 7)
    ]
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    store, job = new_store(
        "local-async", lr=0.8, outer_lr=0.5, lr_schedule=LrSchedule(warmup_steps=4)
    )
    lrs = [
        store.push("job", "a", c, store.version, chunks_for(job, initial_values())).lr
        for c in range(1, 4)
    ]
    assert lrs == [0.5, 0.5, 0.5]  # warm-up schedules the workers' own lr (worker_lr)


def test_a_local_pull_waits_at_the_barrier_as_a_sync_pull_does():
    store, job = new_store("local", workers=("a", "b"), optimizer=Adam(), lr=0.01)
    w = weights(store)
    push_delta(store, job, "a", 1, w, local_weights(1, w), 0)
    decision = store.pull_decision("job", "a", 1, 1)
    assert not decision.ready and decision.waiting_for == ("b",)
    assert decision.reason.startswith("local step 0: have 1 of 2")
    stale = push_delta(store, job, "b", 1, w, local_weights(2, w), 0)
    assert stale.applied and store.pull_decision("job", "a", 1, 1).ready
    late = push_delta(store, job, "b", 2, w, local_weights(3, w), 0)  # on step 0's weights
    assert late.dropped and store.view().counters.stale_dropped == 1
    store, job = new_store("local-async", workers=("a", "b"), optimizer=Adam(), lr=0.01)
    assert push_delta(store, job, "a", 1, w, local_weights(1, w), 0).version == 1
    assert store.pull_decision("job", "a", 1, 2).ready  # no barrier: never waits
