"""Start daemons as local processes on loopback and always clean them up.

Each daemon prints ``<name> listening on HOST:PORT`` as its first stdout line;
the launcher reads it (with a deadline) to learn the port it bound. On Linux a
daemon dies with its launcher, however the launcher ends (SIGKILL included):
the kernel sends it SIGTERM (``PR_SET_PDEATHSIG``), so it shuts down cleanly.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once here: a child between fork and exec must not load it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def die_with_launcher() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when this process ends, or None where
    that is not possible. The kernel ties it to the thread that forks the child, so only
    a child started by the main thread (which lives as long as the process) gets it."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, launcher = _PRCTL, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != launcher:  # the launcher ended before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class Daemon:
    """A child process whose first stdout line says where it listens."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = Path(argv[0]).name
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **env} if env else None
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=full_env,
            cwd=cwd,
            preexec_fn=die_with_launcher(),  # one prctl call between fork and exec
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self._address: str | None = None
        self._metrics_address: str | None = None

    @property
    def address(self) -> str:
        """HOST:PORT from the daemon's first line (waits for it, with a deadline)."""
        if self._address is None:
            self._address = self._read_address()
        return self._address

    @property
    def metrics_address(self) -> str:
        """HOST:PORT of the daemon's /metrics, from its "... metrics on HOST:PORT" line."""
        if self._metrics_address is None:
            if self.name != "ps-worker":
                assert self.address  # its "listening on" line comes first
            self._metrics_address = self.wait_line(" metrics on ")
        return self._metrics_address

    def wait_line(self, marker: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """The last word of the next stdout line holding ``marker`` (skipping others)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"{self.name} exited before printing {marker.strip()!r}")
            if marker in line:
                return line.rsplit(" ", 1)[1]
        raise RuntimeError(f"{self.name} printed no {marker.strip()!r} within {timeout_s}s")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_address(self) -> str:
        name = self.name
        try:
            line = self.lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.stop()
            raise RuntimeError(
                f"{name} printed nothing within {START_TIMEOUT_S}s; see {self.log.name}"
            ) from None
        if line is None or " listening on " not in line:
            self.stop()
            said = self.last_log_line() or f"it printed {line!r}"
            raise RuntimeError(f"{name} did not start: {said} (see {self.log.name})")
        return line.rsplit(" ", 1)[1]

    def last_log_line(self) -> str:
        """The last line the daemon wrote to its log (its error, when it failed), or ""."""
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.log.close()
        return self.proc.returncode


@contextmanager
def servers(n: int, log_dir: Path, *extra: str) -> Iterator[list[Daemon]]:
    """Start n ps-server processes through the CLI on free loopback ports."""
    with ExitStack() as stack:
        daemons = []
        for i in range(n):
            argv = [str(BIN / "ps-server"), "--host", "127.0.0.1", "--port", "0", *extra]
            d = Daemon(argv, log_dir / f"server{i}.log")
            stack.callback(d.stop)
            daemons.append(d)
        for d in daemons:  # started together, waited for together
            assert d.address
        yield daemons
