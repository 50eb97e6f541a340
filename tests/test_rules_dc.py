"""Delay compensation (DC-ASGD) on the store against a plain-torch reference.

The reference keeps each worker's last pulled weights and corrects a push computed on
exactly those: ``g + lambda * g * g * (w_now - w_kept)``, then steps a torch optimizer
(through the buffer when K > 1). Copies are bounded in bytes (the least recently
pulled go first), dropped when their worker leaves, and not checkpointed.
"""

from __future__ import annotations

from collections import OrderedDict

import grpc
import pytest
import torch

from protos import ps_pb2, rpc
from protos.optimizers import SGD, Adam
from ps_server import checkpoint
from ps_server.errors import InvalidArgument
from ps_server.metrics import ServerMetrics
from ps_server.store import ParameterStore
from scheduler.launch import servers
from tests import serverkit
from tests.storekit import chunks_for, initial_values, make_job, new_store, weights
from tests.test_rules_buffer import EVENTS, LR, Driver, Reference, close, random_grad

pytestmark = pytest.mark.timeout(60)
LAMBDA = 0.5


class DcReference(Reference):
    """The buffer rule, with DC-ASGD's correction against the last ``capacity`` pulls."""

    def __init__(self, k: int, optimizer: type, capacity: int = 100, **options) -> None:
        super().__init__(k, False, optimizer, **options)
        self.kept: OrderedDict[str, tuple[int, dict[str, torch.Tensor]]] = OrderedDict()
        self.capacity = capacity
        self.compensated = self.uncompensated = 0

    def pull(self, worker: str) -> None:
        self.kept.pop(worker, None)
        self.kept[worker] = (self.version, {n: w.clone() for n, w in self.weights().items()})
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)

    def compensated_push(self, worker: str, grad, pulled: int, staleness: int) -> float | None:
        version, kept = self.kept.get(worker, (-1, {}))
        if version == pulled:
            grad = {
                n: g + LAMBDA * g * g * (self.params[n].detach() - kept[n]) for n, g in grad.items()
            }
            self.compensated += 1
        else:
            self.uncompensated += 1
        return self.push(grad, staleness)


def play(store, job, ref: DcReference, events: str = EVENTS) -> Driver:
    """Play ``events`` (``p<w>`` pull, ``P<w>`` push, ``o<w>`` push of a gradient computed
    on the weights pulled before the last) on the store and the reference."""
    driver = Driver(store, job)
    older: dict[str, int] = {}
    for event in events.split():
        kind, worker = event[0], event[1:]
        if kind == "p":
            older[worker] = driver.pulled.get(worker, 0)
            driver.pull(worker)
            ref.pull(worker)
            continue
        if kind == "o":
            driver.pulled[worker] = older[worker]
        pulled = driver.pulled[worker]
        grad, result = driver.push(worker)
        ref.compensated_push(worker, grad, pulled, result.staleness)
        close(weights(store), ref.weights())
    counters = store.view().counters
    assert (counters.compensated, counters.uncompensated) == (ref.compensated, ref.uncompensated)
    return driver


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [(SGD(), torch.optim.SGD, {}), (Adam(), torch.optim.Adam, {})],
    ids=["sgd", "adam"],
)
def test_delay_compensation_matches_the_reference(k, ours, theirs, options):
    store, job = new_store("async", optimizer=ours, lr=LR, buffer=k, delay_compensation=LAMBDA)
    ref = DcReference(k, theirs, **options)
    play(store, job, ref)
    assert ref.compensated == EVENTS.count("P") and ref.uncompensated == 0
    assert store.view().kept_bytes == 3 * store.parameter_bytes()


def test_a_push_on_other_weights_than_the_kept_ones_is_applied_as_it_came():
    store, job = new_store("ssp", staleness=5, optimizer=SGD(), lr=LR, delay_compensation=LAMBDA)
    ref = DcReference(1, torch.optim.SGD)
    # b's second gradient was computed on the weights before its last pull (version
    # mismatch); c never pulled
    play(store, job, ref, "pa pb Pa pb Pa Pb ob pc Pc")
    assert (ref.compensated, ref.uncompensated) == (4, 1)


def test_a_worker_that_never_pulled_is_uncompensated():
    store, job = new_store("async", optimizer=SGD(), lr=LR, delay_compensation=LAMBDA)
    store.pull("job", "a", observe=True)  # an observing pull does not take part: no copy
    assert store.view().kept_bytes == 0
    result = store.push("job", "a", 1, 0, chunks_for(job, random_grad(1)))
    assert result.applied
    counters = store.view().counters
    assert (counters.compensated, counters.uncompensated) == (0, 1)


def test_the_memory_bound_drops_the_least_recently_pulled_copy():
    job = make_job("async", optimizer=SGD(), lr=LR, delay_compensation=LAMBDA)
    size = sum(v.numel() * v.element_size() for v in initial_values().values())
    store = ParameterStore(kept_bytes=size * 5 // 2)  # room for two copies
    assert store.initialise(job, chunks_for(job, initial_values()))
    assert store.parameter_bytes() == size
    ref = DcReference(1, torch.optim.SGD, capacity=2)
    driver = play(store, job, ref, "pa pb pc")
    assert store.view().kept_bytes == 2 * size  # a's copy was dropped
    play_more(store, job, ref, driver, "Pa Pb")  # a: uncompensated; b: compensated
    assert (ref.compensated, ref.uncompensated) == (1, 1)
    play_more(store, job, ref, driver, "pb pa Pc Pb Pa")  # c, pulled least recently, went
    assert (ref.compensated, ref.uncompensated) == (3, 2)
    assert ParameterStore(kept_bytes=size - 1).view().kept_bytes == 0


def play_more(store, job, ref: DcReference, driver: Driver, events: str) -> None:
    """Go on with ``driver`` (its pulls and clocks) on the same store and reference."""
    for event in events.split():
        worker = event[1:]
        if event[0] == "p":
            driver.pull(worker)
            ref.pull(worker)
            continue
        pulled = driver.pulled[worker]
        grad, result = driver.push(worker)
        ref.compensated_push(worker, grad, pulled, result.staleness)
        close(weights(store), ref.weights())
    counters = store.view().counters
    assert (counters.compensated, counters.uncompensated) == (ref.compensated, ref.uncompensated)


def test_a_job_whose_share_is_over_the_bound_is_refused_at_init():
    """Accepted, it would never be compensated: refused, changing nothing."""
    job = make_job("async", optimizer=SGD(), lr=LR, delay_compensation=LAMBDA)
    store = ParameterStore(kept_bytes=10)
    with pytest.raises(InvalidArgument, match="one copy may take at most 10 bytes"):
        store.initialise(job, chunks_for(job, initial_values()))
    assert store.job is None
    plain = make_job("async", optimizer=SGD(), lr=LR)
    assert store.initialise(plain, chunks_for(plain, initial_values()))


def test_a_compensated_gradient_that_overflows_is_refused_and_changes_nothing():
    store, job = new_store("async", optimizer=SGD(), lr=LR, delay_compensation=1e300)
    store.pull("job", "a")
    store.push("job", "b", 1, 0, chunks_for(job, random_grad(1)))  # moves the weights
    before, held = store.view(), weights(store)
    with pytest.raises(InvalidArgument, match=r"delay-compensated gradient .* NaN or Inf"):
        store.push("job", "a", 1, 0, chunks_for(job, random_grad(2)))
    assert store.view() == before
    assert all(torch.equal(v, held[n]) for n, v in weights(store).items())


def test_a_worker_that_leaves_or_is_removed_loses_its_copy():
    store, job = new_store(
        "async", workers=["a", "b", "c"], optimizer=SGD(), lr=LR, delay_compensation=LAMBDA
    )
    size = store.parameter_bytes()
    for worker in "abc":
        store.pull("job", worker, session=f"s{worker}")
    assert store.view().kept_bytes == 3 * size
    store.leave("job", "a", "sa")
    assert store.view().kept_bytes == 2 * size
    store.set_membership("job", ["a", "c"])  # b is removed
    assert store.view().kept_bytes == size
    store.push("job", "a", 1, 0, chunks_for(job, random_grad(1)), "new")  # a new client
    store.push("job", "c", 1, 0, chunks_for(job, random_grad(2)), "sc")
    counters = store.view().counters
    assert (counters.compensated, counters.uncompensated) == (1, 1)


def test_copies_are_not_checkpointed(tmp_path):
    store, job = new_store("async", optimizer=SGD(), lr=LR, delay_compensation=LAMBDA)
    store.pull("job", "a")
    store.push("job", "a", 1, 0, chunks_for(job, random_grad(1)))
    store.pull("job", "a")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    restored = ParameterStore()
    checkpoint.restore(restored, checkpoint.read(tmp_path))
    assert restored.view().kept_bytes == 0
    assert restored.view().counters.compensated == 1  # the counters carry on
    restored.push("job", "a", 2, 1, chunks_for(job, random_grad(2)))
    assert restored.view().counters.uncompensated == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_status_reports_the_compensation_counters(tmp_path):
    job = make_job("async", delay_compensation=LAMBDA)
    with servers(1, tmp_path) as (server,), grpc.insecure_channel(server.address) as channel:
        calls = rpc.calls(channel)
        assert serverkit.init(calls, job).created
        request = ps_pb2.PullRequest(job_id="job", worker_id="a", session="sa")
        assert list(calls.pull(request, timeout=10))
        assert serverkit.push(calls, job, "a", 1, "sa", pulled=0).applied  # compensated
        assert serverkit.push(calls, job, "b", 1, "sb", pulled=1).applied  # never pulled
        reply = serverkit.status(calls)
        assert (reply.compensated, reply.uncompensated) == (1, 1)
        assert reply.kept_bytes == reply.parameter_bytes > 0


def test_metrics_show_the_compensation_counters_and_a_pending_buffer():
    metrics = ServerMetrics()
    value = metrics.registry.get_sample_value
    store, job = new_store("async", optimizer=SGD(), lr=LR, buffer=3, delay_compensation=LAMBDA)
    play(store, job, DcReference(3, torch.optim.SGD), "pa Pa pb Pb")
    metrics.publish(store.view())
    assert value("ps_contributions") == 2 and value("ps_compensated") == 2
    assert value("ps_kept_bytes") == 2 * store.parameter_bytes()
    store.push("job", "c", 1, 0, chunks_for(job, random_grad(3)))  # c never pulled
    metrics.publish(store.view())
    assert (value("ps_compensated"), value("ps_uncompensated")) == (2, 1)
    assert value("ps_contributions") == 0 and store.version == 1
