"""Buffer K (n-softsync) on the store against a plain-torch reference of the same rule.

Several workers pull and push in a chosen interleaving; the reference is torch.optim
stepping on the mean of every K gradients, at lr / max(1, their mean staleness) when
the lr is staleness-aware. A pending buffer is invisible to pulls, survives a
checkpoint, and is applied when no worker is left active.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
import torch

from protos import rpc
from protos.optimizers import SGD, Adam
from ps_server import checkpoint
from ps_server.errors import InvalidArgument
from ps_server.store import ParameterStore
from scheduler.launch import servers
from tests import serverkit
from tests.storekit import chunks_for, initial_values, make_job, new_store, weights

pytestmark = pytest.mark.timeout(60)

# who pulls and who pushes, in order: three workers at staleness 0 to 4
EVENTS = "pa pb pc Pa Pb Pa pa Pc Pb pb Pa pa Pc Pb Pa pc pa Pc Pa Pb Pc pc Pc Pa Pb"
LR = 0.05


def random_grad(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
        for n, v in initial_values().items()
    }


class Reference:
    """The buffer rule in plain torch: the mean of every ``k`` gradients is one step of a
    torch optimizer at lr / max(1, their mean staleness) when ``aware``."""

    def __init__(self, k: int, aware: bool, optimizer: type, **options) -> None:
        self.params = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values().items()}
        self.opt = optimizer(self.params.values(), lr=LR, foreach=False, **options)
        self.k, self.aware = k, aware
        self.pending: list[tuple[dict[str, torch.Tensor], int]] = []
        self.version = 0

    def push(self, grad: dict[str, torch.Tensor], staleness: int) -> float | None:
        """Take one gradient; the lr of the update it completes (None: still pending)."""
        self.pending.append((grad, staleness))
        return self.flush() if len(self.pending) == self.k else None

    def flush(self) -> float:
        mean_staleness = sum(s for _, s in self.pending) / len(self.pending)
        lr = LR / max(1, mean_staleness) if self.aware else LR
        for n, p in self.params.items():
            p.grad = sum(g[n] for g, _ in self.pending) / len(self.pending)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()
        self.pending = []
        self.version += 1
        return lr

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)


class Driver:
    """Plays EVENTS on a store: ``p<w>`` pulls (and remembers the version), ``P<w>`` pushes
    a fresh random gradient computed on the weights last pulled."""

    def __init__(self, store: ParameterStore, job) -> None:
        self.store, self.job = store, job
        self.pulled: dict[str, int] = {}
        self.clock: dict[str, int] = {}
        self.pushes = 0

    def pull(self, worker: str) -> None:
        clock = self.clock.get(worker, 0)
        assert self.store.pull_decision("job", worker, clock, 0).ready
        self.pulled[worker], self.clock[worker], _ = self.store.pull("job", worker, clock=clock)

    def push(self, worker: str):
        self.clock[worker] = self.clock.get(worker, 0) + 1
        self.pushes += 1
        grad = random_grad(self.pushes)
        pulled, before = self.pulled[worker], self.store.version
        result = self.store.push(
            "job", worker, self.clock[worker], pulled, chunks_for(self.job, grad)
        )
        assert result.applied and result.staleness == before - pulled
        return grad, result


def play(store, job, ref: Reference, events: str = EVENTS) -> Driver:
    """Play ``events`` on the store and the reference, comparing after every push."""
    driver = Driver(store, job)
    for event in events.split():
        kind, worker = event[0], event[1:]
        if kind == "p":
            driver.pull(worker)
            continue
        before = store.version
        grad, result = driver.push(worker)
        lr = ref.push(grad, result.staleness)
        assert store.version == ref.version
        if lr is None:  # still pending: invisible to pulls
            assert store.version == before and store.view().buffered == len(ref.pending)
        else:
            assert result.lr == pytest.approx(lr, rel=1e-15) and result.version == before + 1
        close(weights(store), ref.weights())
    return driver


CASES = [
    (SGD(momentum=0.9), torch.optim.SGD, {"momentum": 0.9}),
    (Adam(), torch.optim.Adam, {}),
]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("aware", [False, True], ids=["plain-lr", "staleness-aware"])
@pytest.mark.parametrize(("ours", "theirs", "options"), CASES, ids=["sgd", "adam"])
def test_buffer_matches_the_reference(k, aware, ours, theirs, options):
    store, job = new_store("async", optimizer=ours, lr=LR, buffer=k, staleness_aware_lr=aware)
    ref = Reference(k, aware, theirs, **options)
    play(store, job, ref)
    pushes = EVENTS.count("P")
    assert store.view().counters.updates_applied == pushes // k
    assert store.view().contributions == pushes % k


def test_buffer_in_local_async_averages_k_deltas_with_the_outer_lr():
    store, job = new_store(
        "local-async", optimizer=Adam(), lr=0.01, outer_lr=LR, buffer=2, staleness_aware_lr=True
    )
    play(store, job, Reference(2, True, torch.optim.SGD))


def test_buffer_1_is_todays_async_bit_for_bit():
    """K = 1 applies each gradient at once, exactly as async always did: the job's
    optimizer stepped on the gradient (here per tensor, by hand) at lr / max(1, staleness)."""
    optimizer = Adam()
    store, job = new_store("async", optimizer=optimizer, lr=LR, staleness_aware_lr=True)
    assert job.settings.buffer == 1
    params = {n: v.clone() for n, v in initial_values().items()}
    state = {n: optimizer.init_state(v) for n, v in params.items()}
    driver = Driver(store, job)
    for event in EVENTS.split():
        if event[0] == "p":
            driver.pull(event[1:])
            continue
        grad, result = driver.push(event[1:])
        assert result.lr == LR / max(1, result.staleness)
        for n, p in params.items():
            optimizer.step(p, grad[n], state[n], store.steps, result.lr)
        for n, value in weights(store).items():
            assert torch.equal(value, params[n]), n


@pytest.mark.parametrize("how", ["leave", "membership"])
def test_a_pending_buffer_is_applied_when_no_worker_is_active(how):
    store, job = new_store("ssp", workers=["a", "b"], optimizer=Adam(), lr=LR, buffer=3)
    ref = Reference(3, False, torch.optim.Adam)
    play(store, job, ref, "pa pb Pa Pb")
    assert store.version == 0 and store.view().contributions == 2
    if how == "leave":
        store.leave("job", "a", "")
        assert store.version == 0  # b is still active: it may fill the buffer
        store.leave("job", "b", "")
    else:
        store.set_membership("job", [])
    ref.flush()
    assert store.version == 1 and store.view().contributions == 0
    close(weights(store), ref.weights())


def test_a_checkpoint_with_a_half_full_buffer_restores_and_continues_alike(tmp_path):
    first, rest = EVENTS.split()[:9], EVENTS.split()[9:]
    assert "".join(first).count("P") % 3 == 2  # two gradients pending at the checkpoint
    runs = []
    for interrupted in (False, True):
        store, job = new_store("async", optimizer=Adam(), lr=LR, buffer=3, staleness_aware_lr=True)
        ref = Reference(3, True, torch.optim.Adam)
        driver = play(store, job, ref, " ".join(first))
        if interrupted:
            checkpoint.write(checkpoint.snapshot(store), tmp_path)
            restored = ParameterStore()
            checkpoint.restore(restored, checkpoint.read(tmp_path))
            view = restored.view()
            assert (view.buffered, view.buffered_staleness) == (2, store.view().buffered_staleness)
            driver.store = store = restored
        for event in rest:  # the same pushes: same gradients, versions and clocks
            if event[0] == "p":
                driver.pull(event[1:])
            else:
                grad, result = driver.push(event[1:])
                ref.push(grad, result.staleness)
        close(weights(store), ref.weights())
        runs.append(weights(store))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_status_counts_a_pending_buffer_as_contributions(tmp_path):
    job = make_job("async", buffer=3)
    with servers(1, tmp_path) as (server,), grpc.insecure_channel(server.address) as channel:
        calls = rpc.calls(channel)
        assert serverkit.init(calls, job).created
        for clock in (1, 2):
            assert serverkit.push(calls, job, "a", clock, "sa").version == 0
        reply = serverkit.status(calls)
        assert reply.contributions == 2 and reply.version == 0
        assert serverkit.push(calls, job, "a", 3, "sa").version == 1
        assert serverkit.status(calls).contributions == 0


def test_a_checkpoint_from_before_the_buffer_restores_with_an_empty_one(tmp_path):
    store, job = new_store("async", optimizer=Adam(), lr=LR)
    play(store, job, Reference(1, False, torch.optim.Adam), "pa Pa")
    snap = checkpoint.snapshot(store)
    assert snap.manifest.pop("buffer") == {"count": 0, "staleness": 0}
    del snap.manifest["counters"]["compensated"], snap.manifest["counters"]["uncompensated"]
    checkpoint.write(snap, tmp_path)
    restored = ParameterStore()
    checkpoint.restore(restored, checkpoint.read(tmp_path))
    assert restored.view().buffered == 0 and restored.version == 1
    with_buffer = checkpoint.snapshot(store)
    with_buffer.manifest["buffer"]["count"] = 1  # a buffer K = 1 never holds one
    checkpoint.write(with_buffer, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="1 buffered gradients"):
        checkpoint.restore(ParameterStore(), checkpoint.read(tmp_path))


@pytest.mark.parametrize(
    ("mode", "buffered", "staleness", "contributors", "why"),
    [
        ("async", 0, 5, (), "0 buffered gradients \\(staleness 5\\)"),  # a sum without gradients
        ("async", 3, 0, (), "3 buffered gradients"),  # K = 3: a full buffer is never pending
        ("async", 1, -1, (), "staleness -1"),
        ("async", 0, 0, ("a",), "a step's gradients for mode async"),
        ("sync", 1, 0, (), "1 buffered gradients"),  # sync's buffer is 1: nothing pends
    ],
)
def test_a_state_whose_pending_update_does_not_fit_its_job_is_refused(
    mode, buffered, staleness, contributors, why
):
    store, _ = new_store(mode, **({"buffer": 3} if mode == "async" else {}))
    state = store.snapshot_state()
    assert state is not None
    view = replace(
        state.view, buffered=buffered, buffered_staleness=staleness, contributors=contributors
    )
    fresh = ParameterStore()
    with pytest.raises(InvalidArgument, match=why):
        fresh.restore_state(replace(state, view=view))
    assert fresh.job is None
