"""Kit for the property-based fuzz tests of both services (tests/test_fuzz_*.py).

Hostile values for every kind of field, an asyncio loop on a thread that serves a
service in-process, raw calls (bytes in, bytes out), the statuses the README's Errors
table documents, and :func:`judge`: the one check of a call's status against the
statuses its input calls for.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from protos import ps_pb2, rpc, scheduler_pb2_grpc
from protos.codec import INDEX_DTYPE, CodecError, decode_frame
from protos.compression import Compression
from protos.job import Job, Mode, Settings
from protos.jobspec import JobSpec
from protos.layout import plan_layout
from protos.limits import Limits
from protos.optimizers import SGD
from protos.security import ServerSecurity
from ps_server.service import ServiceConfig, start_server
from ps_server.store import ParameterStore
from scheduler.service import start_scheduler
from scheduler.state import SchedulerState
from tests.storekit import PART_BYTES, SPECS

T = TypeVar("T")
Code = grpc.StatusCode
OK, INVALID, NOT_FOUND = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND
FAILED, EXISTS = Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS
NEVER = frozenset({Code.UNKNOWN, Code.INTERNAL})  # a handler's bug, whatever the input
MAX_ID = Limits().max_id_chars
README = Path(__file__).resolve().parent.parent / "README.md"


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings of every fuzz test: derandomized (a failure reproduces on the
    next run and in CI), no deadline (calls share a loop thread), no example database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------ the README


def documented_statuses(readme: Path = README) -> list[str]:
    """The status names of the README's Errors table, in its order."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| ([A-Z_]+) \|", section, flags=re.MULTILINE)


# ------------------------------------------------------------ hostile values

CONTROL = "".join(chr(c) for c in (*range(0, 32), 127))
U64_EDGES = (0, 1, 2, 255, 2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
U32_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)
FLOAT_EDGES = (math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 1e308, -1e308, 5e-324)


class Huge(str):
    """A long string that prints short (in hypothesis' falsifying examples)."""

    def __new__(cls, char: str, n: int) -> Huge:
        text = super().__new__(cls, char * n)
        text.shown = f"{char!r} * {n}"
        return text

    def __repr__(self) -> str:
        return self.shown


u64 = st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)
u32 = st.sampled_from(U32_EDGES) | st.integers(0, 2**32 - 1)
doubles = st.sampled_from(FLOAT_EDGES) | st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(
    st.just(""),
    st.just("x" * MAX_ID),  # at the limit: allowed
    st.just("x" * (MAX_ID + 1)),  # one over
    st.just(Huge("y", 100_000)),
    st.text(alphabet=CONTROL, min_size=1, max_size=8),
    st.text(max_size=12),  # any unicode, surrogates excluded by hypothesis
    st.just("\u202e\u0000é字🙂"),
)


def brief(value: object, width: int = 120) -> str:
    """A value for a failure message: each long line (a huge id) cut short."""
    text = value if isinstance(value, str) else str(value)
    lines = [
        line if len(line) <= width else f"{line[:width]}... ({len(line)} characters)"
        for line in (text.splitlines() or [""])
    ]
    return repr("\n".join(lines)) if isinstance(value, str) else " ".join(lines)


def too_long(*values: str) -> bool:
    return any(len(v) > MAX_ID for v in values)


def garbage(message_type: type[Message], max_size: int = 48) -> st.SearchStrategy[bytes]:
    """Bytes that do not parse as ``message_type``: random, truncated or overlong."""
    overlong = b"\x08" + b"\xff" * 11  # a varint of 11 bytes
    return (
        st.sampled_from([b"\xff", b"\x0a\xff\x01", overlong, b"\x0a\x05abc", b"\x07"])
        | st.binary(min_size=1, max_size=max_size)
    ).filter(lambda b: not parses(message_type, b))


def parses(message_type: type[Message], data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


# ------------------------------------------------------------------ outcomes


def outcome(call: Callable[[], T]) -> tuple[Code, T | grpc.RpcError]:
    """(status, the reply or the error) of a call."""
    try:
        return OK, call()
    except grpc.RpcError as e:
        return e.code(), e


def judge(
    code: Code,
    reply: object,
    refuse: set[Code] | frozenset[Code],
    maybe: set[Code] | frozenset[Code] = frozenset(),
    what: str = "",
) -> None:
    """Check a call's status against its input.

    ``refuse``: the statuses the input's defects call for (the server may name any one);
    empty: a well-formed request that must succeed. ``maybe``: statuses an input may
    also get where the README leaves it open (e.g. control characters in an id).
    """
    details = reply.details() if isinstance(reply, grpc.RpcError) else ""
    assert code not in NEVER - set(refuse) - set(maybe), (
        f"{what}: {code.name} ({details!r}) is never a documented answer"
    )
    allowed = (set(refuse) | set(maybe)) - {OK} if refuse else {OK} | set(maybe)
    names = sorted(c.name for c in allowed)
    assert code in allowed, f"{what}: got {code.name} ({details!r}); expected one of {names}"


# ---------------------------------------------------------- a loop on a thread


class LoopThread:
    """An asyncio loop running on a daemon thread: in-process grpc.aio servers live on it
    while the test's blocking client calls run on the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop, between handlers."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def raw_unary(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary method called with bytes, answering bytes (no serializers)."""
    return channel.unary_unary(path)


def raw_stream(channel: grpc.Channel, path: str) -> grpc.StreamUnaryMultiCallable:
    return channel.stream_unary(path)


def raw_server_stream(channel: grpc.Channel, path: str) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(path)


# ------------------------------------------------- the parameter server, in-process

GOOD = "good"  # the worker whose valid push and pull prove the server healthy
OBSERVER = "fuzz-observer"


@dataclass
class Held:
    """The job the fuzz server holds now, and its healthy client's session and clock."""

    job: Job
    session: str
    clock: int = 0

    @property
    def job_id(self) -> str:
        return self.job.job_id


def fuzz_job(job_id: str, mode: str = "async", topk: float = 0.0, workers=()) -> Job:
    """storekit's three tensors (six parts on one server) under SGD, lr 0.5."""
    settings = Settings(
        mode=Mode(mode),
        optimizer=SGD(),
        lr=0.5,
        part_bytes=PART_BYTES,
        staleness=0,
        compression=Compression(topk_ratio=topk),
    )
    return Job(job_id, settings, plan_layout(SPECS, 1, PART_BYTES), 0, tuple(workers))


def sparse(job: Job) -> bool:
    return bool(job.settings.compression.topk_ratio)


def gradient(job: Job, value: float = 0.0) -> list[ps_pb2.TensorChunk]:
    """A valid gradient of ``value``: every part dense, or (top-k) its first element."""
    out = []
    for part in job.layout.parts_on(job.server_index):
        wire = job.layout.dtypes[part.tensor]
        n = 1 if sparse(job) else part.count
        chunk = ps_pb2.TensorChunk(
            tensor=part.tensor,
            part=part.index,
            dtype=wire.proto,
            data=np.full(n, value, dtype=wire.raw).tobytes(),
        )
        if sparse(job):
            chunk.indices = np.arange(n, dtype=INDEX_DTYPE).tobytes()
        out.append(chunk)
    return out


def initial(job: Job) -> list[ps_pb2.TensorChunk]:
    """Initial values (dense) of every part: 1.0 everywhere."""
    dense = Job(job.job_id, replace(job.settings, compression=Compression()), job.layout)
    return gradient(dense, 1.0)


def stream(header_field: str, header: Message, chunks: list) -> list[bytes]:
    """One stream message (Init or Push) carrying the header and the chunks."""
    message_type = ps_pb2.InitRequest if header_field == "init" else ps_pb2.PushRequest
    return [message_type(header=header, chunks=chunks).SerializeToString()]


class FuzzServer:
    """A ParameterService on 127.0.0.1, in this process (same-host segments in ``shm_dir``);
    its liveness window is long, so the healthy worker's id stays its own."""

    def __init__(self, shm_dir: str, token: str | None = None) -> None:
        self.loop = LoopThread()
        self.store = ParameterStore(liveness_s=3600.0)
        self.shm_dir = shm_dir
        config = ServiceConfig(shm_dir=shm_dir)
        self.server, port, _ = self.loop.run(
            start_server(self.store, "127.0.0.1:0", config, ServerSecurity(token=token))
        )
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address, options=rpc.channel_options())
        self.calls = rpc.calls(self.channel)
        self.held: Held | None = None

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(None))
        self.loop.close()

    def method(self, name: str) -> str:
        return rpc.method(name)

    def hold(self, job: Job) -> Held:
        """End whatever job is held, init ``job``, and prove it healthy."""
        if self.held is not None:
            self.calls.end_job(ps_pb2.EndJobRequest(job_id=self.held.job_id), timeout=10)
        header = ps_pb2.InitHeader(config=job.to_proto())
        self.calls.init(iter(stream("init", header, initial(job))), timeout=10)
        self.held = Held(job, uuid.uuid4().hex)
        self.healthy()
        return self.held

    def status(self) -> ps_pb2.StatusResponse:
        return self.calls.status(ps_pb2.StatusRequest(), timeout=10)

    def snapshot(self) -> tuple[bytes, bytes]:
        """Everything Status says, and the weights an observing pull reads."""
        assert self.held is not None
        status = self.status().SerializeToString(deterministic=True)
        pull = ps_pb2.PullRequest(job_id=self.held.job_id, worker_id=OBSERVER, observe=True)
        return status, b"".join(self.calls.pull(pull, timeout=10))

    def healthy(self) -> None:
        """A valid push (of zeros) by the healthy worker is applied and a pull reads it."""
        held = self.held
        assert held is not None
        version = self.status().version
        held.clock += 1
        header = ps_pb2.PushHeader(
            job_id=held.job_id,
            worker_id=GOOD,
            clock=held.clock,
            pulled_version=version,
            session=held.session,
        )
        reply = self.calls.push(iter(stream("push", header, gradient(held.job))), timeout=10)
        assert reply.applied and reply.version == version + 1, reply
        request = ps_pb2.PullRequest(job_id=held.job_id, worker_id=GOOD, session=held.session)
        frames = [decode_frame(m) for m in self.calls.pull(request, timeout=10)]
        assert frames[0].header is not None
        assert ps_pb2.PullHeader.FromString(bytes(frames[0].header)).version == version + 1
        got = sorted((c.tensor, c.part) for f in frames for c in f.chunks)
        assert got == sorted((p.tensor, p.index) for p in held.job.layout.parts_on(0))


# ----------------------------------------------------- malformed tensor data

DENSE_FLAWS = ("drop", "duplicate", "part", "tensor", "dtype", "ragged", "extra", "short",
               "offset", "nonfinite", "indices")  # fmt: skip
SPARSE_FLAWS = ("drop", "duplicate", "part", "tensor", "dtype", "ragged", "offset", "nonfinite",
                "dup_index", "index_range", "index_count", "index_ragged", "dense")  # fmt: skip


def flaws(job: Job) -> tuple[str, ...]:
    """The ways :func:`corrupt` can break a gradient of ``job``: each is INVALID_ARGUMENT."""
    return SPARSE_FLAWS if sparse(job) else DENSE_FLAWS


def corrupt(flaw: str, chunks: list[ps_pb2.TensorChunk], draw, job: Job) -> list:
    """A copy of a valid gradient's chunks with one flaw (``draw``: hypothesis' draw)."""
    out = [ps_pb2.TensorChunk() for _ in chunks]
    for copy, chunk in zip(out, chunks, strict=True):
        copy.CopyFrom(chunk)
    i = draw(st.integers(0, len(out) - 1))
    c = out[i]
    wire = job.layout.dtypes[c.tensor]
    parts = sum(1 for p in job.layout.parts if p.tensor == c.tensor)
    count = next(p.count for p in job.layout.parts if (p.tensor, p.index) == (c.tensor, c.part))
    names = {s.name for s in job.layout.specs}
    if flaw == "drop":
        del out[i]
    elif flaw == "duplicate":
        out.append(c)
    elif flaw == "part":
        c.part = draw(st.sampled_from([parts, 2**32 - 1]) | st.integers(parts, 2**32 - 1))
    elif flaw == "tensor":
        c.tensor = draw(texts.filter(lambda t: t not in names))
    elif flaw == "dtype":
        c.dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99, 2**31 - 1]).filter(
            lambda d: d != wire.proto))  # fmt: skip
    elif flaw == "ragged":
        c.data += b"\x00" * draw(st.integers(1, wire.itemsize - 1))
    elif flaw == "extra":
        c.data += bytes(wire.itemsize * draw(st.integers(1, 3)))
    elif flaw == "short":
        c.data = c.data[: -wire.itemsize]
    elif flaw == "offset":
        c.offset = draw(st.sampled_from([1, count, 2**63 - 1, 2**64 - 1]) | u64.filter(bool))
    elif flaw == "nonfinite":
        values = np.frombuffer(c.data, wire.raw).copy()
        values[draw(st.integers(0, values.size - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))  # fmt: skip
        c.data = values.tobytes()
    elif flaw == "indices":  # top-k indices in a dense job
        c.indices = np.zeros(count, INDEX_DTYPE).tobytes()
    elif flaw == "dup_index":  # the same element twice in one chunk
        c.indices = np.zeros(2, INDEX_DTYPE).tobytes()
        c.data = np.zeros(2, wire.raw).tobytes()
    elif flaw == "index_range":
        c.indices = np.array([draw(st.integers(count, 2**32 - 1))], INDEX_DTYPE).tobytes()
    elif flaw == "index_count":
        c.indices += np.array([1], INDEX_DTYPE).tobytes()
    elif flaw == "index_ragged":
        c.indices += b"\x00"
    elif flaw == "dense":  # values without indices in a top-k job
        c.ClearField("indices")
    else:
        raise AssertionError(flaw)
    return out


# Whole-stream flaws of Init and Push (lists of messages): each is INVALID_ARGUMENT.
STREAM_FLAWS = ("no_header", "header_twice", "empty", "truncated", "garbage", "longer",
                "bad_header")  # fmt: skip
BAD_HEADER = b"\x0a\x03\xff\xfe\xfd"  # a string field that is not UTF-8


def corrupt_stream(flaw: str, messages: list[bytes], draw, message_type) -> list[bytes]:
    """A stream of one message (header and chunks) broken one way."""
    (only,) = messages
    parsed = message_type.FromString(only)
    header, chunks = parsed.header, list(parsed.chunks)
    if flaw == "no_header":
        return [message_type(chunks=chunks).SerializeToString()]
    if flaw == "header_twice":
        return [only, message_type(header=header).SerializeToString()]
    if flaw == "empty":
        return []
    if flaw == "truncated":
        return [only[: draw(st.integers(1, len(only) - 1))]]
    if flaw == "garbage":
        junk = draw(st.binary(min_size=1, max_size=32).filter(lambda b: not empty_frame(b)))
        return [only, junk] if draw(st.booleans()) else [junk, only]
    if flaw == "longer":  # every part twice: a stream longer than the layout allows
        return [only, message_type(chunks=chunks).SerializeToString()]
    if flaw == "bad_header":
        return [b"\x0a" + bytes([len(BAD_HEADER)]) + BAD_HEADER + only[len(header_bytes(only)) :]]
    raise AssertionError(flaw)


def header_bytes(message: bytes) -> bytes:
    """The header field (tag, length, value) that starts a serialized stream message."""
    assert message[0] == 0x0A
    size, pos = 0, 1
    for shift in range(0, 64, 7):
        byte = message[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    return message[: pos + size]


def empty_frame(data: bytes) -> bool:
    """Whether bytes read as a stream message with no header and no chunks (a no-op)."""
    try:
        frame = decode_frame(data)
    except CodecError:
        return False
    return frame.header is None and not frame.chunks


# ------------------------------------------------------ the scheduler, in-process

TABLES = ("meta", "tasks", "completions", "workers", "evaluations")


class FuzzScheduler:
    """The scheduler service on 127.0.0.1 (as ps-scheduler serves it) over an in-memory
    state, with no parameter servers and no watch loop: nothing expires between calls."""

    def __init__(self, epochs: int = 1000, shards: int = 4) -> None:
        self.loop = LoopThread()
        self.state = SchedulerState(":memory:")
        spec = JobSpec(data_dir="d", epochs=epochs, lease_timeout_s=60.0)
        self.state.create_or_resume(spec, shards)

        self.server, port, _, _ = self.loop.run(start_scheduler(self.state, "127.0.0.1:0"))
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(None))
        self.loop.close()
        self.state.close()

    def tables(self) -> dict[str, list[tuple]]:
        """Every row of the state, read on the loop (between handlers)."""
        db = self.state.db
        return self.loop.call(
            lambda: {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in TABLES}
        )
