"""Two real ps-server processes and real clients: no lost update, exact sync means, ssp holds."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_worker import Client, ClientConfig, WaitTimeoutError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PART_BYTES = 64 << 10  # "big" (100 KiB) spans both servers


def model_tensors() -> dict[str, torch.Tensor]:
    return {
        "big": torch.arange(25_600, dtype=torch.float32).reshape(160, 160),
        "small.weight": torch.full((3, 4), 2.0),
        "small.bias": torch.zeros(4),
        "double": torch.ones(5, dtype=torch.float64),
    }


@pytest.fixture
def two_servers(shared_servers):
    return shared_servers  # tests/conftest.py: ended after each test


def client(addresses, job, worker, **kw) -> Client:
    return Client(addresses, job_id=job, worker_id=worker, config=ClientConfig(**kw))


def test_health_service_reports_serving(two_servers):
    for address in two_servers:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service="ps.ParameterServer"), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


PATHS = pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "streams"])


@PATHS
def test_async_loses_no_update(two_servers, shm):
    """Four threads, 50 integer-valued pushes each, SGD lr=1: weights = init - exact sum."""
    init = model_tensors()
    with client(two_servers, "async-sum", "init") as c:
        assert c.init(init, mode="async", optimizer="sgd", lr=1.0, part_bytes=PART_BYTES)
        assert {p.server for p in c.layout.parts if p.tensor == "big"} == {0, 1}
    total = {k: torch.zeros_like(v) for k, v in init.items()}
    lock = threading.Lock()
    errors = []

    def worker(w: int) -> None:
        try:
            with client(two_servers, "async-sum", f"w{w}", same_host_shared_memory=shm) as c:
                for i in range(50):
                    c.pull()
                    grads = {
                        k: torch.full_like(v, float((w * 50 + i) % 7 + 1)) for k, v in init.items()
                    }
                    grads["big"][w, :] = float(w + i)  # not uniform across the tensor
                    assert c.push(grads).applied
                    with lock:
                        for k in total:
                            total[k] += grads[k]
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not errors, errors
    with client(two_servers, "async-sum", "reader") as c:
        final = c.pull()
        statuses = c.status()
    for k, v in init.items():
        assert torch.equal(final[k], v - total[k]), k
    assert [s.updates_applied for s in statuses] == [200, 200]
    assert sum(sum(s.staleness_histogram.values()) for s in statuses) == 400


@PATHS
def test_sync_applies_exact_mean_once_per_step(two_servers, shm):
    """Three clients, five steps: each step applies the mean of the three gradients once."""
    init = model_tensors()
    workers = ["a", "b", "c"]
    clients = [client(two_servers, "sync-mean", w, same_host_shared_memory=shm) for w in workers]
    try:
        clients[0].init(
            init, mode="sync", optimizer="sgd", lr=1.0, workers=workers, part_bytes=PART_BYTES
        )
        expected = {k: v.clone() for k, v in init.items()}
        barrier = threading.Barrier(3)
        errors = []

        def run(j: int) -> None:
            try:
                c = clients[j]
                for step in range(5):
                    weights = c.pull()
                    assert c.versions == [step, step]
                    for k in init:  # everyone sees the same weights at the same step
                        assert torch.equal(weights[k], snapshots[step][k]), (step, k)
                    barrier.wait(timeout=30)
                    c.push(
                        {k: torch.full_like(v, float(j + 1) * (step + 1)) for k, v in init.items()}
                    )
            except BaseException as e:
                errors.append(e)
                barrier.abort()

        snapshots = []
        for step in range(6):
            snapshots.append({k: v.clone() for k, v in expected.items()})
            mean = torch.tensor(float(1 + 2 + 3) * (step + 1)) / 3
            expected = {k: v - mean.to(v.dtype) for k, v in expected.items()}
        threads = [threading.Thread(target=run, args=(j,)) for j in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        assert not errors, errors
        final = clients[0].pull()
        for k in init:
            torch.testing.assert_close(final[k], snapshots[5][k], rtol=1e-6, atol=0)
        assert [s.updates_applied for s in clients[0].status()] == [5, 5]
    finally:
        for c in clients:
            c.close()


def test_ssp_holds_the_fast_worker_until_the_slowest_pushes(two_servers):
    init = model_tensors()
    fast = client(two_servers, "ssp-hold", "fast")
    slow = client(two_servers, "ssp-hold", "slow")
    try:
        fast.init(
            init,
            mode="ssp",
            staleness=1,
            optimizer="sgd",
            lr=0.1,
            workers=["fast", "slow"],
            part_bytes=PART_BYTES,
        )
        zeros = {k: torch.zeros_like(v) for k, v in init.items()}
        slow.pull()
        for _ in range(2):
            fast.pull()
            fast.push(zeros)
        assert fast.clock == 2  # two clocks ahead of slow (0): its next pull must wait
        pulled = threading.Event()
        started = threading.Event()
        errors = []

        def fast_pull() -> None:
            started.set()
            try:
                fast.pull()
                pulled.set()
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=fast_pull)
        thread.start()
        started.wait(10)
        # Wait until the server reports the pull as waiting, naming slow.
        waiting = poll_until(lambda: [w for s in fast.status() for w in s.waiting])
        assert all(list(w.waiting_for) == ["slow"] for w in waiting)
        assert "ssp clock 2 (staleness 1)" in waiting[0].reason
        assert not pulled.is_set()
        slow.push(zeros)
        assert pulled.wait(30), "the fast worker's pull was not released"
        thread.join(10)
        assert not errors, errors
    finally:
        fast.close()
        slow.close()


def test_waiting_pull_times_out_with_reason(two_servers):
    init = model_tensors()
    with client(two_servers, "sync-timeout", "a", pull_timeout_s=1.5) as a:
        a.init(init, mode="sync", workers=["a", "b"], part_bytes=PART_BYTES)
        a.pull()
        a.push({k: torch.ones_like(v) for k, v in init.items()})
        with pytest.raises(WaitTimeoutError, match=r"sync step 0: have 1 of 2 .*waiting for b"):
            a.pull()


def poll_until(fn, timeout_s: float = 20.0):
    """Poll fn until it returns something truthy, within a deadline."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s}s")
