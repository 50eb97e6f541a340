"""A same-host client's segment as a push's chunks and as a pull's destination."""

from __future__ import annotations

import numpy as np

from protos.codec import Piece, RawChunk
from protos.job import Job
from protos.shm import SegmentFile, Slot
from ps_server.flat import PartKey


def chunks_in(data: memoryview, slots: list[Slot], job: Job) -> list[RawChunk]:
    """A push's chunks as views of a copy of the client's segment: every held part."""
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


def write_into(
    segment: SegmentFile, size: int, offsets: dict[PartKey, int], pieces: list[Piece]
) -> None:
    """Copy a pull's pieces to their places in the client's segment (of size bytes)."""
    segment.check_size(size)
    for piece in pieces:
        raw = piece.values
        start = offsets[piece.tensor, piece.part] + piece.offset * raw.itemsize
        segment.write(start, memoryview(np.ascontiguousarray(raw).view(np.uint8)))
