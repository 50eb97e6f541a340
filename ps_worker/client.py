"""The client library: drive a sharded parameter server from any training loop.

    client = Client(["127.0.0.1:7001", "127.0.0.1:7002"], job_id="mnist")
    client.init(model, mode="ssp", staleness=2, optimizer="adam", lr=1e-3)
    for batch in data:
        client.pull_into(model)          # waits as the job's mode requires
        loss_fn(model(batch)).backward()
        client.push_from(model)          # every server at once

Every call contacts all servers concurrently, carries a deadline, and is
retried (on UNAVAILABLE, or CANCELLED by a server shutting down, with backoff and
jitter) until it runs out; one that waits longer than a few seconds logs what it
waits for (:mod:`ps_worker.waits`). Pushes are idempotent per ``(worker_id, clock)``,
so retries are safe. Each client is one session: a second live client under the
same worker id is refused (:class:`~ps_worker.errors.WorkerIdInUseError`). A
client that took part in the job leaves it when it closes (or the process ends),
so the others stop waiting for it at once; :meth:`Client.join` also waits for
every other worker to finish. Servers, worker id and token may come from the
environment (:mod:`ps_worker.environment`).

The parts: :mod:`ps_worker.protocol` (clock, versions, headers; no I/O), ``payload``
(tensor data), ``transport`` (streams, the unary step, shared memory), ``routes``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from protos import ps_pb2
from protos.codec import encode_frames, to_raw
from protos.job import Job, JobError, Settings
from protos.layout import Layout, TensorSpec, server_pieces
from ps_worker import environment
from ps_worker.compress import GradientEncoder
from ps_worker.config import ClientConfig
from ps_worker.environment import unique_worker_id as default_worker_id
from ps_worker.errors import (
    InvalidRequestError,
    PSError,
    ServerUnavailableError,
    UnknownJobError,
    WaitTimeoutError,
    WorkerIdInUseError,
    from_rpc_error,
)
from ps_worker.link import Link
from ps_worker.payload import Plan
from ps_worker.protocol import ProtocolState, PushSummary, first_contact
from ps_worker.routes import Router
from ps_worker.tensors import (
    Tensors,
    checked_grads,
    dtype_name,
    module_destinations,
    module_grads,
    module_state,
    named,
)
from ps_worker.waits import WaitReporter, describe_active, no_answer, why_held

__all__ = ["Client", "ClientConfig", "PushSummary", "default_worker_id"]

T = TypeVar("T")
log = logging.getLogger("ps_worker")

_open: weakref.WeakSet[Client] = weakref.WeakSet()  # closed at exit, so that they leave


@atexit.register
def _close_open_clients() -> None:
    """A process that ends without closing its clients still leaves the job."""
    for client in list(_open):
        client.close()


class Client:
    """A worker's connection to every parameter server of one job.

    One training loop drives a client (pull and push are not meant to run
    concurrently on the same client); status() and set_membership() may be
    called from other threads at any time.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        job_id: str = "default",
        worker_id: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        """``servers``: ``HOST:PORT`` addresses (a list, or one comma-separated string),
        else ``$PS_SERVERS``. ``worker_id``: else ``worker<RANK>`` when ``$RANK`` is set,
        else a unique id. ``config.security``: else the token in ``$PS_TOKEN``, if any."""
        addresses = environment.servers(servers)
        self.job_id = job_id
        self.worker_id = environment.worker_id(worker_id)
        self.session = uuid.uuid4().hex  # this client, as the servers tell it from others
        self.config = config or ClientConfig()
        if self.config.security is None:
            self.config = dataclasses.replace(self.config, security=environment.security())
        self._state = ProtocolState(job_id, self.worker_id, len(addresses), self.session)
        self._router = Router(addresses, self.config)
        # Headroom for a status() or set_membership() from another thread while a pull waits.
        self._pool = ThreadPoolExecutor(4 * len(addresses), thread_name_prefix="ps-client")
        self._reports = WaitReporter(
            self.config.report_wait_after_s, self.config.report_wait_every_s
        )
        self._closed = threading.Event()
        self._job: Job | None = None
        self._plan: Plan | None = None  # set with the job
        _open.add(self)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Leave the job if this client took part in it (best effort, within
        ``config.quick_timeout_s``), cancel calls in flight and release the connections.
        Never raises; closing again does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        _open.discard(self)
        try:
            self.leave()
        except WorkerIdInUseError as e:  # another client holds the id: nothing of ours to end
            log.info("%s: %s", self.worker_id, e)
        except PSError as e:
            log.warning("%s did not leave the job cleanly: %s", self.worker_id, e)
        self._reports.close()
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
        over the Unix socket or TCP), "bulk" (tensor data over the bulk data plane, control
        over gRPC), "unix" (its socket, on this host) or "tcp" (gRPC streams)."""
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
        """Block until every server accepts connections; ServerUnavailableError naming the
        others if not. Logs which servers it waits for while it waits."""
        deadline = time.monotonic() + timeout_s
        links = self._router.links
        ready = [grpc.channel_ready_future(link.channel) for link in links]

        def missing() -> list[str]:
            return [link.address for link, f in zip(links, ready, strict=True) if not f.done()]

        def describe() -> str:
            return f"servers not accepting connections: {', '.join(missing())}"

        try:
            with self._reports.waiting(f"{self.worker_id} connecting", describe):
                for future in ready:
                    try:
                        future.result(timeout=max(0.0, deadline - time.monotonic()))
                    except grpc.FutureTimeoutError:
                        raise ServerUnavailableError(
                            f"server(s) {', '.join(missing())} did not accept a connection "
                            f"within {timeout_s:g}s"
                        ) from None
        finally:
            for future in ready:
                future.cancel()

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
        if self.worker_id in job.workers:
            self._state.member = True  # active from the start: it must leave when done

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

        created = self._each(init_one, "init")
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
            held = reply.config.job_id
            if held != self.job_id:
                raise UnknownJobError(f"server {first} holds job {held!r}, not {self.job_id!r}")
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

        self._state.after_pull(self._each(pull_one, "pull", held=not observe), observe)

    # ----------------------------------------------------------------- push

    def push(self, grads: Tensors) -> PushSummary:
        """Push one iteration's gradients for every tensor of the model."""
        plan = self._ready()
        pushed = plan.gradients(checked_grads(plan.layout, grads))
        clock = self._state.next_clock

        def push_one(i: int, _: Link) -> ps_pb2.PushResponse:
            header = self._state.push_header(i, clock)
            return self._router.run(i, lambda t: t.push(header, pushed))

        summary = self._state.after_push(clock, self._each(push_one, "push"))
        unsure = self._state.unsure_clock  # it joined by this push: the servers' clock
        return self._state.adopt_clock(summary, self.status()) if unsure else summary

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

        results = self._each(step_one, "step", held=True)
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
            ),
            "set_membership",
        )
        return list(replies[0].active_workers)

    def status(self) -> list[ps_pb2.StatusResponse]:
        """Every server's status: version, worker clocks, waiting pulls and why, counters."""
        request = ps_pb2.StatusRequest(job_id="")
        return self._each(
            lambda _, link: link.call(
                "status", lambda calls, t: calls.status(request, timeout=t), self.config.timeout_s
            ),
            "status",
        )

    # ------------------------------------------------------ leaving, the model out

    def leave(self) -> None:
        """Leave the job on every server, if this client took part in it (pushed, or pulled
        without ``observe``, or was named a worker at init): the servers stop counting it
        for the sync barrier and the ssp bound at once. One call per server, concurrently,
        within ``config.quick_timeout_s``; raises the first server's PSError. ``close()``
        calls it."""
        if not self._state.member:
            return
        self._state.member = False
        request = self._state.leave_request()
        timeout = self.config.quick_timeout_s
        calls = [
            (link, link.calls.leave.future(request, timeout=timeout)) for link in self._router.links
        ]  # grpc's own futures: no thread of ours, so it works as the process exits
        errors = []
        for link, call in calls:
            try:
                call.result()
            except grpc.RpcError as e:
                errors.append(from_rpc_error(e, link.address, "leave"))
        if errors:
            raise errors[0]

    def join(self, module: torch.nn.Module | None = None, timeout_s: float | None = None) -> None:
        """The end of a worker's training, for workers with uneven step counts (Horovod's
        ``hvd.join()``, DDP's ``Join``): leave the job, so that the others stop waiting for
        this one, then wait until no worker is active on any server, then load the final
        weights into ``module`` if given. WaitTimeoutError naming the workers still active
        after ``timeout_s`` (default ``config.pull_timeout_s``); logs whom it waits for."""
        self.leave()
        timeout_s = self.config.pull_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        active = self._active()

        def describe() -> str:
            return f"workers still active: {describe_active(active)}"

        with self._reports.waiting(f"{self.worker_id} join", describe):
            while active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(
                        f"join: after {timeout_s:g}s workers are still active: "
                        f"{describe_active(active)}"
                    )
                if self._closed.wait(min(self.config.join_poll_s, left)):
                    raise PSError("join: the client was closed")
                active = self._active()
        if module is not None:
            self.pull_into(module, observe=True)

    def _active(self) -> dict[str, list[str]]:
        """Each worker active on some server: the servers it is active on."""
        active: dict[str, list[str]] = {}
        for address, reply in zip(self.servers, self.status(), strict=True):
            for worker in reply.workers:
                if worker.active:
                    active.setdefault(worker.worker_id, []).append(address)
        return active

    def state_dict(self, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The servers' current weights as ``{name: CPU tensor}``: an observing pull, which
        never waits and never joins the job.

        The servers hold the model's parameters only. Without ``module`` the result is
        those; with it (the model the job was initialised from) it is
        ``module.state_dict()``'s layout, parameters from the servers and buffers (e.g.
        batch norm statistics) from ``module``, so ``load_state_dict(..., strict=True)``
        takes it and ``safetensors.torch.save_file`` saves it."""
        weights = self.pull(observe=True)
        return weights if module is None else module_state(self.layout, module, weights)

    def end_job(self) -> list[bool]:
        """Drop the job from every server (weights, optimizer state, checkpoints), freeing
        them for another job; for each server, whether it held one."""
        request = ps_pb2.EndJobRequest(job_id=self.job_id)
        replies = self._each(
            lambda _, link: link.call(
                "end job", lambda calls, t: calls.end_job(request, timeout=t), self.config.timeout_s
            ),
            "end job",
        )
        self._job = self._plan = None  # and this client starts afresh: nothing left to leave,
        self.session = uuid.uuid4().hex  # a new session (the servers refuse the ended one's)
        self._state = ProtocolState(self.job_id, self.worker_id, len(replies), self.session)
        return [r.ended for r in replies]

    # ------------------------------------------------------------ machinery

    def _each(self, fn: Callable[[int, Link], T], what: str, held: bool = False) -> list[T]:
        """Run fn on every server concurrently; raise the first server's error, if any.

        While it runs longer than ``config.report_wait_after_s``, it logs which servers
        have not answered, and for a call the job's mode may hold (``held``) why each one
        holds it, as its status says."""
        self._router.choose()
        links = self._router.links
        pending = set(range(len(links)))

        def run(i: int, link: Link) -> T:
            try:  # a rank restarted at once may wait for its predecessor's id to be free
                wait_s, closed = self.config.worker_id_wait_s, self._closed
                return first_contact(lambda: fn(i, link), self._state, wait_s, closed)
            finally:
                pending.discard(i)

        def describe() -> str:
            waiting = [links[i] for i in sorted(pending)]
            if not held:
                return no_answer(waiting)
            request = ps_pb2.StatusRequest(job_id=self.job_id)
            return why_held(waiting, request, self.worker_id, self.config.quick_timeout_s)

        with self._reports.waiting(f"{self.worker_id} {what}", describe):
            if len(links) == 1:
                return [run(0, links[0])]
            futures = [self._pool.submit(run, i, link) for i, link in enumerate(links)]
            return [f.result() for f in futures]
