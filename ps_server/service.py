"""The gRPC service: a thin translation between messages and the ParameterStore.

Runs on one asyncio event loop (grpc.aio): store calls run to completion
between awaits, so they need no locks, and a pull that waits for the sync
barrier or the ssp bound awaits a condition without holding a thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health

from protos import ps_pb2
from protos.codec import DEFAULT_CHUNK_BYTES, Piece, RawChunk, encode_frames
from protos.job import Job
from protos.limits import Limits
from protos.rpc import (
    MAX_MESSAGE_BYTES,
    SERVICE,
    generic_handler,
    new_server,
    start_with_health,
)
from protos.security import ServerSecurity
from protos.shm import SegmentCache, Slot, segment_slots
from protos.status import (
    SHM_UNSUPPORTED,
    WORKER_ID_IN_USE,
    abort_with_reason,
)
from ps_server.bulk import BulkPlane
from ps_server.errors import InvalidArgument, StoreError, WorkerIdInUse
from ps_server.flat import FlatParams, PartKey
from ps_server.metrics import ServerMetrics, Timer
from ps_server.pullroom import PullRoom
from ps_server.requests import (
    Budget,
    Reader,
    check_ids,
    check_pull,
    check_push,
    collect,
    init_job,
    read_header,
    status_reply,
)
from ps_server.segments import ShmSlots, SlotIO, chunks_in
from ps_server.store import ParameterStore, PullDecision, Waiter

log = logging.getLogger("ps_server")

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceConfig:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_wait_s: float = 600.0  # a waiting pull without a deadline gives up after this
    max_message_bytes: int = MAX_MESSAGE_BYTES
    unix_socket: str = ""  # "unix:PATH" also served, advertised to same-host clients
    shm_dir: str = ""  # directory of same-host clients' ShmStep segments; empty: off
    bulk_port: int = 0  # the bulk data plane's port, advertised in Status; 0: off
    instance: str = ""  # the bulk data plane's id of this process, advertised in Status
    limits: Limits = field(default_factory=Limits)  # what one job may ask of this server


async def abort(context: grpc.aio.ServicerContext, error: StoreError) -> NoReturn:
    """Fail the call with the error's status (and its typed reason, where it has one)."""
    code = getattr(grpc.StatusCode, error.code)
    if isinstance(error, WorkerIdInUse):
        await abort_with_reason(context, code, str(error), WORKER_ID_IN_USE)
    await context.abort(code, str(error))
    raise AssertionError("unreachable")  # context.abort always raises


class ParameterService:
    """Handlers of the ParameterServer service (registered by :func:`protos.rpc.generic_handler`).

    Every push, whatever its form, goes through :meth:`_push` and every pull
    through :meth:`_pull`; a handler only translates its message form: stream
    frames (Push, Pull), one unary message (Step) or a shared-memory segment
    (ShmStep). Init and Push receive, and Pull sends, raw stream messages (bytes).
    """

    def __init__(
        self,
        store: ParameterStore,
        config: ServiceConfig | None = None,
        metrics: ServerMetrics | None = None,
        on_end: Callable[[str], None] | None = None,
        on_init: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.on_end = on_end  # deletes an ended job's checkpoints; OSError: the job stays
        self.on_init = on_init  # makes an initialised job survive a crash, before Init answers
        self.config = config or ServiceConfig()
        self.changed = asyncio.Condition()
        self.segments = SegmentCache(self.config.shm_dir) if self.config.shm_dir else None
        self._segment_layout: tuple[Job, list[Slot], int, dict[PartKey, int]] | None = None
        self._push_budget: tuple[Job, Budget] | None = None
        self.pull_room = PullRoom()
        self._publish()

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StoreError as e:
            await abort(context, e)

    async def _ids(self, context, job_id: str, worker_id="", session="", worker=False) -> None:
        """Refuse ids over the limits (INVALID_ARGUMENT), before the store sees them."""
        limits = self.config.limits
        await self._call(context, lambda: check_ids(limits, job_id, worker_id, session, worker))

    async def _await(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        try:
            return await work
        except StoreError as e:
            await abort(context, e)

    def _publish(self) -> None:
        """Give the metrics a fresh view of the store (on the event loop, between changes)."""
        if self.metrics is not None:
            self.metrics.publish(self.store.view())

    async def _notify(self) -> None:
        """The store changed: publish it and wake the waiting pulls."""
        self._publish()
        async with self.changed:
            self.changed.notify_all()

    # -------------------------------------------------------------- handlers

    async def Init(self, request_iterator: AsyncIterator[bytes], context) -> ps_pb2.InitResponse:
        limits = self.config.limits
        jobs: list[Job] = []

        async def budget_of(header: ps_pb2.InitHeader) -> Budget:
            # work in proportion to the job's parts, off the event loop: other calls go on
            job, budget = await asyncio.to_thread(init_job, header.config, limits)
            jobs.append(job)
            return budget

        init = collect(request_iterator, ps_pb2.InitHeader, "init", budget_of)
        _, chunks = await self._await(context, init)
        job = jobs[0]
        params = None
        if self.store.job is None:  # a first Init builds the parameters, off the event loop
            params = await self._await(context, asyncio.to_thread(FlatParams.initial, job, chunks))
        created = await self._call(context, lambda: self.store.initialise(job, chunks, params))
        if self.on_init is not None:  # every Init: one that finds the job waits for it too
            await self.on_init()
        if created:
            log.info(
                "initialised job %s: %d parts, %d bytes, mode %s",
                job.job_id,
                len(job.layout.parts_on(job.server_index)),
                self.store.parameter_bytes(),
                job.settings.mode.value,
            )
        await self._notify()
        return ps_pb2.InitResponse(created=created, version=self.store.version)

    async def Push(self, request_iterator: AsyncIterator[bytes], context) -> ps_pb2.PushResponse:
        """A push as a stream of frames."""
        header, chunks = await self._await(
            context, collect(request_iterator, ps_pb2.PushHeader, "push", self._budget_of)
        )
        return await self._push(header, chunks, context)

    async def _budget_of(self, header: ps_pb2.PushHeader) -> Budget:
        """What a push stream may carry, from its header: refused at once for a bad one."""
        check_push(self.config.limits, header)
        return self._budget(self.store.check_job(header.job_id))

    def _budget(self, job: Job) -> Budget:
        """What a push for ``job`` may carry (computed once per job)."""
        if self._push_budget is None or self._push_budget[0] is not job:
            self._push_budget = (job, Budget.of(job, self.config.limits, gradient=True))
        return self._push_budget[1]

    async def Pull(self, request: ps_pb2.PullRequest, context) -> AsyncIterator[bytes]:
        """A pull answered as a stream of frames of about chunk_bytes each, all encoded
        before the first is sent: a push applied while the client reads cannot tear it.
        They are held within the server's room for pulls (:mod:`ps_server.pullroom`)."""
        need, reserved = self.store.parameter_bytes(), False

        async def reserve() -> None:  # once ready: a waiting pull holds no room
            nonlocal reserved
            if not await self.pull_room.reserve(need, self._wait_budget(context)):
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"busy: {self.pull_room.held} bytes of pulls are being sent; try again",
                )
            reserved = True

        try:
            header, pieces = await self._pull(request, context, before_take=reserve)
            frames = encode_frames(header.SerializeToString(), pieces, self.config.chunk_bytes)
            for frame in list(frames):
                yield frame
        finally:
            if reserved:
                self.pull_room.release(need)

    async def Step(self, message: bytes, context) -> bytes:
        """A push, then the pull that follows it, in one message each way."""

        def read() -> tuple[ps_pb2.StepHeader, list[RawChunk]]:
            step, rest = read_header(message, ps_pb2.StepHeader, "step")
            self._check_step(step.push, step.pull)  # nothing is applied for a refused pull
            reader = Reader("step", self._budget(self.store.check_job(step.push.job_id)))
            reader.read(rest)
            return step, reader.chunks

        step, chunks = await self._call(context, read)
        push = await self._push(step.push, chunks, context)
        header, pieces = await self._pull(step.pull, context, push)
        one = max(1, sum(p.values.nbytes for p in pieces))
        (reply,) = encode_frames(header.SerializeToString(), pieces, one)
        return reply

    async def ShmStep(self, request: ps_pb2.ShmStepRequest, context) -> ps_pb2.PullHeader:
        """A push and/or a pull whose tensor data is in a same-host client's segment.

        Every refusal of the segment carries a typed reason (:mod:`protos.status`),
        on which the client makes a new segment or falls back to streams.
        """
        if self.segments is None:
            await abort_with_reason(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server has no shared-memory path",
                SHM_UNSUPPORTED,
            )
        push = request.push if request.HasField("push") else None
        pull = request.pull if request.HasField("pull") else None
        return await self.slot_step(push, pull, ShmSlots(self.segments, request.segment), context)

    async def slot_step(
        self,
        push: ps_pb2.PushHeader | None,
        pull: ps_pb2.PullRequest | None,
        io: SlotIO,
        context,
    ) -> ps_pb2.PullHeader:
        """A push and/or a pull whose tensor data is laid out as a segment, in ``io``
        (ShmStep and the bulk data plane)."""
        if push is None and pull is None:
            message = f"{io.name}: neither push nor pull"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        first = push if push is not None else pull
        assert first is not None
        await self._ids(context, first.job_id)  # before an error quotes it; the rest after
        # the client's session: one that took part in an ended job is told so, as over gRPC
        job = await self._call(context, lambda: self.store.check_job(first.job_id, first.session))
        slots, size, offsets = self._segment_slots(job)
        await io.open(size, context)
        await self._call(context, lambda: self._check_step(push, pull))  # before any apply
        reply = None
        if push is not None:
            data = await io.read(size, context)
            reply = await self._push(push, chunks_in(data, slots, job), context)
        if pull is None:
            return ps_pb2.PullHeader(
                version=self.store.version, mode=job.settings.mode.to_proto(), push=reply
            )
        header, pieces = await self._pull(pull, context, reply)
        await io.write(size, offsets, pieces, context)
        return header

    async def SetMembership(
        self, request: ps_pb2.MembershipRequest, context
    ) -> ps_pb2.MembershipResponse:
        limits = self.config.limits

        def check() -> None:
            check_ids(limits, request.job_id, "", "", worker=False)
            if len(request.active_workers) > limits.max_workers:
                raise InvalidArgument(
                    f"{len(request.active_workers)} workers; the limit is {limits.max_workers}"
                )
            for worker in request.active_workers:
                check_ids(limits, request.job_id, worker, "", worker=False)

        await self._call(context, check)
        active = await self._call(
            context, lambda: self.store.set_membership(request.job_id, request.active_workers)
        )
        log.info("membership: %s", ", ".join(active) or "(none)")
        await self._notify()
        return ps_pb2.MembershipResponse(active_workers=active, version=self.store.version)

    async def Leave(self, request: ps_pb2.LeaveRequest, context) -> ps_pb2.LeaveResponse:
        """A client is done: its worker stops counting for the barrier and the bound now."""
        r = request
        await self._ids(context, r.job_id, r.worker_id, r.session, worker=True)
        active = await self._call(
            context, lambda: self.store.leave(r.job_id, r.worker_id, r.session)
        )
        log.info("worker %s left; active: %s", r.worker_id, ", ".join(active) or "(none)")
        await self._notify()
        return ps_pb2.LeaveResponse(active_workers=active)

    async def EndJob(self, request: ps_pb2.EndJobRequest, context) -> ps_pb2.EndJobResponse:
        """Drop the job held here and its checkpoints; the server then takes any Init."""
        store = self.store
        await self._ids(context, request.job_id)
        if store.job is None:
            return ps_pb2.EndJobResponse(ended=False)
        job = await self._call(context, lambda: store.check_job(request.job_id))
        if self.on_end is not None:
            try:  # before the store forgets the job, with no await between: no new checkpoint
                self.on_end(job.job_id)
            except OSError as e:
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"job {job.job_id!r} is not ended: cannot delete its checkpoint: {e}",
                )
        store.end(job.job_id)
        log.info("ended job %s", job.job_id)
        await self._notify()  # its waiting pulls are refused now
        return ps_pb2.EndJobResponse(ended=True)

    async def Status(self, request: ps_pb2.StatusRequest, context) -> ps_pb2.StatusResponse:
        where = {
            "hostname": socket.gethostname(),
            "unix_socket": self.config.unix_socket,
            "shm_dir": self.config.shm_dir,
            "bulk_port": self.config.bulk_port,
            "instance": self.config.instance,
        }
        await self._ids(context, request.job_id)
        view = self.store.view()
        if view.job is None:
            return ps_pb2.StatusResponse(initialised=False, **where)
        if request.job_id and request.job_id != view.job.job_id:
            await self._call(context, lambda: self.store.check_job(request.job_id))
        limit = self.config.max_message_bytes - 1024  # 1 KiB: gRPC's framing
        reply = status_reply(view, self.store.waiting(), where, limit - 64)  # 64: the counts
        reply.MergeFrom(ps_pb2.StatusResponse(**view.counts()))
        return reply

    # ------------------------------------------------- the one push, the one pull

    async def _push(
        self, header: ps_pb2.PushHeader, chunks: list[RawChunk], context
    ) -> ps_pb2.PushResponse:
        """Apply one push (from any handler), count it and wake the waiting pulls."""
        h = header
        await self._call(context, lambda: check_push(self.config.limits, h))
        with Timer() as timer:
            result = await self._call(
                context,
                lambda: self.store.push(
                    h.job_id, h.worker_id, h.clock, h.pulled_version, chunks, h.session
                ),
            )
        if self.metrics is not None:
            self.metrics.pushes.inc()
            self.metrics.bytes_in.inc(
                sum(len(c.data) + len(c.indices or b"") for c in chunks)  # top-k: indices too
            )
            self.metrics.apply_seconds.observe(timer.seconds)
            if result.applied or result.dropped:
                self.metrics.staleness.observe(result.staleness)
        await self._notify()
        return ps_pb2.PushResponse(
            applied=result.applied,
            duplicate=result.duplicate,
            dropped=result.dropped,
            version=result.version,
            staleness=result.staleness,
            lr=result.lr,
        )

    async def _pull(
        self,
        request: ps_pb2.PullRequest,
        context,
        push: ps_pb2.PushResponse | None = None,
        before_take: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[ps_pb2.PullHeader, list[Piece]]:
        """Serve one pull (from any handler): wait as the mode requires (then await
        ``before_take``), then the header (carrying ``push``, a step's push reply) and views
        of the weights to send.

        The views share memory with the parameters: copy or encode them before
        the next await, so no push can tear them.
        """
        store, r = self.store, request
        await self._call(context, lambda: check_pull(self.config.limits, r))

        def decide() -> PullDecision:
            return store.pull_decision(r.job_id, r.worker_id, r.clock, r.min_version, r.session)

        if not request.observe and not (await self._call(context, decide)).ready:
            with Timer() as timer:
                await self._wait(request, context, decide)
            if self.metrics is not None and store.job is not None:
                self.metrics.wait_seconds.labels(store.job.settings.mode.value).observe(
                    timer.seconds
                )
        if before_take is not None:
            await before_take()
        version, clock, pieces = await self._call(
            context, lambda: store.pull(r.job_id, r.worker_id, r.observe, r.session, r.clock)
        )
        assert store.job is not None
        self._publish()  # a first pull may have added a worker
        if self.metrics is not None:
            self.metrics.pulls.inc()
            self.metrics.bytes_out.inc(sum(p.values.nbytes for p in pieces))
        header = ps_pb2.PullHeader(
            version=version, worker_clock=clock, mode=store.job.settings.mode.to_proto(), push=push
        )
        return header, pieces

    async def _wait(
        self, request: ps_pb2.PullRequest, context, decide: Callable[[], PullDecision]
    ) -> None:
        """Wait until the pull may proceed, or abort with the reason before the deadline."""
        budget = self._wait_budget(context)
        r = request
        token = self.store.add_waiter(Waiter(r.worker_id, r.clock, r.min_version, r.session))
        try:
            async with self.changed:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: decide().ready), max(budget, 0.0)
                )
        except (TimeoutError, asyncio.TimeoutError):
            decision = await self._call(context, decide)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"pull by worker {request.worker_id!r} timed out after {max(budget, 0):.1f}s: "
                f"{decision.reason}",
            )
        except StoreError as e:  # e.g. the worker was removed while it waited
            await abort(context, e)
        finally:
            self.store.remove_waiter(token)

    def _wait_budget(self, context) -> float:
        """How long a call may wait: answered before the caller's own deadline fires."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.config.max_wait_s
        return min(self.config.max_wait_s, remaining - min(1.0, 0.1 * remaining) - 0.02)

    def _check_step(self, push: ps_pb2.PushHeader | None, pull: ps_pb2.PullRequest | None) -> None:
        """Raise what a step's push or pull would be refused with before its push is applied:
        ids, clocks, the job and (a pull that takes part) the client's contact."""
        limits = self.config.limits
        if push is not None:
            check_push(limits, push)
        if pull is not None:
            check_pull(limits, pull)
            if pull.observe:
                self.store.check_job(pull.job_id)
            else:
                self.store.check_contact(pull.job_id, pull.worker_id, pull.session, pull.clock)
        if push is not None and pull is not None and not pull.observe:  # what the push changes
            if push.worker_id == pull.worker_id and push.session != pull.session:
                raise InvalidArgument("a step's push and pull must carry the same session")
            self.store.check_room([push.worker_id, pull.worker_id])

    # ------------------------------------------------------ segment-laid-out data

    def _segment_slots(self, job: Job) -> tuple[list[Slot], int, dict[PartKey, int]]:
        """Where this server's parts live in a segment (computed once per job)."""
        if self._segment_layout is None or self._segment_layout[0] is not job:
            slots, size = segment_slots(job.layout, job.server_index)
            offsets = {(slot.part.tensor, slot.part.index): slot.offset for slot in slots}
            self._segment_layout = (job, slots, size, offsets)
        return self._segment_layout[1:]


async def start_server(
    store: ParameterStore,
    address: str,
    config: ServiceConfig | None = None,
    security: ServerSecurity | None = None,
    metrics: ServerMetrics | None = None,
    on_end: Callable[[str], None] | None = None,
    on_init: Callable[[], Awaitable[None]] | None = None,
    bulk: BulkPlane | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Create, bind and start a server; ``address`` may use port 0. Returns the bound port.
    ``on_end`` is called with a job's id when EndJob ends it (to delete its checkpoints);
    ``on_init`` is awaited before an Init is answered (to write the job's first checkpoint);
    ``bulk``, a bound data plane, serves the service too (its port is ``config.bulk_port``)."""
    config = config or ServiceConfig()
    if bulk is not None:
        config = replace(config, bulk_port=bulk.port, instance=bulk.instance)
    security = security or ServerSecurity()
    server = new_server(config.max_message_bytes, security.interceptors())
    service = ParameterService(store, config, metrics, on_end, on_init)
    server.add_generic_rpc_handlers([generic_handler(service)])
    extra = [config.unix_socket] if config.unix_socket else []
    port, health_servicer = await start_with_health(
        server, address, SERVICE, extra, security.credentials()
    )
    if bulk is not None:
        bulk.serve(service, asyncio.get_running_loop())
    return server, port, health_servicer
