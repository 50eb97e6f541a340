"""The same-host data path: tensor data in a shared-memory file, gRPC carrying only control.

A client on a server's host creates one segment per server: a file in the
server's shared-memory directory (``/dev/shm`` on Linux), sized for that
server's share of the model. Each part the server holds has a fixed place in
it (:func:`segment_slots`, computed from the layout by both sides). A push
writes the gradient there and sends a ``ShmStep`` naming the segment; the
server copies the gradient out, and a pull's weights are copied back into
the same places before the reply. Nothing but headers crosses the socket, so
a step costs a few memory copies instead of a trip through TCP.

The server opens only regular files named ``gradstore-<pid>-<token>`` in its
own directory, never follows a link, and checks the size, so a request cannot
make it touch any other file. It never maps a client's file (see
:class:`SegmentFile`): nothing a client does to its file can take it down.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from protos.layout import Layout, Part
from protos.orphans import owned_name

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
    """A client's segment: a file it made, mapped into its own memory."""

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
        """A new, zero-filled segment readable and writable by this user only, named after
        this process (:mod:`protos.orphans` removes it if the process dies before it does)."""
        path = os.path.join(directory, owned_name(SEGMENT_PREFIX))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            return cls(path, fd, size)  # closes fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            os.unlink(path)
            raise

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


class SegmentFile:
    """A client's segment as the server holds it: an open file, never mapped.

    The client can shrink its file at any time; a mapping of the lost pages
    would kill the server with SIGBUS. So the server copies through the file
    descriptor (pread, pwrite), where a shrunk file is a short read: a
    SegmentError, like any other segment it cannot use.
    """

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size  # when opened; the client may shrink it since

    @classmethod
    def open(cls, directory: str, name: str, min_size: int) -> SegmentFile:
        """Open an existing segment a client created; SegmentError unless it is a safe one."""
        if not _NAME.fullmatch(name):
            raise SegmentError(f"bad segment name {name!r}")
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise SegmentError(f"cannot open segment {name!r}: {e.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < min_size or info.st_nlink != 1:
            os.close(fd)  # (a second link: the name may lead to a file that is not a segment)
            raise SegmentError(
                f"segment {name!r} is not a regular file of at least {min_size} bytes with one name"
            )
        return cls(name, fd, info.st_size)

    def read_into(self, buffer: memoryview) -> None:
        """The segment's first len(buffer) bytes into buffer; SegmentError if it is shorter."""
        done, size = 0, len(buffer)
        try:
            while done < size:
                n = os.preadv(self.fd, [buffer[done:]], done)
                if n == 0:
                    raise SegmentError(
                        f"segment {self.name!r} shrank to {done} bytes, under the {size} needed"
                    )
                done += n
        except OSError as e:
            raise SegmentError(f"cannot read segment {self.name!r}: {e.strerror}") from None

    def check_size(self, min_size: int) -> None:
        """SegmentError unless the file (still) has min_size bytes."""
        try:
            size = os.fstat(self.fd).st_size
        except OSError as e:
            raise SegmentError(f"cannot stat segment {self.name!r}: {e.strerror}") from None
        if size < min_size:
            raise SegmentError(
                f"segment {self.name!r} shrank to {size} bytes, under the {min_size} needed"
            )

    def write(self, offset: int, data: memoryview) -> None:
        """Bytes into the segment at offset (a file shrunk meanwhile grows back: no harm)."""
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:  # e.g. ENOSPC: a full shared-memory directory
            raise SegmentError(f"cannot write segment {self.name!r}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentCache:
    """The segments a server holds open, by name, and the server's own buffer to read a
    push into.

    Clients unlink a segment's file as soon as the server has opened it, so a
    crashed client leaves nothing behind in the directory; its memory goes
    when the server closes the file, after ``idle_s`` unused or when more
    than ``limit`` are open. A client whose segment was dropped makes a new one.
    """

    def __init__(self, directory: str, limit: int = 256, idle_s: float = 600.0) -> None:
        self.directory = directory
        self.limit = limit
        self.idle_s = idle_s
        self._open: OrderedDict[str, tuple[SegmentFile, float]] = OrderedDict()
        self._scratch = mmap.mmap(-1, ALIGN)  # private memory, page aligned

    def get(self, name: str, min_size: int, now: float | None = None) -> SegmentFile:
        now = time.monotonic() if now is None else now
        found = self._open.pop(name, None)
        if found is not None and found[0].size >= min_size:
            self._open[name] = (found[0], now)
            return found[0]
        self._evict(now)
        segment = SegmentFile.open(self.directory, name, min_size)
        if found is not None:
            found[0].close()
        self._open[name] = (segment, now)
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[1][0].close()
        return segment

    def read(self, segment: SegmentFile, size: int) -> memoryview:
        """The segment's first size bytes, copied into the server's buffer; SegmentError if
        the file is shorter. The buffer is the next read's: use its data before an await."""
        if len(self._scratch) != size:  # a new job (the old buffer goes with its last view)
            self._scratch = mmap.mmap(-1, size)
        data = memoryview(self._scratch)[:size]
        segment.read_into(data)
        return data

    def _evict(self, now: float) -> None:
        """Close segments unused for idle_s (least recently used come first)."""
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
