"""Files named after the process that made them, and removing those whose maker is dead.

A ps-server's Unix socket (``ps-server-<pid>-<hex>.sock`` in the temp
directory) and a client's shared-memory segment (``gradstore-<pid>-<hex>``)
are removed by their maker when it ends; a killed process cannot, so whoever
starts next removes what dead makers left: a ps-server when it starts, a
client when it makes a segment, the cluster launcher when a child dies and
when it exits (:func:`sweep_leftovers`).

A name that does not parse is never touched, nor a link, a directory or a
file of another user. A pid that is alive (or not ours to signal) keeps its
file, even if the pid was reused; a socket something still listens on is kept
whatever its pid says (a server in another pid namespace sharing the directory).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import tempfile
import uuid

SOCKET_PREFIX = "ps-server-"
SOCKET_SUFFIX = ".sock"
_PID_MAX = 1 << 22  # Linux's highest pid_max


def owned_name(prefix: str, suffix: str = "", token_chars: int = 32) -> str:
    """A fresh name carrying this process's pid: ``<prefix><pid>-<hex><suffix>``."""
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:token_chars]}{suffix}"


def creator(name: str, prefix: str, suffix: str = "") -> int | None:
    """The pid a name made by :func:`owned_name` carries; None unless it parses."""
    pattern = rf"{re.escape(prefix)}([1-9][0-9]{{0,6}})-[A-Za-z0-9_]{{1,64}}{re.escape(suffix)}"
    match = re.fullmatch(pattern, name)
    if match is None or int(match.group(1)) > _PID_MAX:
        return None
    return int(match.group(1))


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listened_on(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as e:
            return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def remove_orphans(directory: str, prefix: str, suffix: str = "") -> list[str]:
    """Remove the files in directory named ``<prefix><pid>-<hex><suffix>`` whose pid is dead;
    the paths removed. Never raises for a directory that is missing or unreadable."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        pid = creator(entry.name, prefix, suffix)
        if pid is None or pid == os.getpid() or alive(pid):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if info.st_uid != uid:
            continue
        if stat.S_ISSOCK(info.st_mode):
            if _listened_on(entry.path):
                continue
        elif not stat.S_ISREG(info.st_mode):
            continue  # a link, a directory, ...: not something we make
        try:
            os.unlink(entry.path)
        except OSError:  # gone meanwhile (another sweeper was first)
            continue
        removed.append(entry.path)
    return removed


def sweep_leftovers(shm_dir: str | None = None, socket_dir: str | None = None) -> list[str]:
    """Remove dead processes' segments and ps-server sockets (by default from the shared-
    memory and temp directories this host's clients and servers use); the paths removed.
    The cluster launcher calls it when a child dies and when it exits."""
    from protos.shm import SEGMENT_PREFIX, default_dir  # protos.shm names segments with us

    shm_dir = default_dir() if shm_dir is None else shm_dir
    socket_dir = tempfile.gettempdir() if socket_dir is None else socket_dir
    return remove_orphans(shm_dir, SEGMENT_PREFIX) + remove_orphans(
        socket_dir, SOCKET_PREFIX, SOCKET_SUFFIX
    )
