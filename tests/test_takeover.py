"""A rank restarted right after a crash takes its worker id over once the crashed process's
client goes quiet, instead of failing at once with WorkerIdInUseError; a live duplicate still
fails. Real processes: a ps-server with a short liveness window, and clients as worker1."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from scheduler.launch import Daemon

WINDOW_S = 1.5  # the server's liveness window: a quiet client's id is free after it

SERVER = """
import asyncio, signal, sys
from ps_server.service import start_server
from ps_server.store import ParameterStore

async def main():
    store = ParameterStore(liveness_s=float(sys.argv[1]))
    server, port, _ = await start_server(store, "127.0.0.1:0")
    print(f"test-server listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)

asyncio.run(main())
"""

# argv: address, role (live: push, then keep pulling; take: wait for the go file, then
# push), the client's worker_id_wait_s, the go file
CLIENT = """
import logging, sys, threading, time
from pathlib import Path
import torch
from ps_worker import Client, ClientConfig
from ps_worker.errors import WorkerIdInUseError

logging.basicConfig(level=logging.INFO)
address, role, wait_s, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
config = ClientConfig(worker_id_wait_s=wait_s, same_host_unix_socket=False)
client = Client([address], job_id="j", worker_id="worker1", config=config)
model = torch.nn.Linear(2, 1)
client.init(model, mode="async")
if role == "take":
    print("taker ready", flush=True)
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        threading.Event().wait(0.01)  # polling the go file, with a deadline
    try:
        client.push_from(model)
    except WorkerIdInUseError as e:
        print(f"client refused {e}", flush=True)
        sys.exit(3)
    print("client took over", flush=True)
    client.close()
    sys.exit(0)
client.pull_into(model)
client.push_from(model)
print("client holds worker1", flush=True)
while True:
    client.pull_into(model)  # async: never waits; keeps the session live
    threading.Event().wait(0.1)
"""


@contextmanager
def started(tmp_path: Path) -> Iterator[tuple[str, ExitStack]]:
    with ExitStack() as stack:
        server = Daemon([sys.executable, "-c", SERVER, str(WINDOW_S)], tmp_path / "server.log")
        stack.callback(server.stop)
        yield server.address, stack


def client(stack: ExitStack, tmp_path: Path, address: str, role: str, wait_s: float) -> Daemon:
    argv = [sys.executable, "-c", CLIENT, address, role, str(wait_s), str(tmp_path / "go")]
    daemon = Daemon(argv, tmp_path / f"{role}.log")
    stack.callback(daemon.stop)
    return daemon


def outcome(daemon: Daemon) -> int:
    daemon.proc.wait(30)
    daemon.stop()
    return daemon.proc.returncode


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_rank_restarted_after_a_crash_takes_its_id_over_once_the_window_passes(tmp_path):
    with started(tmp_path) as (address, stack):
        holder = client(stack, tmp_path, address, "live", 0)
        assert holder.wait_line("client holds") == "worker1"
        taker = client(stack, tmp_path, address, "take", WINDOW_S + 5)
        assert taker.wait_line("taker ready") == "ready"  # contact comes at once after the go
        holder.proc.send_signal(signal.SIGKILL)  # no Leave: its session just goes quiet
        holder.proc.wait(10)
        (tmp_path / "go").touch()
        assert taker.wait_line("client ") == "over"
        assert outcome(taker) == 0
        log = (tmp_path / "take.log").read_text()
        assert log.count("waiting up to") == 1, log  # it was refused first, and said so once
        assert "for the other client holding worker id 'worker1' to go quiet" in log


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_live_duplicate_still_fails_after_the_wait(tmp_path):
    with started(tmp_path) as (address, stack):
        holder = client(stack, tmp_path, address, "live", 0)
        assert holder.wait_line("client holds") == "worker1"
        (tmp_path / "go").touch()
        taker = client(stack, tmp_path, address, "take", 1.0)
        assert outcome(taker) == 3
        log = (tmp_path / "take.log").read_text()
        assert "waiting up to 1 s" in log
        assert "worker id 'worker1' is already used by another live client" in log
        assert holder.proc.poll() is None  # the live one carries on
