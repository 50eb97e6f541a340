"""The client's side of the bulk data plane (:mod:`protos.bulk`): a push's and a pull's
tensor data over a TCP connection of its own to a server on another host.

:class:`Bulk` is a transport like the others (:mod:`ps_worker.transport`): a call
takes an idle connection (or opens one: TLS when the client uses it, then the
token's proof), writes the gradients into the connection's buffer, laid out as
a segment, sends the request and the buffer, and reads the reply into the
same buffer and from it into place. A refused call raises what the same gRPC
call would (:class:`BulkCallError` is a ``grpc.RpcError``), so retries and
typed errors work as they do for gRPC; a lost connection is UNAVAILABLE,
retried on a new one (pushes are idempotent per worker and clock).

When no connection can be made (the server offers no bulk port, a firewall,
the server restarted on a new port and is not back yet), :class:`BulkUnavailable`
tells the router to use gRPC streams for the call; bulk is tried again after
:data:`RETRY_S`, on the port the server's Status then gives.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, replace

import grpc

from protos import bulk, ps_pb2
from protos.security import ClientSecurity
from protos.shm import segment_slots
from protos.status import status_with_reason
from ps_worker.link import Link
from ps_worker.payload import Gradients, Plan, Sink, SlotBuffers
from ps_worker.transport import Step

RETRY_S = 5.0  # after a failed connect, gRPC streams this long before bulk is tried again,
MAX_RETRY_S = 300.0  # doubling for each failure in a row up to this
OFF_FAILURES = 10  # a server with its bulk port off: asked again only every MAX_RETRY_S
CONNECT_TIMEOUT_S = 2.0  # a port a firewall silently drops costs a call at most this


class BulkUnavailable(Exception):
    """No bulk connection to this server now: use gRPC streams for this call."""


class BulkCallError(grpc.RpcError):
    """A bulk call that failed, as the same gRPC call would have (code, details, reason)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self._code, self._message = code, message
        self._metadata = (
            status_with_reason(code, message, reason).trailing_metadata if reason else ()
        )

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self):
        return self._metadata


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def host_of(address: str) -> str:
    """The host part of ``host:port`` (``[v6]:port`` too)."""
    return bulk.bare_host(address.rsplit(":", 1)[0])


class WrongServer(bulk.BulkProtocolError):
    """The bulk port reached greets as another server process (a port taken anew)."""


@dataclass(frozen=True)
class Where:
    """A server's bulk port as its Status gives it, and the id it greets with."""

    server: int  # its index in the job
    host: str
    port: int
    instance: str = ""


class Connection:
    """One proven connection to a server's bulk port, and its buffer."""

    def __init__(self, sock: socket.socket, plan: Plan, server: int) -> None:
        self.sock = sock
        self.size = segment_slots(plan.layout, server)[1]
        self.data = memoryview(bytearray(self.size))
        self.slots = SlotBuffers(self.data, plan, server)

    @classmethod
    def open(cls, where: Where, security: ClientSecurity, plan: Plan, timeout_s: float):
        """Connect within ``timeout_s`` (and the handshake's own limits), under TLS when the
        client uses it, check it is the server Status named, and prove the token (OSError or
        BulkProtocolError if that fails, WrongServer for another server; BulkCallError if
        the server refuses the token)."""
        limit = min(timeout_s, bulk.HANDSHAKE_TIMEOUT_S)
        deadline = time.monotonic() + limit
        sock = socket.create_connection((where.host, where.port), min(limit, CONNECT_TIMEOUT_S))
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            tls = security.ssl_context()
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=where.host)
            bulk.tune(sock)
            bulk.recv_magic(sock, deadline)
            hello = bulk.recv_frame(sock, ps_pb2.BulkHello, deadline)
            if where.instance and hello.instance != where.instance:
                raise WrongServer(f"port {where.port} is another server's")
            bulk.send_magic(sock)
            token = security.token if hello.token else None
            bulk.send_frame(sock, ps_pb2.BulkAuth(mac=bulk.mac(token, hello.nonce)))
            answer = bulk.recv_frame(sock, ps_pb2.BulkReply, deadline)
            if answer.code:
                raise BulkCallError(
                    _CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message
                )
            return cls(sock, plan, where.server)
        except BaseException:
            sock.close()
            raise

    def call(
        self,
        request: ps_pb2.BulkRequest,
        grads: Gradients | None,
        sink: Sink | None,
        timeout_s: float,
    ) -> tuple[ps_pb2.PullHeader | None, ps_pb2.BulkReply]:
        """One call; the pull's header (None if refused) and the reply. OSError,
        BulkProtocolError: the connection is broken."""
        deadline = time.monotonic() + timeout_s
        request.timeout_s = timeout_s
        pieces: list[memoryview] = []
        if grads is not None:
            request.data_bytes = self.size
            pieces = self.slots.gradients(grads) or []  # straight from the gradients
            if not pieces:
                self.slots.write(grads)
                pieces = [self.data]
        sock = self.sock
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        bulk.send_pieces(sock, [bulk.frame(request), *pieces])
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        reply = bulk.recv_frame(sock, ps_pb2.BulkReply)
        if reply.code:
            return None, reply
        if reply.data_bytes:
            if reply.data_bytes != self.size or sink is None:
                raise bulk.BulkProtocolError(
                    f"{reply.data_bytes} bytes of pull data; this job's share is {self.size}"
                )
            places = self.slots.destinations(sink)  # straight into place
            if places is None:
                bulk.recv_exact(sock, self.data)
                self.slots.read(sink)
            else:
                bulk.recv_pieces(sock, places)
        return reply.header, reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Bulk:
    """A server's tensor data over its bulk port; idle connections are kept for reuse."""

    name = "bulk"

    def __init__(
        self,
        link: Link,
        server: int,
        security: ClientSecurity,
        status: ps_pb2.StatusResponse,
        timeout_s: float,
        pull_timeout_s: float,
    ) -> None:
        self.link = link
        self.security = security
        self.where = Where(server, host_of(link.address), status.bulk_port, status.instance)
        self.timeout_s = timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.plan: Plan | None = None
        self.retry_at = 0.0  # before this (monotonic), no new connection is tried
        self.failures = 0  # connects failed in a row: the wait before the next doubles
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        """False while a failed connect keeps this server on streams."""
        return bool(self._idle) or time.monotonic() >= self.retry_at

    def use(self, plan: Plan) -> None:
        """Lay out this job's data from now on (connections are per job: buffers differ)."""
        self.drop()
        self.plan = plan

    def push(self, header: ps_pb2.PushHeader, grads: Gradients) -> ps_pb2.PushResponse:
        return self._call(ps_pb2.BulkRequest(push=header), grads, None).push

    def pull(self, request: ps_pb2.PullRequest, sink: Sink) -> ps_pb2.PullHeader:
        return self._call(ps_pb2.BulkRequest(pull=request), None, sink)

    def step(self, header: ps_pb2.StepHeader, grads: Gradients, sink: Sink) -> Step:
        pulled = self._call(ps_pb2.BulkRequest(push=header.push, pull=header.pull), grads, sink)
        return pulled.push, pulled

    def _call(
        self, request: ps_pb2.BulkRequest, grads: Gradients | None, sink: Sink | None
    ) -> ps_pb2.PullHeader:
        def attempt(_calls, timeout: float) -> ps_pb2.PullHeader:
            conn = self._take(timeout)
            try:
                header, reply = conn.call(request, grads, sink, timeout)
            except TimeoutError:
                conn.close()
                raise BulkCallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:.1f}s"
                ) from None
            except (OSError, bulk.BulkProtocolError) as e:
                conn.close()
                raise BulkCallError(
                    grpc.StatusCode.UNAVAILABLE, f"bulk connection lost: {e}"
                ) from None
            if header is None:  # refused: the server may close the connection after it
                conn.close()
                code = _CODES.get(reply.code, grpc.StatusCode.UNKNOWN)
                raise BulkCallError(code, reply.message, reply.reason)
            self._give(conn)
            return header

        timeout = self.pull_timeout_s if sink is not None else self.timeout_s
        return self.link.call("bulk step", attempt, timeout)

    def _take(self, timeout_s: float) -> Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if time.monotonic() < self.retry_at:
            raise BulkUnavailable(f"server {self.link.address}: bulk connect failed recently")
        assert self.plan is not None, "a transfer needs the job"
        try:
            conn = self._open(timeout_s)
        except (OSError, bulk.BulkProtocolError, BulkCallError, BulkUnavailable) as e:
            wait = min(RETRY_S * 2**self.failures, MAX_RETRY_S)
            self.failures += 1
            self.retry_at = time.monotonic() + wait
            raise BulkUnavailable(
                f"server {self.link.address}: cannot use bulk ({e}); tried again in {wait:g}s"
            ) from None
        self.failures = 0
        return conn

    def _open(self, timeout_s: float) -> Connection:
        """A new connection; if the port refuses it or greets as another server, once more
        where Status says now (a restarted server listens on a new port)."""
        assert self.plan is not None
        try:
            return Connection.open(self.where, self.security, self.plan, timeout_s)
        except (ConnectionRefusedError, WrongServer):
            now = self._where_now()
            if now is None or now == self.where:
                raise
            self.where = now
            if not now.port:  # restarted with --bulk-port none
                self.failures = OFF_FAILURES
                raise BulkUnavailable(f"server {self.link.address} has no bulk port now") from None
            return Connection.open(now, self.security, self.plan, timeout_s)

    def _where_now(self) -> Where | None:
        """Where the server's Status says its bulk port is now (port 0: off; None: no
        answer)."""
        try:
            reply = self.link.calls.status(ps_pb2.StatusRequest(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return replace(self.where, port=reply.bulk_port, instance=reply.instance)

    def _give(self, conn: Connection) -> None:
        with self._lock:
            self._idle.append(conn)

    def drop(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
