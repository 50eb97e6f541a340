"""Requests in and replies out, bounded: what a client sends is checked against
:class:`protos.job.Limits` before the server does work in proportion to its claims, and
what the server sends stays within its message limit.

A push or init stream is read header first: the header names the job, whose parts on
this server bound the bytes and chunks the rest of the stream may carry, so a stream that
carries more is refused at the first message over, not buffered whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from google.protobuf.message import DecodeError

from protos import ps_pb2
from protos.codec import (
    INDEX_DTYPE,
    CodecError,
    RawChunk,
    TooManyChunks,
    decode_chunks,
    split_header,
    wire_dtype,
)
from protos.job import Job, JobError
from protos.limits import Limits
from ps_server.errors import InvalidArgument
from ps_server.records import PullDecision, StoreView, Waiter

# A chunk's bytes besides its tensor name and data: keys, lengths, part, offset, dtype and
# the alignment padding (at most 17 bytes), with room to spare.
CHUNK_FRAMING = 64


def check_ids(limits: Limits, job_id: str, worker_id: str, session: str, worker: bool) -> None:
    """InvalidArgument for an id over the limits; ``worker``: the worker id may not be empty."""
    try:
        limits.check_id("job_id", job_id)
        limits.check_id("worker_id", worker_id, empty=not worker)
        limits.check_id("session", session)
    except JobError as e:
        raise InvalidArgument(str(e)) from None


def check_push(limits: Limits, h: ps_pb2.PushHeader) -> None:
    """A push header's ids (a worker id is required) and clocks within the limits."""
    check_ids(limits, h.job_id, h.worker_id, h.session, worker=True)
    _check_clocks(limits, ("clock", h.clock), ("pulled_version", h.pulled_version))


def check_pull(limits: Limits, r: ps_pb2.PullRequest) -> None:
    """A pull's ids (a worker id is required unless it observes) and clocks."""
    check_ids(limits, r.job_id, r.worker_id, r.session, worker=not r.observe)
    _check_clocks(limits, ("clock", r.clock), ("min_version", r.min_version))


def _check_clocks(limits: Limits, *values: tuple[str, int]) -> None:
    try:
        for name, value in values:
            limits.check_clock(name, value)
    except JobError as e:
        raise InvalidArgument(str(e)) from None


@dataclass(frozen=True)
class Budget:
    """What a stream for one job's parts on this server may carry."""

    job_id: str
    data_bytes: int  # tensor data: values and (top-k) their indices
    chunks: int
    message_bytes: int  # every message after the header, framing included

    @classmethod
    def of(cls, job: Job, limits: Limits, gradient: bool) -> Budget:
        """For a push (``gradient``: in the job's compression) or an init of ``job``."""
        compression = job.settings.compression
        grad = compression.gradient_dtype if gradient else None
        per_value = wire_dtype(grad).itemsize if grad else 0
        per_index = INDEX_DTYPE.itemsize if gradient and compression.topk_ratio else 0
        data = parts = name = 0
        for part in job.layout.parts_on(job.server_index):
            data += part.count * ((per_value or part.itemsize) + per_index)
            parts += 1
            name = max(name, len(part.tensor))
        chunks = parts + data // limits.chunk_grain_bytes + 1
        framing = chunks * (CHUNK_FRAMING + 4 * name)  # names: at most 4 UTF-8 bytes a character
        return cls(job.job_id, data, chunks, data + framing)


class Reader:
    """Counts a stream's messages against its budget while their chunks are read."""

    def __init__(self, what: str, budget: Budget) -> None:
        self.what, self.budget = what, budget
        self.chunks: list[RawChunk] = []
        self.messages = self.message_bytes = self.data_bytes = 0

    def read(self, rest: memoryview) -> None:
        """Read the chunks of one message (past its header); InvalidArgument over budget."""
        b = self.budget
        self.messages += 1
        self.message_bytes += len(rest)
        if self.messages > b.chunks + 1 or self.message_bytes > b.message_bytes:
            self._over(f"messages (over {b.chunks + 1}, or {b.message_bytes} bytes)")
        try:
            frame = decode_chunks(rest, b.chunks - len(self.chunks))
        except TooManyChunks:
            self._over(f"chunks (over {b.chunks})")
        except CodecError as e:
            raise InvalidArgument(f"{self.what}: {e}") from None
        if frame.header is not None:
            raise InvalidArgument(f"{self.what}: header repeated after the first message")
        for chunk in frame.chunks:
            self.data_bytes += len(chunk.data) + len(chunk.indices or b"")
        if self.data_bytes > b.data_bytes:
            self._over(f"tensor data (over {b.data_bytes} bytes)")
        self.chunks.extend(frame.chunks)

    def _over(self, what: str) -> NoReturn:
        raise InvalidArgument(
            f"{self.what}: the stream's {what} exceed what this server's parts of job "
            f"{self.budget.job_id!r} take; refused before the rest was read"
        )


def init_job(config: ps_pb2.JobConfig, limits: Limits) -> tuple[Job, Budget]:
    """The job an Init asks for and what its stream may carry (CPU work in proportion to
    the job's parts, within the limits: run it off the event loop)."""
    try:
        job = Job.from_proto(config, limits)
    except JobError as e:
        raise InvalidArgument(str(e)) from None
    return job, Budget.of(job, limits, gradient=False)


def read_header(message: bytes, header_type: Any, what: str) -> tuple[Any, memoryview]:
    """(the parsed header, the rest) of a stream's first message; InvalidArgument if its
    first field is not a header that parses."""
    try:
        head, rest = split_header(message)
        if head is None:
            raise CodecError("the first message must carry the header (as its first field)")
        return header_type.FromString(bytes(head)), rest
    except DecodeError as e:
        raise InvalidArgument(f"{what}: cannot parse {header_type.__name__}: {e}") from None
    except CodecError as e:
        raise InvalidArgument(f"{what}: {e}") from None


async def collect(
    stream: AsyncIterator[bytes],
    header_type: Any,
    what: str,
    budget_of: Callable[[Any], Awaitable[Budget]],
) -> tuple[Any, list[RawChunk]]:
    """Read a client stream: the header from the first message, then chunks within the
    budget its header allows (``budget_of`` refuses a header with a StoreError)."""
    reader: Reader | None = None
    header = None
    async for message in stream:
        if reader is None:
            header, rest = read_header(message, header_type, what)
            reader = Reader(what, await budget_of(header))
        else:
            rest = memoryview(message)
        reader.read(rest)
    if reader is None:
        raise InvalidArgument(f"{what}: empty stream")
    return header, reader.chunks


def status_reply(
    view: StoreView, waiting: list[tuple[Waiter, PullDecision]], where: dict[str, str], limit: int
) -> ps_pb2.StatusResponse:
    """The Status reply for a store's view and waiting pulls, within ``limit`` bytes."""
    assert view.job is not None
    c = view.counters
    reply = ps_pb2.StatusResponse(
        initialised=True,
        config=view.job.to_proto(),
        version=view.version,
        workers=[
            ps_pb2.WorkerState(worker_id=w.worker_id, clock=w.clock, active=w.active)
            for w in view.workers
        ],
        waiting=[
            ps_pb2.Waiter(worker_id=w.worker_id, reason=d.reason, waiting_for=d.waiting_for)
            for w, d in waiting
        ],
        updates_applied=c.updates_applied,
        pushes_received=c.pushes_received,
        stale_dropped=c.stale_dropped,
        duplicates=c.duplicates,
        staleness_histogram=dict(c.staleness),
        parameter_bytes=view.parameter_bytes,
        contributions=len(view.contributors),
        **where,
    )
    return fit_status(reply, limit)


def fit_status(reply: ps_pb2.StatusResponse, limit: int) -> ps_pb2.StatusResponse:
    """The reply within ``limit`` bytes: if over, fewer waiting pulls are listed (their
    reasons first cut short), then the staleness histogram's tail is folded into its
    largest listed staleness, then fewer workers are listed."""
    if reply.ByteSize() <= limit:
        return reply
    for waiter in reply.waiting:
        waiter.reason = waiter.reason[:200]
        del waiter.waiting_for[8:]
    while reply.waiting and reply.ByteSize() > limit:
        del reply.waiting[len(reply.waiting) // 2 :]
    histogram = reply.staleness_histogram
    while len(histogram) > 1 and reply.ByteSize() > limit:
        keys = sorted(histogram)
        keep = keys[: len(keys) // 2]
        folded = sum(histogram[k] for k in keys[len(keep) :])
        for k in keys[len(keep) :]:
            del histogram[k]
        histogram[keep[-1]] += folded
    while reply.workers and reply.ByteSize() > limit:
        del reply.workers[len(reply.workers) // 2 :]
    return reply
