"""Typed exceptions for the client: one per gRPC status the servers use."""

from __future__ import annotations

import grpc

from protos.status import reason_of


class PSError(Exception):
    """A request a parameter server refused or could not answer.

    ``reason``: the typed reason (a :mod:`protos.status` constant) the server gave
    beside the status code, if any: what a client decides on, never the message.
    """

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class InvalidRequestError(PSError, ValueError):
    """INVALID_ARGUMENT: a malformed tensor, dtype, size, clock or config."""


class StateError(PSError):
    """FAILED_PRECONDITION: e.g. a push before the model is initialised."""


class ConflictError(PSError):
    """ALREADY_EXISTS: an initialisation that conflicts with the model held."""


class UnknownJobError(PSError, LookupError):
    """NOT_FOUND: the server holds another job."""


class WaitTimeoutError(PSError, TimeoutError):
    """DEADLINE_EXCEEDED: e.g. a pull held by the sync barrier or the ssp bound too long.

    The message names the step or clock and the workers still waited for.
    """


class ServerUnavailableError(PSError, ConnectionError):
    """UNAVAILABLE after every retry: the server is down or unreachable."""


_BY_CODE: dict[grpc.StatusCode, type[PSError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: StateError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.NOT_FOUND: UnknownJobError,
    grpc.StatusCode.DEADLINE_EXCEEDED: WaitTimeoutError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
}


def from_rpc_error(error: grpc.RpcError, server: str, what: str) -> PSError:
    """Translate a gRPC error into the matching typed exception (``server`` names the peer)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, PSError) if code is not None else PSError
    name = code.name if code is not None else "ERROR"
    return cls(f"{what} on {server} failed ({name}): {details}", code, reason_of(error))
