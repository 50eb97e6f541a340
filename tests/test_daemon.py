"""The daemons' command lines, clean shutdown, and waits that hold no thread."""

from __future__ import annotations

import signal
import subprocess
import threading

import pytest
import torch

from ps_worker import Client, ClientConfig
from scheduler.launch import BIN, servers

COMMANDS = ["ps-server", "ps-worker", "ps-scheduler", "ps-cluster"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = subprocess.run(
        [str(BIN / command), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: " + command)


def test_bad_arguments_give_one_line_and_no_traceback():
    result = subprocess.run(
        [str(BIN / "ps-server"), "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "is not a port number" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_port_in_use_is_reported(tmp_path):
    with servers(1, tmp_path) as (daemon,):
        port = daemon.address.rsplit(":", 1)[1]
        result = subprocess.run(
            [str(BIN / "ps-server"), "--port", port], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "address in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_sigterm_stops_the_server_cleanly(tmp_path):
    with servers(1, tmp_path) as (daemon,):
        with Client([daemon.address], job_id="j") as c:
            c.init({"w": torch.zeros(3)})
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
    log = (tmp_path / "server0.log").read_text()
    assert "shutting down" in log and "Traceback" not in log


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_many_waiting_pulls_do_not_starve_the_server(tmp_path):
    """More waiting pulls than any default thread pool, then the pushes that release them."""
    n = 40
    workers = [f"w{i}" for i in range(n)]
    with servers(1, tmp_path) as (daemon,):
        clients = [
            Client(
                [daemon.address], job_id="many", worker_id=w, config=ClientConfig(pull_timeout_s=60)
            )
            for w in workers
        ]
        try:
            clients[0].init(
                {"w": torch.zeros(8)}, mode="sync", optimizer="sgd", lr=1.0, workers=workers
            )
            for c in clients:
                c.pull()
            errors = []
            released = threading.Barrier(n + 1)

            def step(c: Client) -> None:
                try:
                    c.push({"w": torch.ones(8)})
                    c.pull()  # waits until all 40 pushed
                    released.wait(60)
                except BaseException as e:
                    errors.append(e)
                    released.abort()

            threads = [threading.Thread(target=step, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            released.wait(60)
            for t in threads:
                t.join(30)
            assert not errors, errors
            assert clients[0].versions == [1]
            assert torch.equal(clients[0].pull()["w"], -torch.ones(8))
        finally:
            for c in clients:
                c.close()
