"""Typed exceptions for the client: one per gRPC status the servers use."""

from __future__ import annotations

import grpc

from protos.status import WORKER_ID_IN_USE, reason_of


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


class WorkerIdInUseError(StateError):
    """FAILED_PRECONDITION with reason WORKER_ID_IN_USE: another live client (another
    session) works under this worker id. Retried only at a client's first contact, for up
    to ``ClientConfig.worker_id_wait_s`` (a restarted process's predecessor going quiet);
    otherwise give each process its own id (e.g. from its rank), or let the client choose
    a unique one."""


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

# A typed reason that means more than its status code.
_BY_REASON: dict[str, type[PSError]] = {WORKER_ID_IN_USE: WorkerIdInUseError}


def from_rpc_error(error: grpc.RpcError, server: str, what: str) -> PSError:
    """Translate a gRPC error into the matching typed exception (``server`` names the peer)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    reason = reason_of(error)
    cls = _BY_CODE.get(code, PSError) if code is not None else PSError
    if reason in _BY_REASON:
        cls = _BY_REASON[reason]
    name = code.name if code is not None else "ERROR"
    return cls(f"{what} on {server} failed ({name}): {details}", code, reason)
