"""The client library with torch modules against a real server."""

from __future__ import annotations

import pytest
import torch

from ps_worker import (
    SGD,
    Client,
    ClientConfig,
    ConflictError,
    InvalidRequestError,
    LrSchedule,
    PSError,
    StateError,
    UnknownJobError,
)
from scheduler.launch import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.fixture
def addresses(shared_servers):
    return shared_servers  # tests/conftest.py: ended after each test


@pytest.mark.parametrize(
    ("fused", "chunk_bytes", "shm"),
    [
        (False, 1 << 20, False),
        (True, 1 << 20, False),
        (True, 64, False),
        (False, 1 << 20, True),
        (True, 1 << 20, True),
    ],
    ids=["push-then-pull", "fused-step", "fused-over-streams", "shm-push-then-pull", "shm-fused"],
)
def test_training_loop_with_a_module(addresses, fused, chunk_bytes, shm):
    """A training loop through the servers equals local SGD on the same gradients, over
    gRPC streams, the fused Step call and the shared-memory path alike."""
    model = small_model()
    reference = small_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    config = ClientConfig(chunk_bytes=chunk_bytes, same_host_shared_memory=shm)
    with Client(addresses, job_id="loop", worker_id="w0", config=config) as c:
        assert c.transports == (["shm"] * 2 if shm else ["unix"] * 2)
        assert c.init(model, mode="async", optimizer=SGD(momentum=0.9), lr=0.1, part_bytes=64)
        c.pull_into(model)
        for _ in range(5):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if fused:
                summary = c.push_pull_into(model)
                assert summary.applied and c.versions == list(summary.versions)
            else:
                c.push_from(model)
                c.pull_into(model)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
        c.pull_into(model)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_cosine_schedule_matches_torchs_and_a_different_one_conflicts(addresses):
    """The servers' cosine decay equals torch's CosineAnnealingLR over the same steps."""
    model, reference = small_model(), small_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    schedule = LrSchedule("cosine", total_steps=4, final_ratio=0.1)
    with Client(addresses, job_id="cosine", worker_id="w0") as c:
        assert c.init(model, mode="async", optimizer="sgd", lr=0.5, lr_schedule=schedule)
        c.pull_into(model)
        for _ in range(4):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            summary = c.push_pull_into(model)
            assert summary.lr == pytest.approx((decay.get_last_lr()[0],) * 2)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
            decay.step()
        with pytest.raises(ConflictError, match="schedule"):
            c.init(model, mode="async", optimizer="sgd", lr=0.5, lr_schedule="cosine:5")
        with pytest.raises(InvalidRequestError, match="integer STEPS"):
            c.init(model, mode="async", optimizer="sgd", lr=0.5, lr_schedule="cosine:many")
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_second_worker_learns_the_job_from_the_servers(addresses):
    model = small_model()
    with Client(addresses, job_id="shared", worker_id="first") as first:
        assert first.init(model, mode="ssp", staleness=3)
        with Client(addresses, job_id="shared", worker_id="second") as second:
            assert not second.init(model, mode="ssp", staleness=3)  # identical: kept
            job = second.job()
            assert job.settings.mode.value == "ssp" and job.settings.staleness == 3
            weights = second.pull()
            for name, p in model.named_parameters():
                assert torch.equal(weights[name], p.detach())


def test_a_client_of_another_job_is_told_the_job_is_not_there(addresses):
    """Trap: a client of job 'nosuch', with another model, was told its tensors did not
    match the model of the job the servers held (the README promises NOT_FOUND)."""
    with Client(addresses, job_id="held", worker_id="first") as first:
        first.init(small_model())
        with Client(addresses, job_id="nosuch", worker_id="w") as other:
            other_model = torch.nn.Linear(4, 2)
            for call in (other.pull_into, other.push_from, other.job):
                with pytest.raises(UnknownJobError, match="holds job 'held', not 'nosuch'"):
                    call(*([other_model] if call != other.job else []))


def test_parameters_without_gradients_push_zeros(addresses):
    model = small_model()
    with Client(addresses, job_id="frozen", worker_id="w") as c:
        c.init(model, optimizer="sgd", lr=1.0)
        before = c.pull()
        model[0].weight.grad = torch.ones_like(model[0].weight)
        assert c.push_from(model).applied
        after = c.pull()
    torch.testing.assert_close(after["0.weight"], before["0.weight"] - 1)
    assert torch.equal(after["2.bias"], before["2.bias"])


def test_client_side_errors_are_clear(addresses):
    model = small_model()
    with Client(addresses, job_id="errs", worker_id="w", config=ClientConfig(timeout_s=5)) as c:
        with pytest.raises(PSError, match="holds no model yet"):
            c.pull()
        with pytest.raises(StateError, match="not initialised"):
            c.set_membership(["w"])
        c.init(model)
        grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        with pytest.raises(InvalidRequestError, match=r"missing 0\.bias; unexpected extra"):
            c.push({**{k: v for k, v in grads.items() if k != "0.bias"}, "extra": torch.ones(1)})
        with pytest.raises(InvalidRequestError, match=r"'0.weight' has shape \(2, 2\)"):
            c.push({**grads, "0.weight": torch.zeros(2, 2)})
        with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
            c.init(model, optimizer="lion")
        float64 = {k: v.double() for k, v in grads.items()}  # converted to the model's dtype
        assert c.push(float64).applied


def test_unreachable_server_fails_fast_and_clearly():
    config = ClientConfig(timeout_s=2, retries=3, backoff_s=0.05)
    c = Client(["127.0.0.1:1"], job_id="x", config=config)
    try:
        with pytest.raises(PSError, match=r"server 127\.0\.0\.1:1 failed \(UNAVAILABLE\)"):
            c.status()
    finally:
        c.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pull_into_and_push_from_a_cuda_module(addresses):
    model = small_model().cuda()
    with Client(addresses, job_id="gpu", worker_id="w") as c:
        c.init(model, optimizer="sgd", lr=1.0)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        c.push_from(model)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        c.pull_into(model)
        expected = small_model()
        for p, q in zip(model.parameters(), expected.parameters(), strict=True):
            assert p.is_cuda
            torch.testing.assert_close(p.cpu(), q.detach() - 1)


def test_same_host_servers_are_reached_over_their_unix_sockets(addresses, tmp_path):
    model = small_model()
    config = ClientConfig(same_host_shared_memory=False)
    with Client(addresses, job_id="uds", worker_id="w", config=config) as local:
        assert local.transports == ["unix", "unix"]
        local.init(model, optimizer="sgd", lr=1.0)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        local.push_pull_into(model)
    config = ClientConfig(
        same_host_unix_socket=False, same_host_shared_memory=False, bulk_data_plane=False
    )
    with Client(addresses, job_id="uds", worker_id="r", config=config) as remote:
        assert remote.transports == ["tcp", "tcp"]
        weights = remote.pull()
    for name, p in model.named_parameters():  # both paths see the same weights
        assert torch.equal(weights[name], p.detach())
    with (
        servers(
            1, tmp_path, "--unix-socket", "none", "--shm-dir", "none", "--bulk-port", "none"
        ) as (daemon,),
        Client([daemon.address], job_id="x") as c,
    ):
        assert c.transports == ["tcp"]
