"""How a local cluster's run begins and ends: its work dir, and the signals that end it.

Each ``ps-cluster up`` is a new job. A run records itself in its work dir (the
marker file ``.ps-cluster``); a later run there clears the previous run's
scheduler state, server checkpoints and logs first (a new scheduler would
refuse the old state, new servers would restore the old weights), and only
those: the files a cluster writes, by their exact names, and only where the
marker says a cluster wrote them. A directory without the marker that holds
such a name is refused, not cleared. SIGTERM and SIGHUP end the launcher as
Ctrl-C does, so that every child is stopped; a temporary work dir goes with a
run that ends well or is stopped, and stays, with the logs, when the job fails.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# What a local cluster writes in its work dir (its data, prepared there, is not a run's).
MARKER = ".ps-cluster"  # a run was here: what follows may be cleared by the next one
STATE_FILE = "scheduler.db"  # the scheduler's SQLite state
JOB_FILE = "cluster-job.json"  # the job the scheduler runs (a name no --config is likely to have)
ADDRESSES = "cluster.json"  # where `ps-cluster status` finds the scheduler
CHECKPOINTS = "checkpoints"  # one directory per server: server0, server1, ...
GENERATED = re.compile(
    r"scheduler\.db(-wal|-shm|\.lock)?|cluster-job\.json|cluster\.json"
    r"|scheduler\d*\.log|server\d+(-\d+)?\.log|worker\d+(-\d+)?\.log"
)
SERVER_CHECKPOINTS = re.compile(r"server\d+")
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class WorkDirError(OSError):
    """A work dir a run may not use; the message says why, in one line."""


def generated(work_dir: Path) -> list[Path]:
    """What a cluster writes that is in ``work_dir`` now, by the exact names it gives."""
    found = [p for p in work_dir.iterdir() if GENERATED.fullmatch(p.name)]
    checkpoints = work_dir / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        found += [p for p in checkpoints.iterdir() if SERVER_CHECKPOINTS.fullmatch(p.name)]
    return sorted(found)


def check_work_dir_use(work_dir: Path, config: Path | None) -> None:
    """WorkDirError when a run could not keep its work dir to itself: a ``--config`` that
    is a file a cluster writes (and clears) there, or a ``checkpoints`` that is a symbolic
    link (a next run could not clear it, and its servers would restore the old weights)."""
    work = work_dir.resolve()
    if config is not None:
        real = config.resolve()
        written = (
            real.name == MARKER or GENERATED.fullmatch(real.name) is not None
            if real.parent == work
            else real.is_relative_to(work / CHECKPOINTS)
        )
        if written:
            raise WorkDirError(f"--config {config}: a cluster writes (and clears) that file")
    if (work_dir / CHECKPOINTS).is_symlink():
        raise WorkDirError(
            f"work dir {work_dir}: {CHECKPOINTS} is a symbolic link; the cluster keeps its "
            "servers' checkpoints there and clears them between runs: make it a directory"
        )


class Claim:
    """A run's hold on its work dir: the marker file, which records that a run was here
    (its pid) and is locked (``flock``) until ``release()``, so that two runs never share
    one work dir. ``previous``: whether an earlier run had recorded itself there.

    A directory that no run recorded itself in, but that holds a name a cluster writes
    (a ``worker0.log`` of the person's, say), is refused with WorkDirError rather than
    cleared or overwritten later; so is one another run holds."""

    def __init__(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        marker = work_dir / MARKER
        flags = os.O_RDWR | os.O_NOFOLLOW
        try:
            self.fd = os.open(marker, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not marker.is_file() or marker.is_symlink():
                raise WorkDirError(
                    f"work dir {work_dir}: {MARKER} is not a ps-cluster marker file"
                ) from None
            self.fd = os.open(marker, flags)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise WorkDirError(
                f"work dir {work_dir} is in use by another ps-cluster (pid {pid})"
            ) from None
        self.previous = bool(os.pread(self.fd, 32, 0).strip())  # a run wrote its pid
        if not self.previous and (found := generated(work_dir)):
            marker.unlink()
            self.release()
            names = ", ".join(str(p.relative_to(work_dir)) for p in found[:3])
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise WorkDirError(
                f"work dir {work_dir} holds {names}{more}, which no ps-cluster run recorded "
                "writing there; move them or choose another work dir"
            )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let another run use the work dir (the marker stays: this run was here)."""
        if self.fd >= 0:
            os.close(self.fd)  # which drops the lock
            self.fd = -1


def clear_previous_run(work_dir: Path) -> list[str]:
    """Remove what an earlier run wrote in ``work_dir`` (the names a cluster gives, and
    only where its marker is); returns the names removed."""
    if not (work_dir / MARKER).is_file():
        return []  # never the person's files: only where a run was (see Claim)
    removed = []
    for path in generated(work_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(work_dir)))
    checkpoints = work_dir / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the cluster made it; what else is in there stays
    return removed


def first_unused(work_dir: Path, name: Callable[[int], str]) -> Path:
    """``work_dir / name(n)`` for the first n (0, 1, ...) naming nothing there yet."""
    return next(work_dir / name(n) for n in itertools.count() if not (work_dir / name(n)).exists())


class WorkDir:
    """``--work-dir``, or a temporary directory removed at the end unless ``keep`` is set."""

    def __init__(self, given: Path | None) -> None:
        self.temporary = given is None
        self.path = Path(tempfile.mkdtemp(prefix="ps-cluster-")) if given is None else given
        self.keep = False  # set when the job failed: its logs say why
        self.hold: Claim | None = None

    def claim(self) -> Claim:
        """Hold the work dir for this run (WorkDirError if another run holds it)."""
        self.hold = Claim(self.path)
        return self.hold

    def describe(self) -> str:
        if self.temporary:
            return f"work dir {self.path} (temporary: removed at the end, kept if the job fails)"
        return f"work dir {self.path}"

    def finish(self) -> None:
        if self.hold is not None:
            self.hold.release()
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
    thread is, as Ctrl-C (SIGINT, even if it was ignored when the launcher started)
    raises KeyboardInterrupt, so with-blocks stop the children; further ones are ignored
    while they do."""
    fired = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in ENDING_SIGNALS}
    # Ctrl-C as Python's: a shell that runs `ps-cluster up &` from a script starts it with
    # SIGINT ignored, and `kill -INT` did nothing
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
