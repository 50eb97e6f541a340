"""Typed reasons beside a status code: what a client decides on, never the message text.

A server that wants a client to do something other than fail (fall back to
another transport, make a new segment) aborts with a status carrying a
``google.rpc.ErrorInfo`` whose ``reason`` is one of the constants here; the
client reads it with :func:`reason_of`. Messages stay for people.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "gradstore"

# The server cannot open the client's shared-memory segment (not on this host, gone,
# dropped while idle, or of the wrong size): the client makes a new one or uses streams.
SHM_SEGMENT_UNAVAILABLE = "SHM_SEGMENT_UNAVAILABLE"
# The server offers no shared-memory path at all: the client uses streams.
SHM_UNSUPPORTED = "SHM_UNSUPPORTED"

# Another live client already uses this worker_id (a different session): the client fails
# (after waiting up to LIVENESS_S at its first contact, for a crashed predecessor to go
# quiet); each process needs its own worker_id (e.g. from its rank).
WORKER_ID_IN_USE = "WORKER_ID_IN_USE"

# How long a server keeps a worker id for the client (session) it last heard from: a
# client seen this recently (or with a pull waiting) holds its id; one quiet this long may
# be replaced. A client refused at its first contact waits this long (and a margin) for a
# crashed predecessor's session to go quiet before it gives up.
LIVENESS_S = 10.0

REASONS = (SHM_SEGMENT_UNAVAILABLE, SHM_UNSUPPORTED, WORKER_ID_IN_USE)


def status_with_reason(
    code: grpc.StatusCode, message: str, reason: str, **metadata: str
) -> grpc.Status:
    """A status for ``context.abort_with_status`` carrying an ErrorInfo with ``reason``."""
    assert reason in REASONS, reason
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])
    )


async def abort_with_reason(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    **metadata: str,
) -> NoReturn:
    """Abort an asyncio handler with ``code``, ``message`` and an ErrorInfo ``reason``."""
    await context.abort_with_status(status_with_reason(code, message, reason, **metadata))
    raise AssertionError("unreachable")  # abort_with_status always raises


def reason_of(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason (of this project's domain) a failed call carries, if any."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return None
    return None if status is None else _reason(status)


def reason_in(status: grpc.Status) -> str | None:
    """The reason a status made by :func:`status_with_reason` carries (None: none)."""
    for key, value in status.trailing_metadata or ():
        if key == _DETAILS_KEY:
            return _reason(status_pb2.Status.FromString(value))
    return None


_DETAILS_KEY = "grpc-status-details-bin"  # where gRPC carries a google.rpc.Status


def _reason(status: status_pb2.Status) -> str | None:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            return info.reason
    return None
