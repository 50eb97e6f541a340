"""However ps-cluster ends (Ctrl-C, SIGTERM, SIGHUP, even SIGKILL), every child ends with
it, and nothing is left in /dev/shm or the temporary directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from protos.security import ClientSecurity
from ps_worker.data import prepare
from scheduler import status
from scheduler.launch import BIN
from scheduler.lifecycle import ADDRESSES, Terminated, ending_signals_raise

pytestmark = pytest.mark.integration
SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, shards=4, samples=400)
    return out


def children_of(pid: int) -> set[int]:
    """Every live descendant of a process, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])  # state, then ppid
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def shm_segments() -> set[str]:
    return {p.name for p in SHM.glob("gradstore-*")} if SHM.is_dir() else set()


def poll(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)  # polling processes and files, with a deadline


def start_training(tmp_path: Path, digits: Path) -> tuple[subprocess.Popen, Path, set[int]]:
    """ps-cluster up as a real process in its own temporary dir, once workers train; its
    temporary root, and its children."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    launcher = subprocess.Popen(
        [
            str(BIN / "ps-cluster"),
            "up",
            *("--data-dir", str(digits), "--model", "digits-mlp", "--batch-size", "8"),
            *("--epochs", "200", "--servers", "1", "--workers", "2", "--quiet"),
            *("--straggler", "0:3"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )

    def training() -> bool:
        assert launcher.poll() is None, launcher.communicate()
        found = list(temp.glob(f"ps-cluster-*/{ADDRESSES}"))
        if not found or not found[0].read_text():
            return False
        address = json.loads(found[0].read_text())["scheduler"]
        try:
            return status.fetch_progress(address, ClientSecurity(), 5)["done"] >= 1
        except status.Unreachable:
            return False

    poll(training, 120, "the workers never trained")
    children = children_of(launcher.pid)
    assert len(children) >= 4, children  # a scheduler, a server, two workers
    return launcher, temp, children


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_every_child_ends_with_the_launcher(tmp_path, digits, sig):
    """Trap: SIGTERM to ps-cluster left its children training."""
    before = shm_segments()
    launcher, temp, children = start_training(tmp_path, digits)
    launcher.send_signal(sig)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == (128 + sig if sig != signal.SIGKILL else -sig), stderr
    poll(lambda: not any(running(p) for p in children), 60, "a child outlived the launcher")
    # The servers shut down cleanly: their Unix sockets are gone; no segment is left.
    poll(lambda: not list(temp.glob("ps-server-*.sock")), 30, "a server's socket is left")
    poll(lambda: not shm_segments() - before, 30, "a shared-memory segment is left")
    if sig == signal.SIGTERM:
        assert "SIGTERM: stopped every process" in stderr
        assert list(temp.iterdir()) == []  # the temporary work dir went with the launcher


def test_sigterm_and_sighup_raise_where_the_launcher_is():
    for sig in (signal.SIGHUP, signal.SIGTERM):
        with pytest.raises(Terminated) as info, ending_signals_raise():
            os.kill(os.getpid(), sig)  # the handler runs before the next line
            pytest.fail(f"{sig.name} did not raise")
        assert info.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored


def test_sigint_interrupts_a_launcher_started_with_it_ignored():
    """Trap: `ps-cluster up &` from a script starts with SIGINT ignored: kill -INT did
    nothing and the job trained on."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), ending_signals_raise():
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("SIGINT did not interrupt")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, before)
