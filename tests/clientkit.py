"""A fake parameter server in this process, for socket-free tests of the client's transports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import torch

from protos import ps_pb2, status
from protos.codec import Piece, check_chunk, decode_frame, encode_frames, to_raw, to_torch
from protos.job import Job, Settings
from protos.layout import TensorSpec
from protos.shm import SegmentCache, segment_slots
from ps_worker.errors import from_rpc_error
from ps_worker.payload import Gradients, Plan

SPECS = [TensorSpec("w", "float32", (300,)), TensorSpec("b", "float64", (7,))]


def plan_of(servers: int = 2, **settings) -> Plan:
    return Plan(Job.for_model("job", SPECS, servers, Settings.build(part_bytes=256, **settings)))


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc raises it, from a status (with or without typed details)."""

    def __init__(self, st: grpc.Status) -> None:
        self._status = st

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def rpc_error(code: grpc.StatusCode, message: str) -> FakeRpcError:
    """A failed call with a code and a message, and no typed details."""
    return FakeRpcError(Status(code, message, None))


def refused(code: grpc.StatusCode, message: str, reason: str) -> FakeRpcError:
    """A failed call with a typed reason."""
    return FakeRpcError(status.status_with_reason(code, message, reason))


def refusal(reason: str | None) -> FakeRpcError:
    """ShmStep's refusal of a segment, with ``reason`` or (None) with the message alone."""
    message = "shm step: cannot open segment gradstore-x"
    code = grpc.StatusCode.INVALID_ARGUMENT
    if reason is None:  # the client must not read the message
        return rpc_error(code, message)
    return refused(code, message, reason)


class Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class FakeServer:
    """One server's share of the model in memory: SGD with lr 1 on pushes, weights on pulls,
    and ShmStep through a client's segment. ``refuse`` holds the errors the next ShmSteps
    raise."""

    def __init__(self, plan: Plan, server: int, shm_dir: str = "") -> None:
        self.layout = plan.layout
        self.server = server
        self.shm_dir = shm_dir
        self.parts = {(p.tensor, p.index): p for p in plan.layout.parts_on(server)}
        self.weights = {
            key: torch.arange(p.start, p.stop, dtype=plan.layout.dtypes[p.tensor].torch)
            for key, p in self.parts.items()
        }
        self.version = 0
        self.refuse: list[grpc.RpcError] = []
        self.calls: list[str] = []
        self.sessions: list[str] = []  # the session of every push header and pull request
        self.segments: SegmentCache | None = None
        self.opened: set[str] = set()  # the segments this server has mapped

    # the rpc.Calls a transport uses

    def push(self, frames: Iterator[bytes], timeout: float) -> ps_pb2.PushResponse:
        self.calls.append("push")
        header = None
        for message in frames:
            frame = decode_frame(message)
            header = header or frame.header
            self._apply(frame.chunks)
        push = ps_pb2.PushHeader.FromString(bytes(header))
        assert push.job_id == "job"
        self.sessions.append(push.session)
        return self._pushed()

    def pull(self, request: ps_pb2.PullRequest, timeout: float) -> Iterator[bytes]:
        self.calls.append("pull")
        self.sessions.append(request.session)
        return encode_frames(self._header(request).SerializeToString(), self._pieces(), 64)

    def step(self, message: bytes, timeout: float) -> bytes:
        self.calls.append("step")
        frame = decode_frame(message)
        header = ps_pb2.StepHeader.FromString(bytes(frame.header))
        self.sessions += [header.push.session, header.pull.session]
        self._apply(frame.chunks)
        pulled = self._header(header.pull, self._pushed())
        (reply,) = encode_frames(pulled.SerializeToString(), self._pieces(), 1 << 62)
        return reply

    def shm_step(self, request: ps_pb2.ShmStepRequest, timeout: float) -> ps_pb2.PullHeader:
        self.calls.append("shm")
        if self.refuse:
            raise self.refuse.pop(0)
        for field in ("push", "pull"):
            if request.HasField(field):
                self.sessions.append(getattr(request, field).session)
        slots, size = segment_slots(self.layout, self.server)
        if self.segments is None:
            self.segments = SegmentCache(self.shm_dir)
        segment = self.segments.get(request.segment, size)  # opened once, as a server does
        self.opened.add(request.segment)
        data = bytearray(size)  # copied through the file, as a server does
        segment.read_into(memoryview(data))
        views = {
            (s.part.tensor, s.part.index): torch.frombuffer(
                data,
                dtype=self.layout.dtypes[s.part.tensor].torch,
                count=s.part.count,
                offset=s.offset,
            )
            for s in slots
        }
        pushed = None
        if request.HasField("push"):
            for key, view in views.items():
                self.weights[key] -= view
            pushed = self._pushed()
        if request.HasField("pull"):
            for key, view in views.items():
                view.copy_(self.weights[key])
            segment.write(0, memoryview(data))
        return self._header(request.pull, pushed)

    def _apply(self, chunks) -> None:
        for chunk in chunks:
            part = self.parts[chunk.tensor, chunk.part]
            wire = self.layout.dtypes[part.tensor]
            values = to_torch(check_chunk(chunk, wire, part.count), wire)
            self.weights[chunk.tensor, chunk.part][chunk.offset : chunk.offset + len(values)] -= (
                values
            )

    def _pushed(self) -> ps_pb2.PushResponse:
        self.version += 1
        return ps_pb2.PushResponse(applied=True, version=self.version)

    def _header(self, request: ps_pb2.PullRequest, push=None) -> ps_pb2.PullHeader:
        return ps_pb2.PullHeader(version=self.version, worker_clock=request.clock, push=push)

    def _pieces(self) -> list[Piece]:
        return [
            Piece(t, i, 0, to_raw(w), self.layout.dtypes[t]) for (t, i), w in self.weights.items()
        ]


class FakeLink:
    """A link straight to a fake server: errors are translated as a real link does."""

    def __init__(self, server: FakeServer, kind: str = "tcp") -> None:
        self.address = f"fake:{server.server}"
        self.calls = server
        self.kind = kind
        self.connected: list[tuple[str, str]] = []
        self.statuses = 0

    def call(self, what: str, call: Callable, timeout_s: float):
        try:
            return call(self.calls, timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.address, what) from None

    def connect(self, target: str, kind: str) -> None:
        self.connected.append((target, kind))
        self.kind = kind

    def close(self) -> None:
        pass


def full_grads(plan: Plan, value: float) -> Gradients:
    return plan.gradients(
        {
            s.name: torch.full((s.numel,), value, dtype=plan.layout.dtypes[s.name].torch)
            for s in SPECS
        }
    )


def empty_dest() -> dict[str, torch.Tensor]:
    return {s.name: torch.full((s.numel,), -1.0, dtype=torch.float64) for s in SPECS}


def expected(plan: Plan, server: int, dest: dict[str, torch.Tensor], minus: float) -> None:
    """Every part of the server's share holds arange - minus; nothing else was written."""
    for name, values in dest.items():
        want = torch.full_like(values, -1.0)
        for p in plan.layout.parts_on(server):
            if p.tensor == name:
                want[p.start : p.stop] = torch.arange(p.start, p.stop) - minus
        torch.testing.assert_close(values, want, msg=name)
