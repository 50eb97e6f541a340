"""The bulk data plane's wire: tensor data over a plain TCP connection beside gRPC.

gRPC's Python framing caps a stream well under what a TCP connection carries,
so for a server on another host a client moves a push's and a pull's tensor
data over a connection of its own, as raw bytes laid out as a shared-memory
segment is (:func:`protos.shm.segment_slots`), while gRPC keeps every other
call (Init, membership, status, leave, end). Both sides use this module:

- the server sends a :class:`BulkHello` with a fresh nonce; the client answers a
  :class:`BulkAuth` carrying HMAC-SHA256(token, nonce), so the token itself never
  crosses the connection; under TLS (when the job's servers use it) all of this
  runs inside the TLS session;
- then each call is a ``BulkRequest`` frame followed by its push's bytes, answered
  by a ``BulkReply`` frame (a gRPC status code, message and typed reason, or the
  pull's header) followed by the pull's bytes.

A frame is a 4-byte little-endian length and a serialized message of at most
:data:`MAX_FRAME_BYTES`. Whatever breaks these rules ends the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import struct
import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

MAGIC = b"gradstore-bulk-1"  # the first bytes each side sends
NONCE_BYTES = 32
MAX_FRAME_BYTES = 1 << 20  # a request's or reply's header: ids, clocks, a status message
MAX_AUTH_BYTES = 256  # the proof of the token, before which nothing more is read
HANDSHAKE_TIMEOUT_S = 10.0  # a connection that has not proved itself by then is closed
_LENGTH = struct.Struct("<I")
_IOV_MAX = 512  # buffers per sendmsg / recvmsg_into call (the kernel's limit is 1024)

M = TypeVar("M", bound=Message)


class BulkProtocolError(ConnectionError):
    """The peer closed the connection or broke the protocol: the connection is done."""


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from the connection (BulkProtocolError if it closes first); by the
    ``deadline`` (monotonic) if given, however slowly the bytes come (TimeoutError; at the
    latest half as long again after it)."""
    got, size = 0, len(view)
    timeout = None if deadline is None else _deadline_timeout(sock, deadline)
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise BulkProtocolError(f"connection closed after {got} of {size} bytes")
        got += n
        if timeout is not None and got < size:
            timeout = _deadline_timeout(sock, deadline, timeout)


def _deadline_timeout(sock: socket.socket, deadline: float, now_set: float = 0.0) -> float:
    """Keep the socket's timeout within the time left to the deadline (TimeoutError once it
    has passed); the timeout is set again only when the time left falls under half of it
    (setting it costs system calls, which a read of a few kilobytes would pay each time)."""
    left = _left(deadline)
    if now_set == 0.0 or left < now_set / 2:
        sock.settimeout(left)
        return left
    return now_set


def frame(message: Message) -> bytes:
    """A message as a frame: its length, then its bytes."""
    data = message.SerializeToString()
    return _LENGTH.pack(len(data)) + data


def send_frame(sock: socket.socket, message: Message) -> None:
    sock.sendall(frame(message))


def send_pieces(sock: socket.socket, pieces: list[memoryview | bytes]) -> None:
    """Send the pieces in order, gathered by the kernel (``sendmsg``) where the socket can
    (a TLS socket sends each in turn)."""
    if isinstance(sock, ssl.SSLSocket):
        for piece in pieces:
            sock.sendall(piece)
        return
    pending, i = [memoryview(p) for p in pieces if len(p)], 0
    while i < len(pending):
        sent = sock.sendmsg(pending[i : i + _IOV_MAX])
        i = _advance(pending, i, sent)


def recv_pieces(sock: socket.socket, pieces: list[memoryview]) -> None:
    """Fill the pieces in order, scattered by the kernel (``recvmsg_into``) where the socket
    can; BulkProtocolError if the connection closes first."""
    if isinstance(sock, ssl.SSLSocket):
        for piece in pieces:
            recv_exact(sock, piece)
        return
    pending, i = [p for p in pieces if len(p)], 0
    while i < len(pending):
        got = sock.recvmsg_into(pending[i : i + _IOV_MAX])[0]
        if got == 0:
            raise BulkProtocolError("connection closed before the data ended")
        i = _advance(pending, i, got)


def _advance(pending: list[memoryview], i: int, done: int) -> int:
    """Drop ``done`` bytes from pending[i:]; the index of the first piece left."""
    while done:
        n = len(pending[i])
        if done < n:
            pending[i] = pending[i][done:]
            return i
        done -= n
        i += 1
    return i


def recv_frame(
    sock: socket.socket,
    kind: type[M],
    deadline: float | None = None,
    max_bytes: int = MAX_FRAME_BYTES,
) -> M:
    """The next frame as a ``kind`` message, whole by the ``deadline`` if given;
    BulkProtocolError for one over ``max_bytes`` (before anything is allocated for it) or
    a malformed one."""
    head = memoryview(bytearray(_LENGTH.size))
    recv_exact(sock, head, deadline)
    (size,) = _LENGTH.unpack(head)
    if size > max_bytes:
        raise BulkProtocolError(f"a frame of {size} bytes; the limit is {max_bytes}")
    body = memoryview(bytearray(size))
    recv_exact(sock, body, deadline)
    try:
        return kind.FromString(body)
    except DecodeError as e:
        raise BulkProtocolError(f"a malformed {kind.__name__}: {e}") from None


def _left(deadline: float) -> float:
    """Seconds to the deadline; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the peer was too slow")
    return left


def send_magic(sock: socket.socket) -> None:
    sock.sendall(MAGIC)


def recv_magic(sock: socket.socket, deadline: float | None = None) -> None:
    got = memoryview(bytearray(len(MAGIC)))
    recv_exact(sock, got, deadline)
    if bytes(got) != MAGIC:
        raise BulkProtocolError("not a gradstore bulk connection")


def mac(token: str | None, nonce: bytes) -> bytes:
    """The proof of holding ``token`` for this nonce (empty without a token)."""
    if not token:
        return b""
    return hmac.new(token.encode(), nonce, hashlib.sha256).digest()


def proves(token: str | None, nonce: bytes, sent: bytes) -> bool:
    """Whether ``sent`` proves the token (constant time); anything goes without one."""
    return not token or hmac.compare_digest(mac(token, nonce), sent)


def bare_host(host: str) -> str:
    """A host as sockets take it: ``[::1]`` (as addresses write IPv6) is ``::1``."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def tune(sock: socket.socket) -> None:
    """No Nagle delay: a tiny push is one small write, answered at once."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
