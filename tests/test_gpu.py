"""Worker steps on CUDA against live servers (skipped where there is no CUDA device)."""

from __future__ import annotations

import time

import pytest
import torch

from ps_worker import Client
from ps_worker.models import build_model
from scheduler.launch import servers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}


def test_cuda_worker_pushes_the_cpu_gradient(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
    cpu_model = build_model("mnist1d-cnn", 0)
    gpu_model = build_model("mnist1d-cnn", 0).cuda()
    expected = gradient(cpu_model, x, y)
    with (
        servers(2, tmp_path) as daemons,
        Client([d.address for d in daemons], job_id="gpu", worker_id="cuda") as client,
    ):
        client.init(gpu_model, mode="async", optimizer="sgd", lr=1.0)
        before = client.pull()
        gradient(gpu_model, x.cuda(), y.cuda())
        client.push_pull_into(gpu_model)  # pushes .grad from the GPU, pulls back onto it
        after = client.pull()
        for name, p in gpu_model.named_parameters():
            assert p.is_cuda
            pushed = before[name] - after[name]  # SGD, lr 1: exactly the gradient pushed
            torch.testing.assert_close(pushed, expected[name], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p.detach().cpu(), after[name])
        rates = {}
        for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
            xb, yb = x[:100].to(device), y[:100].to(device)
            client.pull_into(model)
            start = time.perf_counter()
            for _ in range(50):
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                client.push_pull_into(model)
            rates[device] = 50 * 100 / (time.perf_counter() - start)
        print(
            f"worker samples/s through 2 servers: cpu {rates['cpu']:.0f}, cuda {rates['cuda']:.0f}"
        )
