"""Local SGD on the workers (ps_worker.local, DistributedOptimizer in the local modes)
against single-process torch references, with real servers."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from protos.job import Settings
from ps_worker import Client
from ps_worker.errors import StateError
from ps_worker.local import LocalSteps
from ps_worker.torch_api import DistributedOptimizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def assert_same(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


def on_two_ranks(work: Callable[[int], None], timeout_s: float) -> None:
    """Run ``work(0)`` and ``work(1)`` in threads (two ranks) and fail with their errors."""
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            work(r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors


@pytest.fixture
def addresses(shared_servers):
    return shared_servers  # tests/conftest.py: ended after each test


@pytest.mark.parametrize("mode", ["local", "local-async"])
def test_one_worker_is_torchs_optimizer_across_rounds_with_a_scheduled_lr(addresses, mode):
    """One worker, outer_lr 1: each round's pushed change brings the servers to its local
    weights, so 7 batches at H=3 (two full rounds and a flushed one) are torch's Adam over
    the same 7 batches: state and step count kept across rounds, the lr the cosine schedule's
    at the version each round started from."""
    settings = Settings.build(
        mode=mode, local_steps=3, optimizer="adam", lr=0.05, lr_schedule="cosine:4", part_bytes=64
    )
    model, reference = small_model(), small_model()
    opt = torch.optim.Adam(reference.parameters(), lr=0.05, foreach=False)
    with Client(addresses, job_id="one", worker_id="w0") as client:
        client.init(model, settings)
        local = LocalSteps(client, model, settings)
        local.pull()
        pushes = []
        for k, (x, y) in enumerate(batches(1, 7)):
            backward(model, x, y)
            pushes.append(local.step())
            backward(reference, x, y)
            opt.param_groups[0]["lr"] = settings.worker_lr(k // 3)  # versions: pushes so far
            opt.step()
        assert [p is not None for p in pushes] == [False, False, True] * 2 + [False]
        assert local.pending == 1 and client.versions == [2, 2]
        summary = local.flush()
        assert summary is not None and summary.applied and client.versions == [3, 3]
        assert local.flush() is None  # nothing left to push
        assert local.steps == 7
        assert_same(model, reference)
        for p in model.parameters():
            assert p.grad is not None and not p.grad.any()  # the change is not left as a grad
        client.pull_into(model, observe=True)
        assert_same(model, reference)  # the servers hold the last local weights


def test_two_workers_average_their_local_weights_and_an_outer_lr_scales_the_mean_change(
    addresses,
):
    """mode local, 2 workers, H=2, outer_lr 0.5: each round the servers move from the pulled
    weights by half the mean change, and each worker's next round starts there with its own
    Adam state (the reference: two torch models and the same arithmetic)."""
    settings = Settings.build(
        mode="local", local_steps=2, outer_lr=0.5, optimizer="adam", beta1=0.5, lr=0.05
    )
    data = [batches(10 + r, 4) for r in range(2)]
    refs = [small_model(), small_model()]
    opts = [
        torch.optim.Adam(m.parameters(), lr=0.05, betas=(0.5, 0.999), foreach=False) for m in refs
    ]
    start = [p.detach().clone() for p in refs[0].parameters()]
    for round_ in range(2):
        for r in range(2):
            for x, y in data[r][2 * round_ : 2 * round_ + 2]:
                backward(refs[r], x, y)
                opts[r].step()
        with torch.no_grad():
            for i, params in enumerate(zip(*(m.parameters() for m in refs), strict=True)):
                mean_delta = sum(start[i] - p for p in params) / 2
                start[i] = start[i] - 0.5 * mean_delta
                for p in params:
                    p.copy_(start[i])
    models = [small_model(), small_model()]

    def work(r: int) -> None:
        with Client(addresses, job_id="two", worker_id=f"w{r}") as client:
            client.init(models[r], settings, workers=["w0", "w1"])
            local = LocalSteps(client, models[r], settings)
            local.pull()
            for x, y in data[r]:
                backward(models[r], x, y)
                local.step()
            assert client.versions == [2, 2]

    on_two_ranks(work, 60)
    for r in range(2):
        assert_same(models[r], refs[r])


def test_distributed_optimizer_in_local_mode_with_uneven_ranks(addresses):
    """DistributedOptimizer(mode="local") with two ranks and the user's loop unchanged:
    step() every batch pushes every 2nd; rank 0's fifth batch is a partial round that join()
    pushes, applied alone once rank 1 has left; both end with the servers' final weights."""
    data = [batches(20, 5), batches(21, 4)]
    refs = [small_model(), small_model()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False) for m in refs]
    for round_ in range(3):
        for r in range(2):
            for x, y in data[r][2 * round_ : 2 * round_ + 2]:
                backward(refs[r], x, y)
                opts[r].step()
        took = [r for r in range(2) if len(data[r]) > 2 * round_]
        with torch.no_grad():
            for params in zip(*(m.parameters() for m in refs), strict=True):
                mean = sum(params[r] for r in took) / len(took)  # plain averaging
                for p in params:
                    p.copy_(mean)
    models = [small_model(), small_model()]
    pushed: list[list[bool]] = [[], []]

    def work(r: int) -> None:
        with DistributedOptimizer(
            models[r],
            addresses,
            job_id="dist",
            rank=r,
            world=2,
            mode="local",
            local_steps=2,
            optimizer="sgd",
            momentum=0.9,
            lr=0.1,
        ) as optimizer:
            for x, y in data[r]:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(models[r](x), y).backward()
                pushed[r].append(optimizer.step() is not None)
            optimizer.join(timeout_s=30)

    on_two_ranks(work, 90)
    assert pushed == [[False, True] * 2 + [False], [False, True] * 2]
    for r in range(2):
        assert_same(models[r], refs[0])


def test_close_pushes_a_partial_round_and_an_error_leaves_without_it(addresses):
    """close() pushes what is left of a round; leaving the with-block on an error does not
    (the weights of a failed loop are not the job's)."""
    model = small_model()
    ((x, y),) = batches(30, 1)
    optimizer = DistributedOptimizer(
        model,
        addresses,
        job_id="close",
        worker_id="w0",
        mode="local-async",
        local_steps=4,
        optimizer="sgd",
        lr=0.1,
    )
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert optimizer.step() is None
    optimizer.close()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(StateError, match="step\\(\\) after join\\(\\) or close\\(\\)"):
        optimizer.step()  # a local step would change the final weights and push nothing
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with Client(addresses, job_id="close", worker_id="observer") as observer:
        assert [s.version for s in observer.status()] == [1, 1]
        observer.pull_into(model, observe=True)
    reference = small_model()
    backward(reference, x, y)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert_same(model, reference)
    with (
        pytest.raises(RuntimeError, match="the loop failed"),
        DistributedOptimizer(
            model,
            addresses,
            job_id="close",
            worker_id="w1",
            mode="local-async",
            local_steps=4,
            optimizer="sgd",
            lr=0.1,
        ) as optimizer,
    ):
        backward(model, x, y)
        optimizer.step()
        raise RuntimeError("the loop failed")
    with Client(addresses, job_id="close", worker_id="observer") as observer:
        assert [s.version for s in observer.status()] == [1, 1]
