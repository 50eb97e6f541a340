"""The scheduler's gRPC service: a thin layer over SchedulerState.

Besides answering workers it keeps the parameter servers' membership equal
to the state's active workers, and declares workers dead when their
heartbeats stop, so a dead worker releases the sync barrier and the ssp
bound within the lease timeout. A server that cannot be reached is tried
again after a back-off, with one log line per try. Log lines count epochs
from 1, the wire and the state from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health

from protos import ps_pb2, rpc, scheduler_pb2, scheduler_pb2_grpc
from protos.security import ClientSecurity, ServerSecurity
from scheduler import requests
from scheduler.metrics import SchedulerMetrics
from scheduler.state import Completion, SchedulerState, StateError

log = logging.getLogger("scheduler")
T = TypeVar("T")
SERVICE = "Scheduler"  # ps.Scheduler, in protos/scheduler.proto
BACKOFF_S = (0.5, 5.0)  # after a failed membership update: the first delay, the longest
# A confirmed membership is sent again this long after: a server restarted on a checkpoint
# taken before the last change comes back with the membership of then.
REFRESH_S = 2.0


class ServerMembership:
    """Pushes the active worker set to every parameter server; remembers what they confirmed.

    After a failure (a server down, say) the next update waits a back-off period, which
    doubles while failures go on: one attempt and one log line per period."""

    def __init__(
        self,
        servers: tuple[str, ...],
        job_id: str,
        security: ClientSecurity,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.clock = clock
        self.backoff_s = 0.0  # the current back-off period (0: none)
        self.retry_at = 0.0  # no attempt before this (clock's time)
        self.metadata = security.metadata()
        self.servers = servers
        self.channels = [security.aio_channel(a, rpc.channel_options()) for a in servers]
        self.calls = [
            c.unary_unary(
                rpc.method("SetMembership"),
                request_serializer=ps_pb2.MembershipRequest.SerializeToString,
                response_deserializer=ps_pb2.MembershipResponse.FromString,
            )
            for c in self.channels
        ]
        self.confirmed: frozenset[str] | None = None
        self.confirmed_at = 0.0  # (clock's time)
        self.lock = asyncio.Lock()

    async def sync(self, desired: frozenset[str]) -> bool:
        """Make every server's membership ``desired`` (sent again every REFRESH_S while it
        stays the same); False if some server refused or is down (or was, less than a
        back-off period ago)."""
        async with self.lock:
            if desired == self.confirmed and self.clock() < self.confirmed_at + REFRESH_S:
                return True
            if self.clock() < self.retry_at:
                return False
            request = ps_pb2.MembershipRequest(job_id=self.job_id, active_workers=sorted(desired))
            results = await asyncio.gather(
                *(call(request, timeout=5.0, metadata=self.metadata) for call in self.calls),
                return_exceptions=True,
            )
            failed = {
                server: r
                for server, r in zip(self.servers, results, strict=True)
                if isinstance(r, BaseException)
            }
            if not failed:
                if desired != self.confirmed:
                    log.info("servers' membership: %s", ", ".join(sorted(desired)) or "(none)")
                self.confirmed, self.backoff_s, self.retry_at = desired, 0.0, 0.0
                self.confirmed_at = self.clock()
                return True
            down = {s: e for s, e in failed.items() if not _uninitialised(e)}
            if not down:  # the job's first worker has not initialised the servers yet
                log.debug("servers not initialised yet: %s", ", ".join(failed))
                return False
            self.backoff_s = min(max(self.backoff_s * 2, BACKOFF_S[0]), BACKOFF_S[1])
            self.retry_at = self.clock() + self.backoff_s
            log.warning(
                "membership update failed on %s; trying again in %.1fs",
                "; ".join(f"{s} ({_brief(e)})" for s, e in down.items()),
                self.backoff_s,
            )
            return False

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


def _uninitialised(error: BaseException) -> bool:
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    )


def _brief(error: BaseException) -> str:
    """A failed call in a few words: its status code and the first line of its details."""
    if isinstance(error, grpc.aio.AioRpcError):
        details = (error.details() or "").strip().splitlines()
        return f"{error.code().name}: {details[0][:100]}" if details else error.code().name
    return f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        state: SchedulerState,
        now: Callable[[], float] = time.time,
        security: ClientSecurity | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.state = state
        self.now = now
        self.metrics = metrics
        spec = state.spec
        self.membership = ServerMembership(spec.servers, spec.job_id, security or ClientSecurity())
        self.finished = asyncio.Event()  # set once every shard is done and every epoch evaluated
        if state.finished():
            self.finished.set()

    async def _call(self, context, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StateError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            raise AssertionError("unreachable") from e

    async def sync_membership(self) -> bool:
        if self.finished.is_set():  # the job is over (and may be ended on the servers)
            return True
        return await self.membership.sync(frozenset(self.state.active_workers()))

    async def Register(self, request, context):
        worker_id = await self._call(
            context, lambda: self.state.register(request.host, request.device, self.now())
        )
        log.info(
            "worker %s registered from %s (%s)",
            worker_id,
            request.host,
            request.device,
            extra={"worker": worker_id},
        )
        if self.metrics:
            self.metrics.registrations.inc()
        await self.sync_membership()
        return scheduler_pb2.RegisterResponse(
            worker_id=worker_id, job_spec_json=self.state.spec.to_json()
        )

    async def Heartbeat(self, request, context):
        await self._call(
            context,
            lambda: self.state.heartbeat(
                request.worker_id,
                request.clock,
                request.samples_per_s,
                self.now(),
                lease_ids=request.lease_ids,
            ),
        )
        return scheduler_pb2.HeartbeatResponse(finished=self.state.finished())

    async def Lease(self, request, context):
        def decide():
            confirmed = self.membership.confirmed or frozenset()
            return self.state.lease(
                request.worker_id, self.now(), confirmed, held=request.lease_ids
            )

        decision = await self._call(context, decide)
        if decision.released:
            log.warning(
                "worker %s asked for work holding %d lease(s) it no longer works on (a reply "
                "lost to a restart, say): requeued",
                request.worker_id,
                decision.released,
                extra={"worker": request.worker_id},
            )
        # Keep the servers' count in step: this worker may have become idle or active.
        synced = await self.sync_membership()
        if synced and decision.awaiting_membership:
            decision = await self._call(context, decide)
        response = scheduler_pb2.LeaseResponse(finished=decision.done, reason=decision.reason)
        if decision.task is not None:
            t = decision.task
            response.has_task = True
            response.task.CopyFrom(
                scheduler_pb2.Task(epoch=t.epoch, shard=t.shard, lease_id=t.lease_id)
            )
            if self.metrics:
                self.metrics.leases.inc()
        if decision.evaluate_epoch is not None:
            response.has_evaluation = True
            response.evaluate_epoch = decision.evaluate_epoch
        return response

    async def Complete(self, request, context):
        c = Completion(
            epoch=request.task.epoch,
            shard=request.task.shard,
            worker=request.worker_id,
            lease_id=request.task.lease_id,
            clock_start=request.clock_start,
            clock_end=request.clock_end,
            versions=[list(v.version) for v in request.versions],
            samples=request.samples,
        )
        recorded = await self._call(context, lambda: self.state.complete(c, self.now()))
        log.info(
            "epoch %d shard %d %s by %s",
            c.epoch + 1,
            c.shard,
            "done" if recorded else "already done; the same report again",
            c.worker,
            extra={"worker": c.worker, "epoch": c.epoch + 1, "shard": c.shard},
        )
        if recorded and self.metrics:
            self.metrics.completions.inc()
            self.metrics.refresh(self.state, self.now())
        return scheduler_pb2.CompleteResponse(recorded=recorded)

    async def ReportEvaluation(self, request, context):
        recorded = await self._call(
            context,
            lambda: self.state.record_evaluation(
                request.epoch, request.loss, request.accuracy, request.worker_id, self.now()
            ),
        )
        log.info(
            "epoch %d: test loss %.4f, accuracy %.4f",
            request.epoch + 1,
            request.loss,
            request.accuracy,
            extra={"epoch": request.epoch + 1, "accuracy": request.accuracy, "loss": request.loss},
        )
        if recorded and self.metrics:
            self.metrics.evaluations.inc()
            self.metrics.refresh(self.state, self.now())
        if self.state.finished():
            self.finished.set()
        return scheduler_pb2.EvaluationResponse()

    async def Leave(self, request, context):
        await self._call(context, lambda: self.state.leave(request.worker_id, self.now()))
        log.info("worker %s left", request.worker_id)
        await self.sync_membership()
        return scheduler_pb2.WorkerLeaveResponse()

    async def Progress(self, request, context):
        progress = self.state.progress(self.now())
        return scheduler_pb2.ProgressResponse(
            progress_json=json.dumps(dataclasses.asdict(progress), ensure_ascii=False)
        )

    async def watch(self, stop: asyncio.Event) -> None:
        """Expire silent workers and keep the servers' membership in step, until stopped."""
        period = min(1.0, self.state.spec.lease_timeout_s / 4)
        while not stop.is_set():
            dead = self.state.expire(self.now())
            for worker_id in dead:
                log.warning(
                    "worker %s missed its heartbeats: declared dead, its shards requeued",
                    worker_id,
                    extra={"worker": worker_id},
                )
            await self.sync_membership()
            if self.metrics:
                self.metrics.workers_dead.inc(len(dead))
                self.metrics.refresh(self.state, self.now())
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), period)


def parsing_handler(service: SchedulerService) -> grpc.GenericRpcHandler:
    """Every method of the Scheduler service, taking its request as bytes: each handler
    parses and checks it (:func:`scheduler.requests.parse`) and answers INVALID_ARGUMENT
    for one it cannot, where gRPC's own deserializer would have answered UNKNOWN."""
    handlers = {}
    for method in scheduler_pb2.DESCRIPTOR.services_by_name[SERVICE].methods:
        request_cls = getattr(scheduler_pb2, method.input_type.name)
        response_cls = getattr(scheduler_pb2, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsed(getattr(service, method.name), request_cls),
            request_deserializer=None,
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(f"ps.{SERVICE}", handlers)


def _parsed(handler: Callable, request_cls: type) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = requests.parse(request_cls, raw)
        except StateError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await handler(request, context)

    return handle


Started = tuple[grpc.aio.Server, int, "SchedulerService", health.aio.HealthServicer]


async def start_scheduler(
    state: SchedulerState,
    address: str,
    serving: ServerSecurity | None = None,
    connecting: ClientSecurity | None = None,
    metrics: SchedulerMetrics | None = None,
) -> Started:
    """Serve the scheduler (with ``serving``'s token and TLS); it reaches the parameter
    servers with ``connecting``'s."""
    serving = serving or ServerSecurity()
    server = rpc.new_server(interceptors=serving.interceptors())
    service = SchedulerService(state, security=connecting, metrics=metrics)
    server.add_generic_rpc_handlers((parsing_handler(service),))
    port, health_servicer = await rpc.start_with_health(
        server, address, f"ps.{SERVICE}", credentials=serving.credentials()
    )
    return server, port, service, health_servicer
