"""How a push, a pull or a fused step reaches one server: one interface, three ways.

:class:`Streams` uses the Push and Pull streaming calls; :class:`UnaryStep`
is the same but sends a fused step as one Step message each way (for a
server whose share fits one message); :class:`SharedMemory` moves the tensor
data through a segment in the server's shared-memory directory and sends only
headers (ShmStep). Which one serves a server, and the fallback from shared
memory, are decided in :mod:`ps_worker.routes`.
"""

from __future__ import annotations

from typing import Protocol

from protos import ps_pb2
from protos.codec import encode_frames
from ps_worker.errors import PSError
from ps_worker.link import Link
from ps_worker.payload import Gradients, Plan, SharedBuffers, Sink

Step = tuple[ps_pb2.PushResponse, ps_pb2.PullHeader]


class Transport(Protocol):
    """Moves one server's share of a push and/or a pull; the protocol state writes the
    headers and reads the replies."""

    name: str

    def push(self, header: ps_pb2.PushHeader, grads: Gradients) -> ps_pb2.PushResponse: ...

    def pull(self, request: ps_pb2.PullRequest, sink: Sink) -> ps_pb2.PullHeader: ...

    def step(self, header: ps_pb2.StepHeader, grads: Gradients, sink: Sink) -> Step: ...


class Streams:
    """Push and Pull streams of messages of about ``chunk_bytes``; a step is a push, then
    a pull."""

    name = "streams"

    def __init__(
        self, link: Link, server: int, chunk_bytes: int, timeout_s: float, pull_timeout_s: float
    ) -> None:
        self.link = link
        self.server = server
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.pull_timeout_s = pull_timeout_s

    def push(self, header: ps_pb2.PushHeader, grads: Gradients) -> ps_pb2.PushResponse:
        data = header.SerializeToString()
        pieces = grads.pieces(self.server)
        return self.link.call(
            "push",
            lambda calls, t: calls.push(encode_frames(data, pieces, self.chunk_bytes), timeout=t),
            self.timeout_s,
        )

    def pull(self, request: ps_pb2.PullRequest, sink: Sink) -> ps_pb2.PullHeader:
        def call(calls, timeout: float) -> ps_pb2.PullHeader:
            header = None
            for message in calls.pull(request, timeout=timeout):
                data = sink.frame(message)
                header = header if data is None else data
            if header is None:
                raise PSError(f"server {self.link.address} sent no pull header")
            return ps_pb2.PullHeader.FromString(header)

        return self.link.call("pull", call, self.pull_timeout_s)

    def step(self, header: ps_pb2.StepHeader, grads: Gradients, sink: Sink) -> Step:
        return self.push(header.push, grads), self.pull(header.pull, sink)


class UnaryStep(Streams):
    """Streams, but a step is one Step message each way: one round trip instead of two."""

    name = "step"

    def step(self, header: ps_pb2.StepHeader, grads: Gradients, sink: Sink) -> Step:
        (message,) = encode_frames(header.SerializeToString(), grads.pieces(self.server), 1 << 62)

        def call(calls, timeout: float) -> ps_pb2.PullHeader:
            data = sink.frame(calls.step(message, timeout=timeout))
            if data is None:
                raise PSError(f"server {self.link.address} sent no step header")
            return ps_pb2.PullHeader.FromString(data)

        pulled = self.link.call("step", call, self.pull_timeout_s)
        return pulled.push, pulled


class SharedMemory:
    """Tensor data through this client's segment in the server's shared-memory directory;
    ShmStep carries the headers. A refused step raises the server's PSError, whose reason
    the router acts on."""

    name = "shm"

    def __init__(
        self, link: Link, server: int, directory: str, timeout_s: float, pull_timeout_s: float
    ) -> None:
        self.link = link
        self.server = server
        self.directory = directory
        self.timeout_s = timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.plan: Plan | None = None  # segments are laid out by the job's layout
        self.buffers: SharedBuffers | None = None
        self.verified = False  # the server has opened one of this client's segments

    def use(self, plan: Plan) -> None:
        """Lay out segments for this job from now on."""
        self.drop()
        self.plan = plan

    def push(self, header: ps_pb2.PushHeader, grads: Gradients) -> ps_pb2.PushResponse:
        return self._step(ps_pb2.ShmStepRequest(push=header), grads, None).push

    def pull(self, request: ps_pb2.PullRequest, sink: Sink) -> ps_pb2.PullHeader:
        return self._step(ps_pb2.ShmStepRequest(pull=request), None, sink)

    def step(self, header: ps_pb2.StepHeader, grads: Gradients, sink: Sink) -> Step:
        request = ps_pb2.ShmStepRequest(push=header.push, pull=header.pull)
        pulled = self._step(request, grads, sink)
        return pulled.push, pulled

    def _step(
        self, request: ps_pb2.ShmStepRequest, grads: Gradients | None, sink: Sink | None
    ) -> ps_pb2.PullHeader:
        if self.buffers is None:
            assert self.plan is not None, "a transfer needs the job"
            self.buffers = SharedBuffers.create(self.directory, self.plan, self.server)
        buffers = self.buffers
        if grads is not None:
            buffers.write(grads)
        request.segment = buffers.segment.name
        timeout = self.pull_timeout_s if sink is not None else self.timeout_s
        header = self.link.call(
            "shm step", lambda calls, t: calls.shm_step(request, timeout=t), timeout
        )
        self.verified = True
        buffers.segment.unlink()  # mapped on both sides: nothing is left behind by a crash
        if sink is not None:
            buffers.read(sink)
        return header

    def drop(self) -> None:
        """Close this client's segment; the next transfer makes a new one."""
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
