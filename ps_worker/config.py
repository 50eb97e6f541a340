"""A client's deadlines, retries and same-host transports."""

from __future__ import annotations

from dataclasses import dataclass

from protos.codec import DEFAULT_CHUNK_BYTES
from protos.security import ClientSecurity


@dataclass(frozen=True)
class ClientConfig:
    """Deadlines and retries; units in the names."""

    timeout_s: float = 60.0  # deadline of init, push, status and membership calls
    pull_timeout_s: float = 300.0  # a pull may wait for the sync barrier or the ssp bound
    retries: int = 8  # attempts after the first, on UNAVAILABLE or CANCELLED
    backoff_s: float = 0.05  # first retry delay; doubles up to max_backoff_s, with jitter
    max_backoff_s: float = 2.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    same_host_unix_socket: bool = True  # reach a server on this host over its Unix socket
    same_host_shared_memory: bool = True  # and move tensor data through shared memory
    security: ClientSecurity | None = None  # the job's token and TLS, when it has them
