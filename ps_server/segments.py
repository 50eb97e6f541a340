"""Tensor data laid out as a segment (:func:`protos.shm.segment_slots`), wherever it lives:
a same-host client's shared-memory file (:class:`ShmSlots`) or the bulk data plane's
connection buffer (:mod:`ps_server.bulk`). Each is a :class:`SlotIO` that the service's
one slot step reads a push from and writes a pull into."""

from __future__ import annotations

from typing import NoReturn, Protocol

import grpc
import numpy as np

from protos.codec import Piece, RawChunk
from protos.job import Job
from protos.shm import SegmentCache, SegmentError, SegmentFile, Slot
from protos.status import SHM_SEGMENT_UNAVAILABLE, abort_with_reason
from ps_server.flat import PartKey


class SlotIO(Protocol):
    """Where a slot step's tensor data is; each method may abort the call."""

    name: str  # in error messages: "shm step", "bulk step"

    async def open(self, size: int, context) -> None:
        """Check that the data is usable for a segment of ``size`` bytes (before the
        step's other checks)."""

    async def read(self, size: int, context) -> memoryview:
        """The push's bytes: valid until the next await."""

    async def write(
        self, size: int, offsets: dict[PartKey, int], pieces: list[Piece], context
    ) -> None:
        """The pull's pieces into their places."""


def chunks_in(data: memoryview, slots: list[Slot], job: Job) -> list[RawChunk]:
    """A push's chunks as views of segment-laid-out bytes: every held part."""
    return [
        RawChunk(
            slot.part.tensor,
            slot.part.index,
            0,
            job.layout.dtypes[slot.part.tensor].proto,
            data[slot.offset : slot.offset + slot.part.nbytes],
        )
        for slot in slots
    ]


def piece_bytes(piece: Piece, offsets: dict[PartKey, int]) -> tuple[int, memoryview]:
    """Where a pulled piece goes in a segment, and its bytes."""
    raw = piece.values
    start = offsets[piece.tensor, piece.part] + piece.offset * raw.itemsize
    return start, memoryview(np.ascontiguousarray(raw).view(np.uint8))


class ShmSlots:
    """A same-host client's segment, named in its ShmStep request; every refusal of the
    segment carries SHM_SEGMENT_UNAVAILABLE, on which the client makes a new one."""

    name = "shm step"

    def __init__(self, cache: SegmentCache, segment: str) -> None:
        self.cache = cache
        self.segment_name = segment
        self.segment: SegmentFile | None = None

    async def open(self, size: int, context) -> None:
        self.segment = await self._get(size, context)

    async def read(self, size: int, context) -> memoryview:
        # a copy in the server's buffer, which the next push reuses: nothing suspends
        # between this read and the push's apply
        assert self.segment is not None
        try:
            return self.cache.read(self.segment, size)
        except SegmentError as e:
            await self._refuse(context, e)

    async def write(
        self, size: int, offsets: dict[PartKey, int], pieces: list[Piece], context
    ) -> None:
        # The same segment, unless it was dropped while the pull waited: the client then
        # makes a new one, and its push is a duplicate.
        segment = await self._get(size, context)
        try:
            segment.check_size(size)
            for piece in pieces:
                segment.write(*piece_bytes(piece, offsets))
        except SegmentError as e:
            await self._refuse(context, e)

    async def _get(self, size: int, context) -> SegmentFile:
        try:
            return self.cache.get(self.segment_name, size)
        except SegmentError as e:
            await self._refuse(context, e)

    async def _refuse(self, context, error: SegmentError) -> NoReturn:
        # "shm step: cannot open segment" stays in the message for clients that read it
        await abort_with_reason(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"shm step: {error}",
            SHM_SEGMENT_UNAVAILABLE,
        )
