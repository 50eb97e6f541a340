"""Helpers to drive a real ps-server process with raw gRPC calls (no Client in between)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from protos import ps_pb2, rpc
from protos.job import Job
from tests.storekit import frames, grads, initial_values


def wait_until(predicate: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` until it is true, or fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling a condition, with a deadline


def status(calls: rpc.Calls, job_id: str = "") -> ps_pb2.StatusResponse:
    return calls.status(ps_pb2.StatusRequest(job_id=job_id), timeout=10)


def init(calls: rpc.Calls, job: Job) -> ps_pb2.InitResponse:
    """Init the job (storekit's tensors at their initial values)."""
    header = ps_pb2.InitHeader(config=job.to_proto())
    return calls.init(iter(frames(header, job, initial_values())), timeout=10)


def push(
    calls: rpc.Calls,
    job: Job,
    worker: str,
    clock: int,
    session: str,
    value: float = 1.0,
    pulled: int = 0,
) -> ps_pb2.PushResponse:
    """A push of ``value`` everywhere by ``worker`` at ``clock`` from client ``session``."""
    header = ps_pb2.PushHeader(
        job_id=job.job_id, worker_id=worker, clock=clock, pulled_version=pulled, session=session
    )
    return calls.push(iter(frames(header, job, grads(value))), timeout=10)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The error a call fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value
