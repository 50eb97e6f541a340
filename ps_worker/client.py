"""The client library: drive a sharded parameter server from any training loop.

    client = Client(["127.0.0.1:7001", "127.0.0.1:7002"], job_id="mnist")
    client.init(model, mode="ssp", staleness=2, optimizer="adam", lr=1e-3)
    for batch in data:
        client.pull_into(model)          # waits as the job's mode requires
        loss_fn(model(batch)).backward()
        client.push_from(model)          # every server at once

Every call contacts all servers concurrently, carries a deadline, and is
retried (on UNAVAILABLE, or CANCELLED by a server shutting down, with backoff and
jitter) until it runs out.
Pushes are idempotent per ``(worker_id, clock)``, so retries are safe.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from protos import ps_pb2, rpc
from protos.codec import (
    DEFAULT_CHUNK_BYTES,
    CodecError,
    Piece,
    RawChunk,
    WireDType,
    check_chunk,
    decode_frame,
    dtype_of,
    encode_frames,
    to_raw,
    to_torch,
    wire_dtype,
)
from protos.job import Job, JobError, Settings
from protos.layout import (
    Layout,
    Part,
    TensorSpec,
    server_pieces,
)
from protos.security import ClientSecurity
from protos.shm import Segment, segment_slots
from ps_worker.compress import GradientEncoder, PiecesFor
from ps_worker.errors import InvalidRequestError, PSError, ServerUnavailableError
from ps_worker.retry import RETRYABLE, RetryPolicy, call_with_retry

T = TypeVar("T")
Tensors = Mapping[str, torch.Tensor | np.ndarray]


@dataclass(frozen=True)
class ClientConfig:
    """Deadlines and retries; units in the names."""

    timeout_s: float = 60.0  # deadline of init, push, status and membership calls
    pull_timeout_s: float = 300.0  # a pull may wait for the sync barrier or the ssp bound
    retries: int = 8  # attempts after the first, on UNAVAILABLE or CANCELLED
    backoff_s: float = 0.05  # first retry delay; doubles up to max_backoff_s, with jitter
    max_backoff_s: float = 2.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    same_host_unix_socket: bool = True  # reach a server on this host over its Unix socket
    same_host_shared_memory: bool = True  # and move tensor data through shared memory
    security: ClientSecurity | None = None  # the job's token and TLS, when it has them


@dataclass(frozen=True)
class PushSummary:
    """What the servers did with one push."""

    clock: int
    applied: bool  # applied (or, in sync, accumulated) by every server
    duplicate: bool  # a retry every server had already processed
    dropped: bool  # sync: too late for its step on some server
    staleness: tuple[int, ...]  # per server
    lr: tuple[float, ...]  # per server
    versions: tuple[int, ...]  # each server's version after this push


@dataclass
class _ServerState:
    address: str
    channel: grpc.Channel
    calls: rpc.Calls
    pulled_version: int = 0
    min_version: int = 0  # sync: the step the next pull waits for
    transport: str = "tcp"  # or "unix": the server's socket on this host
    shm_dir: str = ""  # the server is on this host and takes segments here
    shm: _SharedBuffers | None = None
    shm_verified: bool = False  # the server has opened one of this client's segments


@dataclass
class _SharedBuffers:
    """This client's segment for one server, with a torch view of every part in it."""

    segment: Segment
    views: dict[Part, torch.Tensor]

    @classmethod
    def create(cls, directory: str, layout: Layout, server: int) -> _SharedBuffers:
        slots, size = segment_slots(layout, server)
        segment = Segment.create(directory, size)
        views = {}
        for slot in slots:
            dtype = layout.dtypes[slot.part.tensor].torch
            views[slot.part] = (
                torch.frombuffer(
                    segment.buffer, dtype=dtype, count=slot.part.count, offset=slot.offset
                )
                if slot.part.count
                else torch.empty(0, dtype=dtype)
            )
        return cls(segment, views)

    def close(self) -> None:
        self.views.clear()
        self.segment.unlink()
        self.segment.close()


def default_worker_id() -> str:
    """Unique per process incarnation: a restarted worker is a new worker."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Client:
    """A worker's connection to every parameter server of one job.

    One training loop drives a client (pull and push are not meant to run
    concurrently on the same client); status() and set_membership() may be
    called from other threads at any time.
    """

    def __init__(
        self,
        servers: Sequence[str],
        job_id: str = "default",
        worker_id: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        if not servers:
            raise ValueError("at least one server address is needed")
        self.job_id = job_id
        self.worker_id = worker_id or default_worker_id()
        self.config = config or ClientConfig()
        self.clock = 0  # iterations this worker has pushed
        self._servers = []
        for address in servers:
            channel = self._channel(address)
            self._servers.append(_ServerState(address, channel, rpc.calls(channel)))
        # Headroom for a status() or set_membership() from another thread while a pull waits.
        self._policy = RetryPolicy(
            self.config.retries, self.config.backoff_s, self.config.max_backoff_s
        )
        self._pool = ThreadPoolExecutor(4 * len(servers), thread_name_prefix="ps-client")
        self._job: Job | None = None
        self._part_maps: dict[int, dict] = {}
        self._encoder: GradientEncoder | None = None  # set with the job
        self._weight_wire: WireDType | None = None  # the job's weight wire dtype, if any
        self._transport_lock = threading.Lock()
        self._transport_chosen = False

    # ------------------------------------------------------------ lifecycle

    def _channel(self, address: str) -> grpc.Channel:
        security = self.config.security or ClientSecurity()
        return security.channel(address, rpc.channel_options())

    def close(self) -> None:
        """Cancel calls in flight and release the connections."""
        for s in self._servers:
            s.channel.close()  # cancels in-flight calls, so the pool's threads finish
        self._pool.shutdown(wait=True)
        for s in self._servers:
            self._drop_shm(s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def servers(self) -> list[str]:
        return [s.address for s in self._servers]

    @property
    def transports(self) -> list[str]:
        """How each server is reached: "shm" (tensor data through shared memory, control
        over the Unix socket or TCP), "unix" (its socket, on this host) or "tcp"."""
        self._choose_transport()
        return ["shm" if s.shm_dir else s.transport for s in self._servers]

    def _choose_transport(self) -> None:
        """Once: switch to the Unix socket of every reachable server on this host."""
        if self._transport_chosen:
            return
        with self._transport_lock:
            if self._transport_chosen:
                return
            self._transport_chosen = True
            for s in self._servers:
                self._choose_for(s)

    def _choose_for(self, s: _ServerState) -> None:
        """Use shared memory and the Unix socket of a reachable server on this host."""
        config = self.config
        if not (config.same_host_unix_socket or config.same_host_shared_memory):
            return
        try:
            reply = s.calls.status(ps_pb2.StatusRequest(), timeout=5.0)
        except grpc.RpcError:
            return  # not reachable now: stay on TCP, retried as usual
        if reply.hostname != socket.gethostname():
            return
        compressing = self._job is not None and self._job.settings.compression.enabled
        if config.same_host_shared_memory and os.path.isdir(reply.shm_dir) and not compressing:
            s.shm_dir = reply.shm_dir  # given up if the server cannot open our segment
        path = reply.unix_socket.removeprefix("unix:")
        if not config.same_host_unix_socket or not path or not os.path.exists(path):
            return
        channel = self._channel(reply.unix_socket)
        old, s.channel, s.calls, s.transport = s.channel, channel, rpc.calls(channel), "unix"
        old.close()

    @property
    def versions(self) -> list[int]:
        """The version of each server's weights this worker last pulled."""
        return [s.pulled_version for s in self._servers]

    def wait_for_servers(self, timeout_s: float = 30.0) -> None:
        """Block until every server accepts connections; ServerUnavailableError if not."""
        deadline = time.monotonic() + timeout_s
        for s in self._servers:
            try:
                grpc.channel_ready_future(s.channel).result(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except grpc.FutureTimeoutError:
                raise ServerUnavailableError(
                    f"server {s.address} did not accept a connection within {timeout_s:.0f}s"
                ) from None

    # ----------------------------------------------------------------- init

    def init(
        self,
        tensors: Tensors | torch.nn.Module,
        settings: Settings | None = None,
        *,
        workers: Iterable[str] = (),
        **options: Any,
    ) -> bool:
        """Initialise the model on every server; True if this call created it.

        Safe to call from every worker: a server that already holds the
        identical job keeps its weights, and one holding a different job
        raises ConflictError. The job's settings are ``settings``, or the
        keywords :meth:`protos.job.Settings.build` takes: ``mode``, ``staleness``,
        ``backup_workers``, ``staleness_aware_lr``, ``optimizer`` (a name or an
        optimizer object), its options (``momentum``, ``beta1``, ...), ``lr``,
        ``lr_schedule`` (``constant`` or ``cosine:STEPS``), ``compression``
        (``fp16``, ``bf16``, ``topk:R``, ``bf16,topk:R``) and ``part_bytes``.
        ``workers`` are the initially active workers (needed for sync, whose
        barrier counts them); others join on contact.
        """
        try:
            if settings is None:
                settings = Settings.build(**options)
            elif options:
                raise JobError(f"give settings or keywords, not both ({', '.join(options)})")
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        named = _named(tensors)
        specs = [
            TensorSpec(n, _dtype_name(v), tuple(int(d) for d in v.shape)) for n, v in named.items()
        ]
        try:
            job = Job.for_model(self.job_id, specs, len(self._servers), settings, tuple(workers))
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        layout = job.layout
        flat = {n: to_raw(v) for n, v in named.items()}

        def init_one(i: int, s: _ServerState) -> bool:
            header = ps_pb2.InitHeader(config=job.for_server(i).to_proto()).SerializeToString()
            pieces = server_pieces(layout, i, flat)
            reply = self._retry(
                s,
                "init",
                lambda t: s.calls.init(self._frames(header, pieces), timeout=t),
                self.config.timeout_s,
            )
            return reply.created

        created = self._each(init_one)
        self._set_job(job)
        return any(created)

    def job(self) -> Job:
        """The job's configuration, fetched from the first server if this client did not init."""
        if self._job is None:
            reply = self.status()[0]
            if not reply.initialised:
                raise PSError(
                    f"server {self._servers[0].address} holds no model yet: "
                    "some worker must call init() first"
                )
            try:
                self._set_job(Job.from_proto(reply.config))
            except Exception as e:
                raise PSError(f"cannot read the job from {self._servers[0].address}: {e}") from e
        return self._job

    def _set_job(self, job: Job) -> None:
        self._job = job
        self._part_maps = {}
        self._encoder = GradientEncoder(job.layout, job.settings.compression)
        weight_dtype = job.settings.compression.weight_dtype
        self._weight_wire = wire_dtype(weight_dtype) if weight_dtype else None
        for s in self._servers:  # segments are laid out by the job's layout
            self._drop_shm(s)
            if job.settings.compression.enabled:
                s.shm_dir = ""  # compression is for the wire: shared memory has none

    @property
    def layout(self) -> Layout:
        return self.job().layout

    # ----------------------------------------------------------------- pull

    def pull(self, observe: bool = False) -> dict[str, torch.Tensor]:
        """Fetch every tensor (CPU), waiting as the mode requires.

        ``observe=True`` reads the current weights without waiting and without
        taking part in the job (for evaluation and monitoring).
        """
        layout = self.layout
        out = {
            s.name: torch.empty(s.numel, dtype=layout.dtypes[s.name].torch) for s in layout.specs
        }
        self._run_pull(out, observe)
        return {s.name: out[s.name].reshape(s.shape) for s in layout.specs}

    def pull_into(self, module: torch.nn.Module, observe: bool = False) -> None:
        """Overwrite a module's parameters in place, on whatever device they live."""
        dest, finish = self._module_destinations(module)
        self._run_pull(dest, observe)
        finish()

    def _module_destinations(
        self, module: torch.nn.Module
    ) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """Flat tensors to pull into, and a function that moves staged ones into the module.

        A contiguous CPU parameter of the job's dtype is written in place; others
        (on a GPU, say) are staged on the CPU and copied once each.
        """
        params = dict(module.named_parameters())
        layout = self.layout
        _check_names(layout, params.keys())
        dest = {}
        staged = {}
        for spec in layout.specs:
            p = params[spec.name].data
            if tuple(p.shape) != spec.shape:
                raise InvalidRequestError(
                    f"parameter {spec.name!r} has shape {tuple(p.shape)}, the job's is {spec.shape}"
                )
            wanted = layout.dtypes[spec.name].torch
            if p.device.type == "cpu" and p.is_contiguous() and p.dtype == wanted:
                dest[spec.name] = p.view(-1)
            else:
                dest[spec.name] = staged[spec.name] = torch.empty(spec.numel, dtype=wanted)

        def finish() -> None:
            with torch.no_grad():
                for name, flat in staged.items():
                    params[name].data.copy_(flat.view(params[name].shape))

        return dest, finish

    def _pull_request(self, clock: int, min_version: int, observe: bool) -> ps_pb2.PullRequest:
        return ps_pb2.PullRequest(
            job_id=self.job_id,
            worker_id=self.worker_id,
            clock=clock,
            min_version=min_version,
            observe=observe,
        )

    def _run_pull(self, dest: Mapping[str, torch.Tensor], observe: bool) -> None:
        def pull_one(i: int, s: _ServerState) -> ps_pb2.PullHeader:
            request = self._pull_request(self.clock, s.min_version, observe)
            if s.shm_dir:
                header = self._shm_step(i, s, None, 0, request, dest)
                if header is not None:
                    return header
            return self._pull_one(i, s, request, dest)

        headers = self._each(pull_one)
        if not observe:  # observing leaves the worker's own protocol state untouched
            self._after_pull(headers)

    def _pull_one(
        self, i: int, s: _ServerState, request: ps_pb2.PullRequest, dest: Mapping[str, torch.Tensor]
    ) -> ps_pb2.PullHeader:
        def call(timeout: float) -> ps_pb2.PullHeader:
            header = None
            for message in s.calls.pull(request, timeout=timeout):
                header = self._read_frame(i, s, message, dest) or header
            if header is None:
                raise PSError(f"server {s.address} sent no pull header")
            return header

        return self._retry(s, "pull", call, self.config.pull_timeout_s)

    def _read_frame(
        self, i: int, s: _ServerState, message: bytes, dest: Mapping[str, torch.Tensor]
    ) -> ps_pb2.PullHeader | None:
        """Write a pulled message's chunks into place; return its header, if it has one."""
        frame = decode_frame(message)
        for chunk in frame.chunks:
            _write_chunk(chunk, self._parts_on(i), self.layout, dest, s.address, self._weight_wire)
        return None if frame.header is None else ps_pb2.PullHeader.FromString(bytes(frame.header))

    def _parts_on(self, i: int) -> dict:
        if i not in self._part_maps:
            self._part_maps[i] = {(p.tensor, p.index): p for p in self.layout.parts_on(i)}
        return self._part_maps[i]

    def _after_pull(self, headers: list[ps_pb2.PullHeader]) -> None:
        for s, h in zip(self._servers, headers, strict=True):
            s.pulled_version = s.min_version = h.version
        self.clock = max([self.clock, *(h.worker_clock for h in headers)])

    # ----------------------------------------------------------------- push

    def push(self, grads: Tensors) -> PushSummary:
        """Push one iteration's gradients for every tensor of the model."""
        checked = self._checked_grads(grads)
        clock = self.clock + 1
        pieces = self._stream_pieces(checked)

        def push_one(i: int, s: _ServerState) -> ps_pb2.PushResponse:
            if s.shm_dir:
                header = self._shm_step(i, s, checked, clock, None, {})
                if header is not None:
                    return header.push
            return self._push_one(i, s, pieces()(i), clock)

        return self._after_push(clock, self._each(push_one))

    def push_pull_into(self, module: torch.nn.Module) -> PushSummary:
        """Push the module's gradients, then pull the weights that follow, in one go.

        The same as ``push_from(module)`` then ``pull_into(module)``, but where a
        server's share of the model fits one message it takes one round trip
        instead of two.
        """
        checked = self._checked_grads(_module_grads(module))
        dest, finish = self._module_destinations(module)
        clock = self.clock + 1
        pieces = self._stream_pieces(checked)

        def step_one(i: int, s: _ServerState) -> tuple[ps_pb2.PushResponse, ps_pb2.PullHeader]:
            pull = self._pull_request(clock, s.pulled_version + 1, False)
            if s.shm_dir:
                header = self._shm_step(i, s, checked, clock, pull, dest)
                if header is not None:
                    return header.push, header
            if self._server_bytes(i) > self.config.chunk_bytes:  # streams for large shares
                pushed = self._push_one(i, s, pieces()(i), clock)
                return pushed, self._pull_one(i, s, pull, dest)
            header = ps_pb2.StepHeader(push=self._push_header(s, clock), pull=pull)
            (message,) = encode_frames(header.SerializeToString(), pieces()(i), 1 << 62)
            reply = self._retry(
                s, "step", lambda t: s.calls.step(message, timeout=t), self.config.pull_timeout_s
            )
            pulled = self._read_frame(i, s, reply, dest)
            if pulled is None:
                raise PSError(f"server {s.address} sent no step header")
            return pulled.push, pulled

        results = self._each(step_one)
        summary = self._after_push(clock, [pushed for pushed, _ in results])
        self._after_pull([pulled for _, pulled in results])
        finish()
        return summary

    def _stream_pieces(self, checked: Mapping[str, torch.Tensor]) -> Callable[[], PiecesFor]:
        """Each server's pieces of a push for the stream path, encoded (and, for top-k, the
        residuals updated) exactly once: at the first call, from whichever server's thread."""
        lock = threading.Lock()
        encoded: list[PiecesFor] = []

        def pieces() -> PiecesFor:
            with lock:
                if not encoded:
                    assert self._encoder is not None  # checked gradients imply a job
                    encoded.append(functools.cache(self._encoder.encode(checked)))
                return encoded[0]

        return pieces

    def _server_bytes(self, i: int) -> int:
        return sum(p.nbytes for p in self._parts_on(i).values())

    def _checked_grads(self, grads: Tensors) -> dict[str, torch.Tensor]:
        """Flat gradients (on their own device) in the job's dtypes, checked against the model."""
        layout = self.layout
        _check_names(layout, grads.keys())
        flat = {}
        for spec in layout.specs:
            g = grads[spec.name]
            if tuple(g.shape) != spec.shape:
                raise InvalidRequestError(
                    f"gradient for {spec.name!r} has shape {tuple(g.shape)}, "
                    f"the tensor's is {spec.shape}"
                )
            wanted = layout.dtypes[spec.name].torch
            if isinstance(g, np.ndarray):
                g = torch.from_numpy(g)
            flat[spec.name] = (g if g.dtype == wanted else g.to(wanted)).reshape(-1)
        return flat

    def _shm_step(
        self,
        i: int,
        s: _ServerState,
        grads: Mapping[str, torch.Tensor] | None,
        clock: int,
        pull: ps_pb2.PullRequest | None,
        dest: Mapping[str, torch.Tensor],
    ) -> ps_pb2.PullHeader | None:
        """Push and/or pull through this client's shared-memory segment for server i.

        None when the server cannot open the segment though it never could (it is
        not on this machine after all): the caller then uses the stream path, and
        so does every later call. A segment the server has dropped is made anew.
        """
        request = ps_pb2.ShmStepRequest()
        if grads is not None:
            request.push.CopyFrom(self._push_header(s, clock))
        if pull is not None:
            request.pull.CopyFrom(pull)
        timeout = self.config.pull_timeout_s if pull is not None else self.config.timeout_s
        for _ in range(2):
            if s.shm is None:
                s.shm = _SharedBuffers.create(s.shm_dir, self.layout, i)
            shm = s.shm
            if grads is not None:
                for part, view in shm.views.items():
                    view.copy_(grads[part.tensor][part.start : part.stop])
            request.segment = shm.segment.name
            try:
                header = self._retry(
                    s, "shm step", lambda t: s.calls.shm_step(request, timeout=t), timeout
                )
            except InvalidRequestError as e:
                if "shm step: cannot open segment" not in str(e):
                    raise
                self._drop_shm(s)
                if not s.shm_verified:
                    s.shm_dir = ""
                    return None
                continue  # the server dropped it (idle, or restarted): make a new one
            if not s.shm_verified:
                s.shm_verified = True
            shm.segment.unlink()  # mapped on both sides: nothing is left behind by a crash
            if pull is not None:
                for part, view in shm.views.items():
                    dest[part.tensor][part.start : part.stop].copy_(view)
            return header
        raise PSError(f"server {s.address} cannot open this client's shared-memory segment")

    def _drop_shm(self, s: _ServerState) -> None:
        if s.shm is not None:
            s.shm.close()
            s.shm = None

    def _push_header(self, s: _ServerState, clock: int) -> ps_pb2.PushHeader:
        return ps_pb2.PushHeader(
            job_id=self.job_id,
            worker_id=self.worker_id,
            clock=clock,
            pulled_version=s.pulled_version,
        )

    def _push_one(
        self, i: int, s: _ServerState, pieces: list[Piece], clock: int
    ) -> ps_pb2.PushResponse:
        header = self._push_header(s, clock).SerializeToString()
        return self._retry(
            s,
            "push",
            lambda t: s.calls.push(self._frames(header, pieces), timeout=t),
            self.config.timeout_s,
        )

    def _after_push(self, clock: int, replies: list[ps_pb2.PushResponse]) -> PushSummary:
        self.clock = clock
        for s in self._servers:
            s.min_version = s.pulled_version + 1  # sync: the next pull waits for the next step
        return PushSummary(
            clock=clock,
            applied=all(r.applied for r in replies),
            duplicate=all(r.duplicate for r in replies),
            dropped=any(r.dropped for r in replies),
            staleness=tuple(r.staleness for r in replies),
            lr=tuple(r.lr for r in replies),
            versions=tuple(r.version for r in replies),
        )

    def push_from(self, module: torch.nn.Module) -> PushSummary:
        """Push a module's ``.grad``s; a parameter without a gradient pushes zeros."""
        return self.push(_module_grads(module))

    # ------------------------------------------------------ membership, status

    def set_membership(self, workers: Iterable[str]) -> list[str]:
        """Make exactly these workers active on every server; returns the active set."""
        request = ps_pb2.MembershipRequest(job_id=self.job_id, active_workers=list(workers))
        replies = self._each(
            lambda _, s: self._retry(
                s,
                "set_membership",
                lambda t: s.calls.set_membership(request, timeout=t),
                self.config.timeout_s,
            )
        )
        return list(replies[0].active_workers)

    def status(self) -> list[ps_pb2.StatusResponse]:
        """Every server's status: version, worker clocks, waiting pulls and why, counters."""
        request = ps_pb2.StatusRequest(job_id="")
        return self._each(
            lambda _, s: self._retry(
                s, "status", lambda t: s.calls.status(request, timeout=t), self.config.timeout_s
            )
        )

    # ------------------------------------------------------------ machinery

    def _frames(self, header: bytes, pieces: list[Piece]) -> Iterator[bytes]:
        """Stream messages, encoded as gRPC sends them (a fresh iterator per attempt)."""
        return encode_frames(header, pieces, self.config.chunk_bytes)

    def _each(self, fn: Callable[[int, _ServerState], T]) -> list[T]:
        """Run fn on every server concurrently; raise the first server's error, if any."""
        self._choose_transport()
        if len(self._servers) == 1:
            return [fn(0, self._servers[0])]
        futures = [self._pool.submit(fn, i, s) for i, s in enumerate(self._servers)]
        return [f.result() for f in futures]

    def _retry(self, s: _ServerState, what: str, call: Callable[[float], T], timeout_s: float) -> T:
        def attempt() -> T:
            return call_with_retry(
                call,
                timeout_s,
                self._policy,
                f"server {s.address}",
                what,
                decode_errors=(CodecError,),
            )

        try:
            return attempt()
        except PSError as e:
            if s.transport != "unix" or e.code not in RETRYABLE:
                raise
        # A restarted server listens on a new Unix socket: find it again through TCP.
        self._reconnect(s)
        return attempt()

    def _reconnect(self, s: _ServerState) -> None:
        """Go back to the server's TCP address and choose its transport anew."""
        with self._transport_lock:
            old = s.channel
            s.channel = self._channel(s.address)
            s.calls, s.transport = rpc.calls(s.channel), "tcp"
            old.close()
            self._choose_for(s)


def _module_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in module.named_parameters()
    }


def _named(tensors: Tensors | torch.nn.Module) -> dict[str, torch.Tensor | np.ndarray]:
    if isinstance(tensors, torch.nn.Module):
        return {n: p.detach() for n, p in tensors.named_parameters()}
    return dict(tensors)


def _dtype_name(value: torch.Tensor | np.ndarray) -> str:
    try:
        return dtype_of(value).name
    except CodecError as e:
        raise InvalidRequestError(str(e)) from None


def _check_names(layout: Layout, names: Iterable[str]) -> None:
    got = set(names)
    want = {s.name for s in layout.specs}
    if got != want:
        missing = ", ".join(sorted(want - got)) or "none"
        extra = ", ".join(sorted(got - want)) or "none"
        raise InvalidRequestError(
            f"tensors do not match the job's model: missing {missing}; unexpected {extra}"
        )


def _write_chunk(
    chunk: RawChunk,
    parts: Mapping,
    layout: Layout,
    dest: Mapping[str, torch.Tensor],
    server: str,
    weight_wire: WireDType | None = None,
) -> None:
    """Copy one pulled chunk into its place in the destination flat tensor (converting
    from the job's weight wire dtype, if it has one)."""
    part = parts.get((chunk.tensor, chunk.part))
    if part is None:
        raise PSError(
            f"server {server} sent tensor {chunk.tensor!r} part {chunk.part}, "
            "which the layout does not give it"
        )
    wire = layout.dtypes[part.tensor]
    if weight_wire is not None and chunk.dtype == weight_wire.proto:
        wire = weight_wire
    raw = check_chunk(chunk, wire, part.count)
    start = part.start + chunk.offset
    dest[part.tensor][start : start + raw.size].copy_(to_torch(raw, wire))
