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

The parts: :mod:`ps_worker.protocol` (clock, versions, headers; no I/O),
:mod:`ps_worker.payload` (tensor data in one description),
:mod:`ps_worker.transport` (streams, the unary step, shared memory) and
:mod:`ps_worker.routes` (which transport serves each server, and the fallback).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from protos import ps_pb2
from protos.codec import encode_frames, to_raw
from protos.job import Job, JobError, Settings
from protos.layout import Layout, TensorSpec, server_pieces
from ps_worker.compress import GradientEncoder
from ps_worker.config import ClientConfig
from ps_worker.errors import InvalidRequestError, PSError, ServerUnavailableError
from ps_worker.link import Link
from ps_worker.payload import Plan
from ps_worker.protocol import ProtocolState, PushSummary
from ps_worker.routes import Router
from ps_worker.tensors import (
    Tensors,
    checked_grads,
    dtype_name,
    module_destinations,
    module_grads,
    named,
)

__all__ = ["Client", "ClientConfig", "PushSummary", "default_worker_id"]

T = TypeVar("T")


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
        self._state = ProtocolState(job_id, self.worker_id, len(servers))
        self._router = Router(servers, self.config)
        # Headroom for a status() or set_membership() from another thread while a pull waits.
        self._pool = ThreadPoolExecutor(4 * len(servers), thread_name_prefix="ps-client")
        self._job: Job | None = None
        self._plan: Plan | None = None  # set with the job

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Cancel calls in flight and release the connections."""
        self._router.close()  # cancels in-flight calls, so the pool's threads finish
        self._pool.shutdown(wait=True)
        self._router.release()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def servers(self) -> list[str]:
        return [link.address for link in self._router.links]

    @property
    def transports(self) -> list[str]:
        """How each server is reached: "shm" (tensor data through shared memory, control
        over the Unix socket or TCP), "unix" (its socket, on this host) or "tcp"."""
        return self._router.names()

    @property
    def clock(self) -> int:
        """Iterations this worker has pushed."""
        return self._state.clock

    @property
    def versions(self) -> list[int]:
        """The version of each server's weights this worker last pulled."""
        return list(self._state.pulled_versions)

    def wait_for_servers(self, timeout_s: float = 30.0) -> None:
        """Block until every server accepts connections; ServerUnavailableError if not."""
        deadline = time.monotonic() + timeout_s
        for link in self._router.links:
            try:
                grpc.channel_ready_future(link.channel).result(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except grpc.FutureTimeoutError:
                raise ServerUnavailableError(
                    f"server {link.address} did not accept a connection within {timeout_s:.0f}s"
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
            elif not isinstance(settings, Settings):
                raise JobError(
                    f"settings must be a protos.job.Settings (or give the settings as "
                    f"keywords), got {settings!r}"
                )
            elif options:
                raise JobError(f"give settings or keywords, not both ({', '.join(options)})")
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        values = named(tensors)
        specs = [
            TensorSpec(n, dtype_name(v), tuple(int(d) for d in v.shape)) for n, v in values.items()
        ]
        try:
            job = Job.for_model(self.job_id, specs, len(self._router.links), settings, workers)
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        layout = job.layout
        flat = {n: to_raw(v) for n, v in values.items()}

        def init_one(i: int, link: Link) -> bool:
            header = ps_pb2.InitHeader(config=job.for_server(i).to_proto()).SerializeToString()
            pieces = server_pieces(layout, i, flat)
            chunk_bytes = self.config.chunk_bytes
            reply = link.call(
                "init",
                lambda calls, t: calls.init(encode_frames(header, pieces, chunk_bytes), timeout=t),
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
            first = self.servers[0]
            if not reply.initialised:
                raise PSError(
                    f"server {first} holds no model yet: some worker must call init() first"
                )
            try:
                self._set_job(Job.from_proto(reply.config))
            except Exception as e:
                raise PSError(f"cannot read the job from {first}: {e}") from e
        assert self._job is not None
        return self._job

    def _set_job(self, job: Job) -> None:
        self._job = job
        self._plan = Plan(job)
        self._router.use(self._plan)

    @property
    def layout(self) -> Layout:
        return self.job().layout

    @property
    def _encoder(self) -> GradientEncoder:
        """The job's push encoder, with its top-k residuals."""
        return self._ready().encoder

    def _ready(self) -> Plan:
        """The job's plan, fetching the job first if need be."""
        self.job()
        assert self._plan is not None
        return self._plan

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
        self._pull(out, observe)
        return {s.name: out[s.name].reshape(s.shape) for s in layout.specs}

    def pull_into(self, module: torch.nn.Module, observe: bool = False) -> None:
        """Overwrite a module's parameters in place, on whatever device they live."""
        dest, finish = module_destinations(self.layout, module)
        self._pull(dest, observe)
        finish()

    def _pull(self, dest: Mapping[str, torch.Tensor], observe: bool) -> None:
        plan = self._ready()

        def pull_one(i: int, link: Link) -> ps_pb2.PullHeader:
            request = self._state.pull_request(i, observe)
            sink = plan.sink(i, dest, link.address)
            return self._router.run(i, lambda t: t.pull(request, sink))

        self._state.after_pull(self._each(pull_one), observe)

    # ----------------------------------------------------------------- push

    def push(self, grads: Tensors) -> PushSummary:
        """Push one iteration's gradients for every tensor of the model."""
        plan = self._ready()
        pushed = plan.gradients(checked_grads(plan.layout, grads))
        clock = self._state.next_clock

        def push_one(i: int, _: Link) -> ps_pb2.PushResponse:
            header = self._state.push_header(i, clock)
            return self._router.run(i, lambda t: t.push(header, pushed))

        return self._state.after_push(clock, self._each(push_one))

    def push_from(self, module: torch.nn.Module) -> PushSummary:
        """Push a module's ``.grad``s; a parameter without a gradient pushes zeros."""
        return self.push(module_grads(module))

    def push_pull_into(self, module: torch.nn.Module) -> PushSummary:
        """Push the module's gradients, then pull the weights that follow, in one go.

        The same as ``push_from(module)`` then ``pull_into(module)``, but where a
        server's share of the model fits one message it takes one round trip
        instead of two.
        """
        plan = self._ready()
        pushed = plan.gradients(checked_grads(plan.layout, module_grads(module)))
        dest, finish = module_destinations(plan.layout, module)
        clock = self._state.next_clock

        def step_one(i: int, link: Link) -> tuple[ps_pb2.PushResponse, ps_pb2.PullHeader]:
            header = self._state.step_header(i, clock)
            sink = plan.sink(i, dest, link.address)
            return self._router.run(i, lambda t: t.step(header, pushed, sink))

        results = self._each(step_one)
        summary = self._state.after_push(clock, [push for push, _ in results])
        self._state.after_pull([pulled for _, pulled in results])
        finish()
        return summary

    # ------------------------------------------------------ membership, status

    def set_membership(self, workers: Iterable[str]) -> list[str]:
        """Make exactly these workers active on every server; returns the active set."""
        request = ps_pb2.MembershipRequest(job_id=self.job_id, active_workers=list(workers))
        replies = self._each(
            lambda _, link: link.call(
                "set_membership",
                lambda calls, t: calls.set_membership(request, timeout=t),
                self.config.timeout_s,
            )
        )
        return list(replies[0].active_workers)

    def status(self) -> list[ps_pb2.StatusResponse]:
        """Every server's status: version, worker clocks, waiting pulls and why, counters."""
        request = ps_pb2.StatusRequest(job_id="")
        return self._each(
            lambda _, link: link.call(
                "status", lambda calls, t: calls.status(request, timeout=t), self.config.timeout_s
            )
        )

    # ------------------------------------------------------------ machinery

    def _each(self, fn: Callable[[int, Link], T]) -> list[T]:
        """Run fn on every server concurrently; raise the first server's error, if any."""
        self._router.choose()
        links = self._router.links
        if len(links) == 1:
            return [fn(0, links[0])]
        futures = [self._pool.submit(fn, i, link) for i, link in enumerate(links)]
        return [f.result() for f in futures]
