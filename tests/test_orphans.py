"""Files that killed servers and clients leave (Unix sockets, shared-memory segments) are
removed by whoever starts next; nothing else is ever touched.

Trap: every SIGKILLed ps-server left its ps-server-*.sock in the temp directory, and every
killed client the segments it had not handed over yet, for ever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from protos.orphans import (
    SOCKET_PREFIX,
    SOCKET_SUFFIX,
    creator,
    owned_name,
    remove_orphans,
    sweep_leftovers,
)
from protos.shm import SEGMENT_PREFIX
from ps_worker.payload import SharedBuffers
from scheduler.launch import BIN, Daemon
from tests.clientkit import plan_of


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_names_carry_their_makers_pid_and_only_such_names_parse():
    name = owned_name(SEGMENT_PREFIX)
    assert creator(name, SEGMENT_PREFIX) == os.getpid()
    sock = owned_name(SOCKET_PREFIX, SOCKET_SUFFIX, 8)
    assert creator(sock, SOCKET_PREFIX, SOCKET_SUFFIX) == os.getpid()
    for bad in ("gradstore-abc", "gradstore-0-ab", "gradstore--1-ab", "gradstore-12-", "x-12-ab"):
        assert creator(bad, SEGMENT_PREFIX) is None, bad
    assert creator("gradstore-99999999-ab", SEGMENT_PREFIX) is None  # over any pid_max
    assert creator("ps-server-12-ab.sock.x", SOCKET_PREFIX, SOCKET_SUFFIX) is None


def test_only_files_of_dead_makers_are_removed(tmp_path: Path):
    dead = dead_pid()
    target = tmp_path / "target"
    target.write_text("kept")
    files = {
        "dead": tmp_path / f"gradstore-{dead}-aa",
        "live": tmp_path / f"gradstore-{os.getpid()}-bb",
        "unparsed": tmp_path / "gradstore-cc",
        "other prefix": tmp_path / f"other-{dead}-dd",
    }
    for path in files.values():
        path.write_bytes(b"x")
    link = tmp_path / f"gradstore-{dead}-link"
    link.symlink_to(target)
    folder = tmp_path / f"gradstore-{dead}-dir"
    folder.mkdir()
    assert remove_orphans(str(tmp_path), SEGMENT_PREFIX) == [str(files["dead"])]
    assert not files["dead"].exists()
    for what in ("live", "unparsed", "other prefix"):
        assert files[what].exists(), what
    assert link.is_symlink() and target.read_text() == "kept" and folder.is_dir()
    assert remove_orphans(str(tmp_path / "missing"), SEGMENT_PREFIX) == []


def test_a_dead_pids_socket_goes_unless_something_listens_on_it(tmp_path: Path):
    dead = dead_pid()
    stale = tmp_path / f"{SOCKET_PREFIX}{dead}-aaaa{SOCKET_SUFFIX}"
    listened = tmp_path / f"{SOCKET_PREFIX}{dead}-bbbb{SOCKET_SUFFIX}"  # another pid namespace
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.bind(str(stale))  # bound, never listened on: as a killed server leaves it
        b.bind(str(listened))
        b.listen()
        removed = remove_orphans(str(tmp_path), SOCKET_PREFIX, SOCKET_SUFFIX)
        assert removed == [str(stale)]
        assert listened.exists()


def test_a_client_making_a_segment_removes_dead_clients_segments(tmp_path: Path):
    leftover = tmp_path / f"{SEGMENT_PREFIX}{dead_pid()}-{'0' * 32}"
    leftover.write_bytes(b"\0" * 64)
    buffers = SharedBuffers.create(str(tmp_path), plan_of(), 0)
    try:
        assert [p.name for p in tmp_path.iterdir()] == [buffers.segment.name]
        assert creator(buffers.segment.name, SEGMENT_PREFIX) == os.getpid()
    finally:
        buffers.close()  # a client removes its own segment
    assert list(tmp_path.iterdir()) == []


def test_sweep_leftovers_covers_segments_and_sockets(tmp_path: Path):
    dead = dead_pid()
    (tmp_path / f"{SEGMENT_PREFIX}{dead}-aa").write_bytes(b"x")
    (tmp_path / f"{SOCKET_PREFIX}{dead}-bb{SOCKET_SUFFIX}").write_bytes(b"")
    gone = sweep_leftovers(shm_dir=str(tmp_path), socket_dir=str(tmp_path))
    assert len(gone) == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_killed_servers_socket_and_a_dead_clients_segment_go_when_a_server_starts(
    tmp_path: Path,
):
    temp, shm = tmp_path / "tmp", tmp_path / "shm"
    temp.mkdir()
    shm.mkdir()
    segment = shm / f"{SEGMENT_PREFIX}{dead_pid()}-{'1' * 32}"
    segment.write_bytes(b"\0" * 64)
    argv = [str(BIN / "ps-server"), "--host", "127.0.0.1", "--port", "0", "--shm-dir", str(shm)]
    env = {"TMPDIR": str(temp)}
    first = Daemon(argv, tmp_path / "first.log", env=env)
    try:
        assert first.address
        (left,) = temp.glob(f"{SOCKET_PREFIX}*{SOCKET_SUFFIX}")
        assert creator(left.name, SOCKET_PREFIX, SOCKET_SUFFIX) == first.proc.pid
        assert not segment.exists()  # swept as the first server started
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert left.exists()  # a killed server cannot remove its socket
    finally:
        first.stop()
    second = Daemon(argv, tmp_path / "second.log", env=env)
    try:
        assert second.address  # swept before it listens
        (mine,) = temp.glob(f"{SOCKET_PREFIX}*{SOCKET_SUFFIX}")
        assert mine != left and not left.exists()
    finally:
        assert second.stop() == 0
    assert list(temp.iterdir()) == []  # a server that stops removes its own socket
