"""The server's side of the bulk data plane (:mod:`protos.bulk`).

A listening TCP socket beside the gRPC port; each connection gets a thread
that proves the client holds the job's token, then per call receives the
request and its push's bytes into the connection's buffer, runs the service's
one slot step (:meth:`ParameterService.slot_step`) on the event loop, and
sends the reply and the pull's bytes from the same buffer. The threads do the
socket work with the GIL released, so the event loop only applies and copies.

A connection holds one buffer the size of this server's share of the model;
at most ``max_connections`` are open, and one idle for ``idle_s`` is closed
(its client reconnects). Anything that breaks the protocol closes the
connection and changes nothing; a refused call is answered with the status
code, message and reason a gRPC call would get.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import resource
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np

from protos import bulk, ps_pb2
from protos.codec import Piece
from protos.shm import segment_slots
from protos.status import reason_in
from ps_server.flat import PartKey
from ps_server.segments import piece_bytes

log = logging.getLogger("ps_server.bulk")


@dataclass(frozen=True)
class BulkConfig:
    """Where the bulk data plane listens, and what it may hold."""

    host: str
    port: int = 0  # 0: any free port (clients learn it from Status)
    max_connections: int = 1024  # each holds a buffer of this server's share
    idle_s: float = 120.0  # a connection quiet this long is closed (its buffer freed)
    data_timeout_s: float = 60.0  # a call's bytes must arrive within this


ACCEPT_BACKOFF_S = 0.5  # after accept fails (out of file descriptors): try again this late


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on the gRPC port's host: IPv4, or IPv6 (``[::1]``; ``[::]`` and
    ``::`` take IPv4 too where the system can)."""
    host = bulk.bare_host(host)
    if ":" not in host:
        return socket.create_server((host, port), backlog=128)
    dual = host == "::" and socket.has_dualstack_ipv6()
    return socket.create_server(
        (host, port), family=socket.AF_INET6, backlog=128, dualstack_ipv6=dual
    )


def connections_within_fd_limit(wanted: int) -> int:
    """At most ``wanted`` connections, and at most half the file descriptors this process
    may open (gRPC, checkpoints and segments need the rest)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft // 2))


def _shut(sock: socket.socket) -> None:
    """End a connection from another thread: its thread's next read returns at once."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Aborted(Exception):
    """A slot step refused, as a gRPC handler's abort would."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


class CallContext:
    """What the service's handlers use of a gRPC context, for one bulk call."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s if timeout_s > 0 else None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise Aborted(status.code, status.details, reason_in(status))


class Buffer:
    """A connection's bytes: the push received, then the pull to send."""

    def __init__(self) -> None:
        self.data = np.zeros(0, np.uint8)

    def of(self, size: int) -> np.ndarray:
        if len(self.data) != size:
            self.data = np.zeros(size, np.uint8)  # zeroed: padding never carries old bytes
        return self.data


class BulkSlots:
    """A slot step's data in a connection's buffer (a :class:`ps_server.segments.SlotIO`)."""

    name = "bulk step"

    def __init__(self, buffer: Buffer, data_bytes: int, has_push: bool, received: bool) -> None:
        self.buffer = buffer
        self.data_bytes = data_bytes
        self.has_push = has_push
        self.received = received  # False: more than the share came, and was not read

    async def open(self, size: int, context) -> None:
        if self.data_bytes != (size if self.has_push else 0) or not self.received:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bulk step: {self.data_bytes} bytes of data for a "
                f"{'push' if self.has_push else 'pull'} of this job's {size}-byte share"
                + ("" if self.received else " (not read: the connection closes)"),
            )

    async def read(self, size: int, context) -> memoryview:
        return memoryview(self.buffer.data)[:size]

    async def write(
        self, size: int, offsets: dict[PartKey, int], pieces: list[Piece], context
    ) -> None:
        out = self.buffer.of(size)
        for piece in pieces:
            start, data = piece_bytes(piece, offsets)
            out[start : start + len(data)] = np.frombuffer(data, np.uint8)


class BulkPlane:
    """The listening socket and its connections' threads."""

    def __init__(self, config: BulkConfig, token: str | None, tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.token = token
        self.tls = tls
        self.listener = listen(config.host, config.port)
        self.port: int = self.listener.getsockname()[1]
        self.instance = uuid.uuid4().hex  # as Status gives it: a client checks the hello's
        self.max_connections = connections_within_fd_limit(config.max_connections)
        self.closing = False
        self._service = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._share: tuple[object, int] = (None, 0)  # (job, its segment size)

    def serve(self, service, loop: asyncio.AbstractEventLoop) -> None:
        """Start accepting connections for ``service`` (a ParameterService on ``loop``)."""
        self._service, self._loop = service, loop
        threading.Thread(target=self._accept, name="bulk-accept", daemon=True).start()

    def close(self) -> None:
        """Refuse every call from now on, and close the listener and every connection."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        """Accept until closed; a failure to accept or to start a thread (out of file
        descriptors, memory or threads) is logged, and accepting goes on once it passes."""
        while not self.closing:
            try:
                sock, _ = self.listener.accept()
            except OSError as e:
                if self.closing:
                    return
                log.warning("bulk data plane cannot accept now: %s", e)
                time.sleep(ACCEPT_BACKOFF_S)  # a back-off while the resource is short
                continue
            with self._lock:
                if len(self._open) >= self.max_connections:
                    sock.close()  # the client uses gRPC streams instead
                    continue
                self._open.add(sock)
            try:
                threading.Thread(target=self._connection, args=(sock,), daemon=True).start()
            except RuntimeError as e:  # no more threads
                log.warning("bulk data plane cannot serve a connection now: %s", e)
                self._forget(sock, sock)

    def _connection(self, raw: socket.socket) -> None:
        sock = raw
        # The whole handshake (TLS included) by its deadline, however slowly bytes come.
        watchdog = threading.Timer(bulk.HANDSHAKE_TIMEOUT_S, _shut, (raw,))
        watchdog.start()
        try:
            deadline = time.monotonic() + bulk.HANDSHAKE_TIMEOUT_S
            raw.settimeout(bulk.HANDSHAKE_TIMEOUT_S)
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True)
            bulk.tune(sock)
            if not self._handshake(sock, deadline):
                return
            watchdog.cancel()
            buffer = Buffer()
            while not self.closing:
                idle = time.monotonic() + self.config.idle_s
                request = bulk.recv_frame(sock, ps_pb2.BulkRequest, idle)
                if not self._call(sock, request, buffer):
                    return
        except (OSError, bulk.BulkProtocolError, concurrent.futures.CancelledError) as e:
            log.debug("bulk connection closed: %s", e)
        finally:
            watchdog.cancel()
            self._forget(raw, sock)

    def _forget(self, raw: socket.socket, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(raw)
        with contextlib.suppress(OSError):
            sock.close()

    def _handshake(self, sock: socket.socket, deadline: float) -> bool:
        """Hello, and the client's proof of the token; False: refused (told why)."""
        nonce = os.urandom(bulk.NONCE_BYTES)
        bulk.send_magic(sock)
        hello = ps_pb2.BulkHello(nonce=nonce, token=bool(self.token), instance=self.instance)
        bulk.send_frame(sock, hello)
        bulk.recv_magic(sock, deadline)
        auth = bulk.recv_frame(sock, ps_pb2.BulkAuth, deadline, bulk.MAX_AUTH_BYTES)
        if not bulk.proves(self.token, nonce, auth.mac):
            why = "no token" if not auth.mac else "a wrong token"
            code = grpc.StatusCode.UNAUTHENTICATED
            bulk.send_frame(sock, ps_pb2.BulkReply(code=code.value[0], message=f"bulk: {why}"))
            return False
        bulk.send_frame(sock, ps_pb2.BulkReply())
        return True

    def _call(self, sock: socket.socket, request: ps_pb2.BulkRequest, buffer: Buffer) -> bool:
        """One call: its data in, the step on the event loop, the reply out. A request
        claiming more data than this job's share is answered as the step refuses it (no
        job, an unknown one, or the size), without reading the data; then the connection
        closes (False)."""
        size = request.data_bytes
        received = size <= self._share_bytes()
        if size and received:
            deadline = time.monotonic() + self.config.data_timeout_s
            bulk.recv_exact(sock, memoryview(buffer.of(size)), deadline)
        assert self._loop is not None
        step = self._watched(self._step(request, buffer, received), sock.fileno())
        reply = asyncio.run_coroutine_threadsafe(step, self._loop).result()
        data = memoryview(buffer.data)[: reply.data_bytes]
        bulk.send_pieces(sock, [bulk.frame(reply), data])
        return received

    def _share_bytes(self) -> int:
        """The segment size of the job held now (0: none); read from this thread, racing
        nothing that matters: the step checks the size again on the event loop."""
        job = self._service.store.job if self._service is not None else None
        if job is None:
            return 0
        if self._share[0] is not job:
            self._share = (job, segment_slots(job.layout, job.server_index)[1])
        return self._share[1]

    @staticmethod
    async def _watched(step: Awaitable[ps_pb2.BulkReply], fileno: int) -> ps_pb2.BulkReply:
        """The step, cancelled if its connection turns readable meanwhile: the client closed
        it (or broke the protocol), so a pull waiting for it stops holding its worker id."""
        task = asyncio.ensure_future(step)
        loop = asyncio.get_running_loop()
        loop.add_reader(fileno, task.cancel)
        try:
            return await task
        finally:
            loop.remove_reader(fileno)

    async def _step(
        self, request: ps_pb2.BulkRequest, buffer: Buffer, received: bool
    ) -> ps_pb2.BulkReply:
        if self.closing:
            code = grpc.StatusCode.UNAVAILABLE
            return ps_pb2.BulkReply(code=code.value[0], message="the server is shutting down")
        push = request.push if request.HasField("push") else None
        pull = request.pull if request.HasField("pull") else None
        io = BulkSlots(buffer, request.data_bytes, push is not None, received)
        try:
            header = await self._service.slot_step(push, pull, io, CallContext(request.timeout_s))
        except Aborted as e:
            return ps_pb2.BulkReply(code=e.code.value[0], message=e.message, reason=e.reason or "")
        except Exception as e:  # a handler's bug: UNKNOWN, as gRPC answers it
            log.exception("bulk step failed")
            return ps_pb2.BulkReply(code=grpc.StatusCode.UNKNOWN.value[0], message=repr(e))
        return ps_pb2.BulkReply(header=header, data_bytes=len(buffer.data) if pull else 0)
