"""Errors the parameter store raises; the service maps each to one gRPC status.

The store never imports grpc: each error names its status code as a string
(``code``) and the service translates. Every message names the tensor or
worker and what was wrong.
"""

from __future__ import annotations


class StoreError(Exception):
    """A request the store refused; nothing was changed."""

    code = "UNKNOWN"


class InvalidArgument(StoreError):
    """A malformed request: wrong dtype, size, tensor, part, clock, NaN/Inf."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(StoreError):
    """A well-formed request the store's state does not allow (e.g. push before init)."""

    code = "FAILED_PRECONDITION"


class AlreadyExists(StoreError):
    """An initialisation that conflicts with the model already held."""

    code = "ALREADY_EXISTS"


class NotFound(StoreError):
    """A request for a job this server does not hold."""

    code = "NOT_FOUND"


class ResourceExhausted(StoreError):
    """A request that would make the job hold more than the server allows (e.g. workers)."""

    code = "RESOURCE_EXHAUSTED"


class WorkerIdInUse(FailedPrecondition):
    """A push or pull (or leave) from another client than the live one holding the worker id;
    the service adds the typed reason WORKER_ID_IN_USE (protos.status)."""
