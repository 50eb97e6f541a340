"""ps-scheduler's state file, as processes: one scheduler per state file, and --fresh
discarding nothing before it knows the scheduler can start."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from protos.jobspec import JobSpec
from ps_worker import Client, ClientConfig
from ps_worker.data import prepare
from scheduler.launch import BIN, Daemon, servers
from scheduler.state import SchedulerState

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    prepare("digits", out, shards=2, samples=200)
    return out


def scheduler_argv(state: Path, tiny: Path, servers: str, *extra: str) -> list[str]:
    return [
        str(BIN / "ps-scheduler"),
        *("--state", str(state), "--data-dir", str(tiny), "--model", "digits-mlp"),
        *("--servers", servers, "--batch-size", "32", *extra),
    ]


def stored_epochs(state: Path) -> int:
    """The epochs of the job the state file holds (read-only, beside a running scheduler)."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        (spec,) = db.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
    finally:
        db.close()
    return json.loads(spec)["epochs"]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_a_second_scheduler_on_a_state_file_in_use_is_refused_changing_nothing(tmp_path, tiny):
    """The trap: --fresh on a busy port exited 'address in use', but had already replaced
    the running scheduler's job in the state file."""
    state = tmp_path / "s.db"
    first = Daemon(scheduler_argv(state, tiny, "127.0.0.1:1", "--epochs", "3"), tmp_path / "1.log")
    try:
        port = first.address.rsplit(":", 1)[1]
        link = tmp_path / "link.db"  # the same file by another name: the same lock
        link.symlink_to(state)
        for where, path in ((port, state), ("0", state), ("0", link)):
            second = run(
                scheduler_argv(
                    path, tiny, "127.0.0.1:1", "--fresh", "--port", where, "--epochs", "5"
                )
            )
            assert second.returncode == 2, second.stderr
            assert second.stderr == (
                f"ps-scheduler: state file {path} is in use by another ps-scheduler "
                f"(pid {first.proc.pid})\n"
            )
            assert stored_epochs(state) == 3
        assert first.proc.poll() is None
    finally:
        first.stop()


@pytest.mark.timeout(120)
def test_fresh_on_a_port_in_use_discards_nothing(tmp_path, tiny):
    state = tmp_path / "s.db"
    held = SchedulerState(str(state))
    spec = {"data_dir": str(tiny), "model": "digits-mlp", "servers": "127.0.0.1:1", "epochs": 3}
    held.create_or_resume(JobSpec.from_dict(spec), shards=2)
    held.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        second = run(
            scheduler_argv(state, tiny, "127.0.0.1:1", "--fresh", "--port", port, "--epochs", "5")
        )
    assert second.returncode == 2
    assert second.stderr == f"ps-scheduler: cannot listen on 127.0.0.1:{port}: address in use\n"
    assert stored_epochs(state) == 3


def server_job(address: str) -> tuple[bool, int]:
    """Whether the server holds an initialised job, and its version."""
    with Client([address], job_id="job", config=ClientConfig(timeout_s=10)) as client:
        (status,) = client.status()
    return status.initialised, status.version


@pytest.mark.timeout(180)
def test_fresh_ends_the_discarded_job_on_its_servers(tmp_path, tiny):
    """The trap: the fresh job's workers trained on from the old job's weights (same
    settings) or were refused ALREADY_EXISTS (other settings)."""
    state = tmp_path / "s.db"
    with servers(1, tmp_path) as (server,):
        argv = scheduler_argv(state, tiny, server.address, "--epochs", "1")
        first = Daemon([*argv, "--no-end-job"], tmp_path / "first.log")
        try:
            worker = Daemon(
                [str(BIN / "ps-worker"), "--scheduler", first.address, "--no-progress"],
                tmp_path / "worker.log",
            )
            try:
                assert worker.proc.wait(120) == 0, worker.last_log_line()
            finally:
                worker.stop()
        finally:
            first.stop()
        initialised, version = server_job(server.address)
        assert initialised and version > 0  # the old job, trained a bit, kept there
        fresh = Daemon([*argv, "--fresh"], tmp_path / "fresh.log")
        try:
            assert fresh.address  # listening: the old job is ended by now
            assert server_job(server.address) == (False, 0)
        finally:
            fresh.stop()
    assert "ended job job on 1 of 1 server(s)" in (tmp_path / "fresh.log").read_text()


@pytest.mark.timeout(120)
def test_fresh_starts_when_the_discarded_jobs_server_cannot_be_reached(tmp_path, tiny):
    state = tmp_path / "s.db"
    held = SchedulerState(str(state))
    spec = {"data_dir": str(tiny), "model": "digits-mlp", "servers": "127.0.0.1:1", "epochs": 3}
    held.create_or_resume(JobSpec.from_dict(spec), shards=2)
    held.close()
    fresh = Daemon(scheduler_argv(state, tiny, "127.0.0.1:1", "--fresh"), tmp_path / "f.log")
    try:
        assert fresh.address
    finally:
        fresh.stop()
    log = (tmp_path / "f.log").read_text()
    (line,) = [x for x in log.splitlines() if "cannot end job job on 127.0.0.1:1" in x]
    assert "starting anyway" in line and "ended job job on 0 of 1 server(s)" in log
