"""A client that shrinks its shared-memory segment under a real ps-server process: the
server refuses the step with the segment's typed reason and goes on serving.

Trap: the server mapped the client's file; a file shrunk after that turned the server's
next read or write of the lost pages into SIGBUS, and the server died.
"""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
import torch

from protos import ps_pb2, rpc
from protos.job import Job
from protos.limits import Limits
from protos.shm import SEGMENT_PREFIX, segment_slots
from protos.status import SHM_SEGMENT_UNAVAILABLE, reason_of
from ps_worker import Client
from scheduler.launch import servers
from tests.serverkit import refused, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_client_shrinking_its_segment_cannot_take_the_server_down(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    with servers(1, tmp_path, "--shm-dir", str(shm)) as (daemon,):
        with Client([daemon.address], job_id="hostile", worker_id="w") as c:
            c.init({"w": torch.zeros(5000)}, mode="async", optimizer="sgd", lr=1.0)
        channel = grpc.insecure_channel(daemon.address)
        calls = rpc.calls(channel)
        job = Job.from_proto(status(calls).config, Limits())
        _, size = segment_slots(job.layout, 0)
        path = shm / f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, torch.ones(5000).numpy().tobytes(), 0)

            def step(clock: int, push: bool = True) -> ps_pb2.ShmStepRequest:
                header = ps_pb2.PushHeader(job_id="hostile", worker_id="h", clock=clock)
                pull = ps_pb2.PullRequest(job_id="hostile", worker_id="h", clock=clock)
                return ps_pb2.ShmStepRequest(
                    segment=path.name, push=header if push else None, pull=pull
                )

            pulled = calls.shm_step(step(1), timeout=10)  # the server opened the segment
            assert pulled.push.applied and pulled.version == 1
            assert os.pread(fd, 8, 0) == torch.full((2,), -1.0).numpy().tobytes()
            for shrunk in (0, size // 2):
                os.ftruncate(fd, shrunk)
                for push in (True, False):  # the server's read, then its write
                    error = refused(lambda p=push: calls.shm_step(step(2, p), timeout=10))
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                        error.details(),
                        daemon.proc.poll(),  # -7: the server died of SIGBUS
                    )
                    assert reason_of(error) == SHM_SEGMENT_UNAVAILABLE
                    assert "shrank" in error.details()
                    assert daemon.proc.poll() is None
            after = status(calls, "hostile")
            assert after.pushes_received == 1 and after.version == 1  # nothing applied
        finally:
            os.close(fd)
            channel.close()
        with Client([daemon.address], job_id="hostile", worker_id="w") as c:
            assert c.transports == ["shm"]
            assert c.push({"w": torch.ones(5000)}).applied
            torch.testing.assert_close(c.pull()["w"], torch.full((5000,), -2.0))
        assert daemon.proc.poll() is None
