"""Which transport reaches each server: chosen in one place, fallen back from in one place.

A server on this host (its status names this hostname) is reached over its
Unix socket, and, unless the job compresses (compression is for the wire),
its tensor data moves through shared memory when it offers a directory for
it. A server elsewhere that offers a bulk port gets the job's tensor data
over it (:mod:`ps_worker.bulk`), unless the job compresses. Everything else
goes over gRPC streams; a fused step whose share fits one message is one
Step call. Shared memory falls back by the typed reason a server refuses a
step with (:func:`after_refusal`), never by its message; bulk falls back to
streams for a call when it cannot connect.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from protos import ps_pb2, status
from protos.security import ClientSecurity
from ps_worker.bulk import Bulk, BulkUnavailable, Where
from ps_worker.config import ClientConfig
from ps_worker.errors import PSError
from ps_worker.link import Link
from ps_worker.payload import Plan
from ps_worker.retry import RetryPolicy
from ps_worker.transport import SharedMemory, Streams, Transport, UnaryStep

T = TypeVar("T")
log = logging.getLogger("ps_worker")

STREAMS = "streams"  # give shared memory up for this server: streams from now on
RENEW = "renew"  # make a new segment and try once more


def after_refusal(reason: str | None, verified: bool) -> str | None:
    """What a refused shared-memory step means: STREAMS, RENEW, or None (the error stands).

    ``verified``: the server has opened one of this client's segments before, so a
    segment it cannot open now was dropped (idle, or the server restarted); if it never
    has, it cannot see this client's segments at all (it is not on this machine).
    """
    if reason == status.SHM_UNSUPPORTED:
        return STREAMS
    if reason == status.SHM_SEGMENT_UNAVAILABLE:
        return RENEW if verified else STREAMS
    return None


@dataclass
class Route:
    """How one server is reached."""

    link: Link
    streams: Streams | None = None  # set with the job
    shm: SharedMemory | None = None  # while the server takes this client's segments
    bulk: Bulk | None = None  # a server elsewhere with a bulk port (its data goes there)


class Router:
    """Every server's route; ``run`` performs one server's part of a call."""

    def __init__(self, addresses: Sequence[str], config: ClientConfig) -> None:
        self.config = config
        policy = RetryPolicy(config.retries, config.backoff_s, config.max_backoff_s)
        security = config.security or ClientSecurity()
        self.routes = [Route(Link(a, security, policy, self._reconnect)) for a in addresses]
        self._lock = threading.Lock()
        self._chosen = False
        self._plan: Plan | None = None

    @property
    def links(self) -> list[Link]:
        return [r.link for r in self.routes]

    def names(self) -> list[str]:
        """How each server is reached: "shm", "bulk", "unix" or "tcp"."""
        self.choose()
        return [
            "shm"
            if r.shm is not None
            else "bulk"
            if r.bulk is not None and r.bulk.usable
            else r.link.kind
            for r in self.routes
        ]

    def choose(self) -> None:
        """Once, at the first call: choose every server's route."""
        if self._chosen:
            return
        with self._lock:
            if not self._chosen:
                for i in range(len(self.routes)):
                    self._choose(i)
                self._chosen = True  # only now: other callers wait for the choice

    def use(self, plan: Plan) -> None:
        """Move this job's tensors from now on."""
        self._plan = plan
        for i, route in enumerate(self.routes):
            route.streams = self._streams(i, route.link)
            if route.shm is not None:
                route.shm.use(plan)
                if plan.compressing:
                    route.shm = None
            if route.bulk is not None:
                route.bulk.use(plan)
                if plan.compressing:
                    route.bulk = None

    def run(self, server: int, op: Callable[[Transport], T]) -> T:
        """``op`` over the server's transport, falling back from shared memory as the
        server's refusal says."""
        route = self.routes[server]
        for renewed in (False, True):
            shm = route.shm
            if shm is None:
                break
            try:
                return op(shm)
            except PSError as e:
                action = after_refusal(e.reason, shm.verified)
                if action is None:
                    raise
                shm.drop()
                if action == STREAMS:
                    route.shm = None
                    break
                if renewed:
                    raise PSError(
                        f"server {route.link.address} cannot open this client's "
                        f"shared-memory segment: {e}",
                        e.code,
                        e.reason,
                    ) from e
        bulk = route.bulk
        if bulk is not None and bulk.usable:
            try:
                return op(bulk)
            except BulkUnavailable as e:
                log.warning("%s; gRPC streams for now", e)
        assert route.streams is not None, "a transfer needs the job"
        return op(route.streams)

    def close(self) -> None:
        """Cancel calls in flight and close the channels."""
        for route in self.routes:
            route.link.close()

    def release(self) -> None:
        """Remove this client's segments and close its bulk connections (once no call is
        in flight)."""
        for route in self.routes:
            if route.shm is not None:
                route.shm.drop()
            if route.bulk is not None:
                route.bulk.drop()

    def _streams(self, server: int, link: Link) -> Streams:
        """Streams; one Step message each way where the server's share fits one message."""
        assert self._plan is not None
        config = self.config
        fits = self._plan.share_bytes(server) <= config.chunk_bytes
        kind = UnaryStep if fits else Streams
        return kind(link, server, config.chunk_bytes, config.timeout_s, config.pull_timeout_s)

    def _choose(self, server: int) -> None:
        """Shared memory, else the Unix socket, of a reachable server on this host; else its
        bulk port; else gRPC streams over TCP."""
        config = self.config
        same_host = config.same_host_unix_socket or config.same_host_shared_memory
        if not (same_host or config.bulk_data_plane):
            return
        route = self.routes[server]
        link = route.link
        try:
            reply = link.calls.status(ps_pb2.StatusRequest(), timeout=5.0)
        except grpc.RpcError:
            return  # not reachable now: stay on TCP, retried as usual
        compressing = self._plan is not None and self._plan.compressing
        if same_host and reply.hostname == socket.gethostname():
            if config.same_host_shared_memory and os.path.isdir(reply.shm_dir) and not compressing:
                self._offer_shm(server, reply.shm_dir)
            path = reply.unix_socket.removeprefix("unix:")
            if config.same_host_unix_socket and path and os.path.exists(path):
                link.connect(reply.unix_socket, "unix")
        taken = route.shm is not None or link.kind != "tcp"
        if config.bulk_data_plane and reply.bulk_port and not (taken or compressing):
            self._offer_bulk(server, reply)

    def _offer_shm(self, server: int, directory: str) -> None:
        """Take the server's shared-memory directory (kept while it opens our segments)."""
        route = self.routes[server]
        if route.shm is not None:
            route.shm.directory = directory
            return
        config = self.config
        shm = SharedMemory(route.link, server, directory, config.timeout_s, config.pull_timeout_s)
        if self._plan is not None:
            shm.use(self._plan)
        route.shm = shm

    def _offer_bulk(self, server: int, status: ps_pb2.StatusResponse) -> None:
        """Take the server's bulk port (kept, and connected to at the first call)."""
        route = self.routes[server]
        if route.bulk is not None:
            route.bulk.drop()  # (the server may have restarted: its connections are gone)
            route.bulk.where = Where(
                server, route.bulk.where.host, status.bulk_port, status.instance
            )
            return
        config = self.config
        security = config.security or ClientSecurity()
        bulk = Bulk(route.link, server, security, status, config.timeout_s, config.pull_timeout_s)
        if self._plan is not None:
            bulk.use(self._plan)
        route.bulk = bulk

    def _reconnect(self, link: Link) -> None:
        """Back to the server's TCP address, and choose its route anew."""
        with self._lock:
            link.connect(link.address, "tcp")
            self._choose(next(i for i, r in enumerate(self.routes) if r.link is link))
