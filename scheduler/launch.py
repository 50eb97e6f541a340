"""Start daemons as local processes on loopback and always clean them up.

Each daemon prints ``<name> listening on HOST:PORT`` as its first stdout line;
the launcher reads it (with a deadline) to learn the port it bound. On Linux a
daemon dies with its launcher, however the launcher ends (SIGKILL included):
the kernel sends it SIGTERM (``PR_SET_PDEATHSIG``, asked for by the daemon itself:
:mod:`protos.parent`), so it shuts down cleanly.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol

from protos.parent import LAUNCHER_ENV

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
# One OpenMP thread per process: a local cluster's processes share the machine's cores, and
# several processes' busy-waiting OpenMP threads on the same cores made training 5x slower.
SHARED_CORES_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launcher_env() -> dict[str, str]:
    """What makes a child end with this process (protos.parent); only a child started
    by the main thread, which lives as long as the process: the kernel ties the signal
    to the thread that starts the child."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {LAUNCHER_ENV: str(os.getpid())}


class Daemon:
    """A child process whose first stdout line says where it listens."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``wrap``: how argv runs elsewhere (on another host: benchmarks.hosts), keeping
        its process id, so that ``proc`` is the daemon itself."""
        self.name = Path(argv[0]).name
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {}), **launcher_env()}
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self._address: str | None = None
        self._failed: str | None = None  # why it did not start, once known
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
        if self._failed is not None:  # said once: its output is gone, do not wait for it
            raise RuntimeError(self._failed)
        try:
            return self._address_line()
        except RuntimeError as e:
            self._failed = str(e)
            raise

    def _address_line(self) -> str:
        name = self.name
        try:
            line = self.lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.stop()
            raise RuntimeError(
                f"{name} printed nothing within {START_TIMEOUT_S}s; see {self.log.name}"
            ) from None
        if line is None or " listening on " not in line:
            code, last = self.stop(), self.last_log_line()
            if line is None and (not last or code is None or code < 0):  # killed at start
                said = f"it exited with code {code} before it listened" + (
                    f"; its last log line: {last}" if last else ""
                )
            else:  # its own error, in its last log line
                said = last or f"it printed {line!r}"
            raise RuntimeError(f"{name} did not start: {said} (see {self.log.name})")
        return line.rsplit(" ", 1)[1]

    def how_it_ended(self) -> str:
        """Why it exited: killed by a signal, or its own last log line (its error)."""
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}: {self.last_log_line()} (see {self.log.name})"

    def last_log_line(self) -> str:
        """The last line the daemon wrote to its log (its error, when it failed), or ""."""
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, and SIGKILL after timeout_s; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.log.close()
        return self.proc.returncode


def stop_together(daemons: list[Daemon], timeout_s: float = 10.0) -> None:
    """Stop daemons as :meth:`Daemon.stop` does, all at once: SIGTERM to every one first,
    so that their shutdowns (a server's grace and last checkpoint) overlap."""
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.terminate()
    for d in daemons:
        d.stop(timeout_s)


class Host(Protocol):
    """Where a process runs: the address it listens on, and how a command runs there."""

    address: str

    def wrap(self, argv: list[str]) -> list[str]: ...


@contextmanager
def servers(
    n: int, log_dir: Path, *extra: str, hosts: Sequence[Host] | None = None
) -> Iterator[list[Daemon]]:
    """Start n ps-server processes through the CLI on free ports: on loopback, or server i on
    ``hosts[i]`` (benchmarks.hosts)."""
    with ExitStack() as stack:
        daemons = []
        for i in range(n):
            host = hosts[i] if hosts else None
            address = host.address if host else "127.0.0.1"
            argv = [str(BIN / "ps-server"), "--host", address, "--port", "0", *extra]
            d = Daemon(argv, log_dir / f"server{i}.log", wrap=host.wrap if host else None)
            stack.callback(d.stop)
            daemons.append(d)
        for d in daemons:  # started together, waited for together
            assert d.address
        yield daemons
