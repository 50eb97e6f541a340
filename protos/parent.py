"""A daemon started by a launcher ends with it, however the launcher ends (SIGKILL too).

The launcher (``scheduler.launch.Daemon``) names itself in ``PS_LAUNCHER_PID``; the
daemon, first thing in its ``main``, asks the kernel for SIGTERM when that process's
starting thread ends (Linux ``PR_SET_PDEATHSIG``), so it shuts down cleanly. It is
done in the child after exec rather than in a ``preexec_fn``: a ``preexec_fn`` makes
Python fork() instead of spawn, and fork() in a launcher that has gRPC threads running
can hang in gRPC's fork handlers (it did: a test's launcher never returned).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_ENV = "PS_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """If a launcher started this process (``PS_LAUNCHER_PID``), end when it ends."""
    launcher = os.environ.pop(LAUNCHER_ENV, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(launcher):  # it ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
