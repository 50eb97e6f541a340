"""The same-host data path: tensor data in a shared-memory file, gRPC carrying only control.

A client on a server's host creates one segment per server: a file in the
server's shared-memory directory (``/dev/shm`` on Linux), sized for that
server's share of the model. Each part the server holds has a fixed place in
it (:func:`segment_slots`, computed from the layout by both sides). A push
writes the gradient there and sends a ``ShmStep`` naming the segment; the
server reads the gradient in place, and a pull's weights are written back
into the same places before the reply. Nothing but headers crosses the
socket, so a step costs a few memory copies instead of a trip through TCP.

The server opens only regular files named ``gradstore-<token>`` in its own
directory, never follows a link, and checks the size, so a request cannot
make it touch any other file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from protos.layout import Layout, Part

SEGMENT_PREFIX = "gradstore-"
_NAME = re.compile(rf"^{SEGMENT_PREFIX}[A-Za-z0-9_-]{{1,64}}$")
ALIGN = 64  # every part starts on a cache line


class SegmentError(ValueError):
    """A segment that does not exist, is not ours, or is too small."""


def default_dir() -> str:
    """Where segments live: /dev/shm (memory, not disk) when there is one."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


@dataclass(frozen=True)
class Slot:
    part: Part
    offset: int  # bytes from the start of the segment


def segment_slots(layout: Layout, server: int) -> tuple[list[Slot], int]:
    """Where each of a server's parts lives in its segment, and the segment's size."""
    slots, offset = [], 0
    for part in layout.parts_on(server):
        slots.append(Slot(part, offset))
        offset += -(-part.nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


class Segment:
    """One mapped segment file."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.size = size
        self.linked = True
        try:
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buffer = memoryview(self.map)

    @classmethod
    def create(cls, directory: str, size: int) -> Segment:
        """A new, zero-filled segment readable and writable by this user only."""
        path = os.path.join(directory, f"{SEGMENT_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd, size)

    @classmethod
    def open(cls, directory: str, name: str, min_size: int) -> Segment:
        """Map an existing segment a client created; SegmentError unless it is a safe one."""
        if not _NAME.match(name):
            raise SegmentError(f"bad segment name {name!r}")
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise SegmentError(f"cannot open segment {name!r}: {e.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < min_size:
            os.close(fd)
            raise SegmentError(
                f"segment {name!r} is not a regular file of at least {min_size} bytes"
            )
        return cls(path, fd, info.st_size)

    def close(self) -> None:
        """Unmap, unless a view is still in use (then the mapping goes with the last one)."""
        try:
            self.buffer.release()
            self.map.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Remove the file (once); the mapping stays valid for whoever holds it."""
        if self.linked:
            self.linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class SegmentCache:
    """The segments a server has mapped, by name.

    Clients unlink a segment's file as soon as the server has mapped it, so a
    crashed client leaves nothing behind in the directory; its memory goes
    when the server drops the mapping, after ``idle_s`` unused or when more
    than ``limit`` are mapped. A client whose segment was dropped makes a new one.
    """

    def __init__(self, directory: str, limit: int = 256, idle_s: float = 600.0) -> None:
        self.directory = directory
        self.limit = limit
        self.idle_s = idle_s
        self._open: OrderedDict[str, tuple[Segment, float]] = OrderedDict()

    def get(self, name: str, min_size: int, now: float | None = None) -> Segment:
        now = time.monotonic() if now is None else now
        found = self._open.pop(name, None)
        if found is not None and found[0].size >= min_size:
            self._open[name] = (found[0], now)
            return found[0]
        self._evict(now)
        segment = Segment.open(self.directory, name, min_size)
        if found is not None:
            found[0].close()
        self._open[name] = (segment, now)
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[1][0].close()
        return segment

    def _evict(self, now: float) -> None:
        """Unmap segments unused for idle_s (least recently used come first)."""
        while self._open:
            name, (segment, used) = next(iter(self._open.items()))
            if now - used < self.idle_s:
                return
            del self._open[name]
            segment.close()

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for segment, _ in self._open.values():
            segment.close()
        self._open.clear()
