"""How a local cluster's run begins and ends: its work dir, and the signals that end it.

Each ``ps-cluster up`` is a new job: in a work dir used before, the previous
run's scheduler state, server checkpoints and logs are cleared first (a new
scheduler would refuse the old state, new servers would restore the old
weights). SIGTERM and SIGHUP end the launcher as Ctrl-C does, so that every
child is stopped; a temporary work dir goes with a run that ends well or is
stopped, and stays, with the logs, when the job fails.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What a local cluster writes in its work dir (its data, prepared there, is not a run's).
STATE_FILE = "scheduler.db"  # the scheduler's SQLite state
JOB_FILE = "job.json"  # the job the scheduler runs
ADDRESSES = "cluster.json"  # where `ps-cluster status` finds the scheduler
CHECKPOINTS = "checkpoints"  # one directory per server
LOGS = ("scheduler*.log", "server*.log", "worker*.log")
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def clear_previous_run(work_dir: Path) -> list[str]:
    """Remove what an earlier run left in ``work_dir``; returns the names removed."""
    removed = []
    for name in (STATE_FILE, f"{STATE_FILE}-wal", f"{STATE_FILE}-shm", JOB_FILE, ADDRESSES):
        path = work_dir / name
        if path.exists():
            path.unlink()
            removed.append(name)
    if (work_dir / CHECKPOINTS).exists():
        shutil.rmtree(work_dir / CHECKPOINTS)
        removed.append(CHECKPOINTS)
    for pattern in LOGS:
        for path in sorted(work_dir.glob(pattern)):
            path.unlink()
            removed.append(path.name)
    return removed


class WorkDir:
    """``--work-dir``, or a temporary directory removed at the end unless ``keep`` is set."""

    def __init__(self, given: Path | None) -> None:
        self.temporary = given is None
        self.path = Path(tempfile.mkdtemp(prefix="ps-cluster-")) if given is None else given
        self.keep = False  # set when the job failed: its logs say why

    def describe(self) -> str:
        if self.temporary:
            return f"work dir {self.path} (temporary: removed at the end, kept if the job fails)"
        return f"work dir {self.path}"

    def finish(self) -> None:
        if self.temporary and not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


class Terminated(Exception):
    """The launcher got SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def ending_signals_raise() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGHUP raises Terminated where the main
    thread is, as Ctrl-C raises KeyboardInterrupt, so with-blocks stop the children;
    further ones are ignored while they do."""
    fired = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in ENDING_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
