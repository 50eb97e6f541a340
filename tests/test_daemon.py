"""The daemons' command lines, clean shutdown, waits that hold no thread and waits that
say what they wait for."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

from protos import scheduler_pb2
from protos.security import ClientSecurity
from ps_worker import Client, ClientConfig, PSError
from ps_worker.daemon import SchedulerLink
from ps_worker.data import prepare
from ps_worker.waits import WaitReporter
from scheduler.launch import BIN, Daemon, servers

# Every command line and subcommand a person can ask for --help, and the flags whose help
# must say what they are (with the choices, where there are some).
HELP = {
    "ps-server": ["--host", "--port"],
    "ps-worker": ["--scheduler", "--device {auto,cpu,cuda}"],
    "ps-scheduler": [
        *("--host", "--port", "--model", "--mode {sync,async,ssp,local,local-async}", "--fresh"),
    ],
    "ps-scheduler status": ["--scheduler"],
    "ps-cluster": [],
    "ps-cluster up": [
        "--device {auto,cpu,cuda}",
        "--mode {sync,async,ssp,local,local-async}",
        "--optimizer {sgd,adam,adagrad}",
        "--model",
        "--save",
        "--workers",
    ],
    "ps-cluster status": ["--work-dir"],
    "ps-data prepare": ["--dataset {mnist1d,digits}"],
    "ps-health": ["address"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_texts_describe_every_flag_without_backticks(command):
    name, *sub = command.split()
    result = subprocess.run(
        [str(BIN / name), *sub, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: {command}"), text[:200]
    assert "`" not in text
    for flag in HELP[command]:
        # argparse puts a flag's help on its line, or indented on the next one.
        match = re.search(rf"^  {re.escape(flag)}[^\n]*\n?(.*)$", text, re.M)
        assert match, f"{command} --help does not show {flag}"
        line = match.group(0).split("\n")[0]
        described = re.search(r"\S  +\S", line.strip()) or match.group(1).startswith(" " * 10)
        assert described, f"{command}: {flag} has no help text"
    if command == "ps-scheduler":  # its subcommand is listed
        assert "ps-scheduler status" in text
    if command in ("ps-scheduler", "ps-cluster up"):
        assert "mnist1d-cnn, mnist1d-mlp, digits-mlp" in text  # --model's choices


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_a_worker_says_what_it_waits_for_while_the_scheduler_is_unreachable():
    """Trap: ps-worker was silent for its whole --scheduler-timeout-s (120 s)."""
    address = f"127.0.0.1:{free_port()}"
    argv = [str(BIN / "ps-worker"), "--scheduler", address, "--scheduler-timeout-s", "8"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=50)
    assert result.returncode == 1
    (line, *_) = [x for x in result.stderr.splitlines() if "waiting for" in x]
    assert f"Register: waiting for 5s: the scheduler at {address} (UNAVAILABLE: " in line
    assert line.endswith("retrying for up to 8s"), line


@pytest.mark.timeout(30)
def test_the_scheduler_link_keeps_saying_what_it_waits_for(caplog):
    address = f"127.0.0.1:{free_port()}"
    link = SchedulerLink(address, 1.5, ClientSecurity(), reports=WaitReporter(0.2, 0.3))
    with caplog.at_level(logging.WARNING, logger="ps_worker"), pytest.raises(PSError):
        link.call("Register", scheduler_pb2.RegisterRequest(host="h"))
    link.close()
    said = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(said) >= 3, said  # after 0.2 s, then every 0.3 s until the call gave up
    assert all("Register: waiting for" in m and address in m for m in said)


@pytest.mark.timeout(60)
def test_a_daemon_that_does_not_start_says_its_own_error(tmp_path):
    """Trap: "ps-scheduler did not start: None" hid the scheduler's message."""
    argv = [str(BIN / "ps-scheduler"), "--data-dir", str(tmp_path / "none"), "--servers", "a:1"]
    with pytest.raises(RuntimeError) as info:
        assert Daemon(argv, tmp_path / "scheduler.log").address
    message = str(info.value)
    assert message.startswith("ps-scheduler did not start: ps-scheduler: no manifest.json in")
    assert "None" not in message and "scheduler.log" in message


@pytest.mark.timeout(60)
def test_a_daemon_killed_before_it_listened_says_so(tmp_path):
    """Trap: "ps-server did not start: it printed None" for a server SIGKILLed at start."""
    daemon = Daemon([str(BIN / "ps-server"), "--port", "0"], tmp_path / "server.log")
    daemon.proc.kill()
    with pytest.raises(RuntimeError) as info:
        assert daemon.address
    message = str(info.value)
    assert "exited with code -9 before it listened" in message, message
    assert "None" not in message
    with pytest.raises(RuntimeError) as again:  # at once, the same: its output is gone
        assert daemon.address
    assert str(again.value) == message


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
def test_the_scheduler_says_its_port_is_in_use(tmp_path):
    prepare("digits", tmp_path / "data", shards=2, samples=200)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run(
            [
                *(str(BIN / "ps-scheduler"), "--port", str(port), "--model", "digits-mlp"),
                *("--data-dir", str(tmp_path / "data"), "--servers", "127.0.0.1:1"),
                *("--state", str(tmp_path / "job.db")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address in use" in result.stderr
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


@pytest.mark.timeout(60)
def test_how_a_daemon_ended_names_the_signal_that_killed_it_or_its_own_error(tmp_path):
    """Trap: "parameter server 1 exited with code -9: ... INFO serving on ..." quoted a
    start-up line as the reason of a server SIGKILLed (with --no-restart-on-failure)."""
    code = "import sys, time; print('INFO serving', file=sys.stderr, flush=True); "
    killed = Daemon([sys.executable, "-c", code + "time.sleep(60)"], tmp_path / "a.log")
    failed = Daemon([sys.executable, "-c", code + "sys.exit('bad config')"], tmp_path / "b.log")
    killed.proc.kill()
    for d in (killed, failed):
        d.proc.wait(30)
    assert killed.how_it_ended() == "was killed by SIGKILL"
    assert failed.how_it_ended().startswith("exited with code 1: bad config (see ")
    for d in (killed, failed):
        d.stop()
