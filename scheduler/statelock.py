"""One scheduler per state file: an exclusive lock on a sidecar ``STATE.lock``.

Two schedulers on one state file would hand out the same shards and overwrite
each other's job (``--fresh`` discards it). ``ps-scheduler`` takes the lock
(``flock``, released when the process ends, however it ends) before anything
touches the state, and the file records the holder's pid for the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateInUse(OSError):
    """Another process holds the state file; the message says which, in one line."""


def lock_path(state: Path) -> Path:
    """Beside the file the state path leads to: a symbolic link to a state file, or a path
    through one, shares that file's lock."""
    real = state.resolve()
    return real.with_name(real.name + ".lock")


def hold_state(state: Path) -> int:
    """Lock ``state`` for this process; returns the lock file's descriptor (closing it
    releases the lock). StateInUse when another process holds it, OSError when the lock
    file cannot be made."""
    fd = os.open(lock_path(state), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateInUse(
            f"state file {state} is in use by another ps-scheduler (pid {pid})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
