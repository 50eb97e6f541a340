"""Tensor data in one description for every transport.

A push is :class:`Gradients`: each server's pieces for the wire, encoded
once, which a stream and a fused step message take alike, and the parts a
shared-memory segment copies as they are. A pull lands in a :class:`Sink`:
every part a server sends, as a wire chunk or as a segment's slot, is checked
against the layout and copied into place by the same code.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping

import torch

from protos.codec import Piece, RawChunk, check_chunk, decode_frame, to_torch, wire_dtype
from protos.job import Job
from protos.layout import Part
from protos.orphans import remove_orphans
from protos.shm import ALIGN, SEGMENT_PREFIX, Segment, segment_slots
from ps_worker.compress import GradientEncoder, PiecesFor
from ps_worker.errors import PSError

PartKey = tuple[str, int]  # (tensor, part index)
_ZEROS = memoryview(bytes(ALIGN))  # the padding between two parts of a segment


class Plan:
    """What a job fixes for moving its tensors: each server's parts, the push encoder
    (which holds top-k residuals) and the wire dtype of pulled weights, if any."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.layout = job.layout
        compression = job.settings.compression
        self.compressing = compression.enabled
        self.encoder = GradientEncoder(self.layout, compression)
        weight = compression.weight_dtype
        self.weight_wire = wire_dtype(weight) if weight else None
        self.parts = [
            {(p.tensor, p.index): p for p in self.layout.parts_on(i)}
            for i in range(self.layout.num_servers)
        ]

    def share_bytes(self, server: int) -> int:
        """Bytes of the model a server holds."""
        return sum(p.nbytes for p in self.parts[server].values())

    def gradients(self, flat: Mapping[str, torch.Tensor]) -> Gradients:
        return Gradients(self.encoder, flat)

    def sink(self, server: int, dest: Mapping[str, torch.Tensor], address: str) -> Sink:
        return Sink(self, server, dest, address)


class Gradients:
    """One push: the flat gradients, and each server's pieces for the wire, encoded (and
    top-k residuals moved) exactly once, at the first request, from whichever server's
    thread asks first."""

    def __init__(self, encoder: GradientEncoder, flat: Mapping[str, torch.Tensor]) -> None:
        self._encoder = encoder
        self._flat = flat
        self._lock = threading.Lock()
        self._encoded: PiecesFor | None = None

    def pieces(self, server: int) -> list[Piece]:
        with self._lock:
            if self._encoded is None:
                self._encoded = functools.cache(self._encoder.encode(self._flat))
        return self._encoded(server)

    def values(self, part: Part) -> torch.Tensor:
        """A part's gradient as it is, on its device (shared memory has no wire to encode for)."""
        return self._flat[part.tensor][part.start : part.stop]


class Sink:
    """Where one server's pulled parts go: slices of flat destination tensors."""

    def __init__(
        self, plan: Plan, server: int, dest: Mapping[str, torch.Tensor], address: str
    ) -> None:
        self._plan = plan
        self._parts = plan.parts[server]
        self._dest = dest
        self._address = address

    def frame(self, message: bytes) -> bytes | None:
        """Write a pulled message's chunks into place; its header's bytes, if it has one."""
        frame = decode_frame(message)
        for chunk in frame.chunks:
            self.chunk(chunk)
        return None if frame.header is None else bytes(frame.header)

    def chunk(self, chunk: RawChunk) -> None:
        """Check a wire chunk against the layout and write it (from the job's weight wire
        dtype, if it has one)."""
        part = self._parts.get((chunk.tensor, chunk.part))
        if part is None:
            raise PSError(
                f"server {self._address} sent tensor {chunk.tensor!r} part {chunk.part}, "
                "which the layout does not give it"
            )
        wire = self._plan.layout.dtypes[part.tensor]
        weight = self._plan.weight_wire
        if weight is not None and chunk.dtype == weight.proto:
            wire = weight
        self.put(part, chunk.offset, to_torch(check_chunk(chunk, wire, part.count), wire))

    def put(self, part: Part, offset: int, values: torch.Tensor) -> None:
        """Values of a part from element ``offset`` on, into place (converting dtype)."""
        start = part.start + offset
        self._dest[part.tensor][start : start + values.numel()].copy_(values)

    def place(self, part: Part) -> memoryview | None:
        """A part's destination as writable bytes, where its raw bytes can land as they are
        (CPU memory, contiguous, the layout's dtype); None: copy them with :meth:`put`."""
        dest = self._dest[part.tensor][part.start : part.stop]
        return raw_bytes(dest, self._plan.layout.dtypes[part.tensor].torch)


def raw_bytes(values: torch.Tensor, dtype: torch.dtype) -> memoryview | None:
    """A tensor's memory as bytes, if it is CPU memory, contiguous and of ``dtype``."""
    if values.device.type != "cpu" or values.dtype != dtype or not values.is_contiguous():
        return None
    return memoryview(values.detach().view(torch.uint8).numpy()).cast("B")


class SlotBuffers:
    """A buffer laid out as a server's segment (:func:`protos.shm.segment_slots`), with a
    torch view of every part in it: a shared-memory segment's, or a bulk connection's."""

    def __init__(self, buffer: memoryview, plan: Plan, server: int) -> None:
        slots, size = segment_slots(plan.layout, server)
        assert len(buffer) >= size, (len(buffer), size)
        self.size = size
        self.slots = slots  # by offset
        self.views: dict[PartKey, tuple[Part, torch.Tensor]] = {}
        for slot in slots:
            part = slot.part
            dtype = plan.layout.dtypes[part.tensor].torch
            view = (
                torch.frombuffer(buffer, dtype=dtype, count=part.count, offset=slot.offset)
                if part.count
                else torch.empty(0, dtype=dtype)
            )
            self.views[part.tensor, part.index] = (part, view)

    def write(self, grads: Gradients) -> None:
        """A push's gradients into their slots."""
        for part, view in self.views.values():
            view.copy_(grads.values(part))

    def read(self, sink: Sink) -> None:
        """Every slot, as the server left it, into the sink."""
        for part, view in self.views.values():
            sink.put(part, 0, view)

    def gathered(self, places: list[memoryview | None]) -> list[memoryview] | None:
        """The segment's bytes as a list of pieces, part i's from ``places[i]`` (in slot
        order), the padding between them zeros; None if a part has no place."""
        if any(p is None for p in places):
            return None
        pieces, at = [], 0
        for slot, place in zip(self.slots, places, strict=True):
            assert place is not None
            if slot.offset > at:
                pieces.append(_ZEROS[: slot.offset - at])
            pieces.append(place)
            at = slot.offset + len(place)
        if self.size > at:
            pieces.append(_ZEROS[: self.size - at])
        return pieces

    def gradients(self, grads: Gradients) -> list[memoryview] | None:
        """A push's bytes straight from the gradients (None: copy them with :meth:`write`)."""
        return self.gathered(
            [raw_bytes(grads.values(s.part), self.views[s.part.tensor, s.part.index][1].dtype)
             for s in self.slots]
        )  # fmt: skip

    def destinations(self, sink: Sink) -> list[memoryview] | None:
        """Where a pull's bytes land straight in place (None: read them with :meth:`read`);
        the padding lands in a scratch buffer."""
        pieces = self.gathered([sink.place(s.part) for s in self.slots])
        if pieces is None:
            return None
        return [memoryview(bytearray(len(p))) if p.readonly else p for p in pieces]


class SharedBuffers(SlotBuffers):
    """This client's segment for one server."""

    def __init__(self, segment: Segment, plan: Plan, server: int) -> None:
        super().__init__(segment.buffer, plan, server)
        self.segment = segment

    @classmethod
    def create(cls, directory: str, plan: Plan, server: int) -> SharedBuffers:
        _, size = segment_slots(plan.layout, server)
        remove_orphans(directory, SEGMENT_PREFIX)  # what killed clients left there
        return cls(Segment.create(directory, size), plan, server)

    def close(self) -> None:
        self.views.clear()
        self.segment.unlink()
        self.segment.close()
