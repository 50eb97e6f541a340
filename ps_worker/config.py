"""A client's deadlines, retries, transports and wait reports."""

from __future__ import annotations

from dataclasses import dataclass

from protos.codec import DEFAULT_CHUNK_BYTES
from protos.security import ClientSecurity
from protos.status import LIVENESS_S


@dataclass(frozen=True)
class ClientConfig:
    """Deadlines, retries and reports; units in the names."""

    timeout_s: float = 60.0  # deadline of init, push, status and membership calls
    pull_timeout_s: float = 300.0  # a pull may wait for the sync barrier or the ssp bound
    quick_timeout_s: float = 2.0  # calls that must hold nothing up: leave on close, wait reports
    retries: int = 8  # attempts after the first, on UNAVAILABLE or CANCELLED
    backoff_s: float = 0.05  # first retry delay; doubles up to max_backoff_s, with jitter
    max_backoff_s: float = 2.0
    report_wait_after_s: float = 5.0  # a call waiting this long logs what it waits for,
    report_wait_every_s: float = 10.0  # and again this often until it ends
    # refused WORKER_ID_IN_USE at its first contact, a client retries this long: a crashed
    # process's client holding the id goes quiet within the servers' liveness window
    worker_id_wait_s: float = LIVENESS_S + 2.0
    join_poll_s: float = 0.2  # join(): how often it asks the servers who is still active
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    same_host_unix_socket: bool = True  # reach a server on this host over its Unix socket
    same_host_shared_memory: bool = True  # and move tensor data through shared memory
    bulk_data_plane: bool = True  # tensor data to other hosts' servers over their bulk port
    security: ClientSecurity | None = None  # None: no TLS, the token from $PS_TOKEN if set
