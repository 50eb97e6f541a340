"""A registered worker heartbeats from the start: waiting for the servers is not death."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from protos import scheduler_pb2, scheduler_pb2_grpc
from ps_worker.data import prepare
from scheduler.launch import BIN, Daemon
from tests.test_daemon import free_port

LEASE_TIMEOUT_S = 1.5


def progress(address: str) -> dict | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).Progress(
                scheduler_pb2.ProgressRequest(), timeout=5
            )
        return json.loads(reply.progress_json)
    except grpc.RpcError:
        return None


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_worker_waiting_for_its_servers_is_not_declared_dead(tmp_path):
    """The chaos test's trap: a worker registered, then waited for the servers (or built its
    model) longer than the lease timeout before its first heartbeat, and was declared dead
    and exited while alive."""
    prepare("digits", tmp_path / "data", shards=2, samples=200)
    nowhere = f"127.0.0.1:{free_port()}"  # the servers are not up (yet)
    scheduler = Daemon(
        [
            str(BIN / "ps-scheduler"),
            *("--port", "0", "--state", str(tmp_path / "s.db"), "--servers", nowhere),
            *("--data-dir", str(tmp_path / "data"), "--model", "digits-mlp"),
            *("--lease-timeout-s", str(LEASE_TIMEOUT_S)),
        ],
        tmp_path / "scheduler.log",
    )
    worker = None
    try:
        worker = Daemon(
            [str(BIN / "ps-worker"), "--scheduler", scheduler.address, "--no-progress"],
            tmp_path / "worker.log",
        )
        deadline, seen = time.monotonic() + 60, None
        while True:  # until the worker has been registered for three lease timeouts
            p = progress(scheduler.address) or {"workers": []}
            (w,) = p["workers"] or [None]
            if w is not None:
                assert w["state"] != "dead", w
                seen = seen or time.monotonic()
                registered_s = time.monotonic() - seen
                if w["heartbeat_age_s"] < LEASE_TIMEOUT_S and registered_s > 3 * LEASE_TIMEOUT_S:
                    break
            assert time.monotonic() < deadline, p
            time.sleep(0.1)  # polling the scheduler's view, with a deadline
        assert worker.proc.poll() is None  # still waiting for its servers, alive
    finally:
        if worker is not None:
            worker.stop()
        scheduler.stop()
