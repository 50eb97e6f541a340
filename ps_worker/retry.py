"""Deadlines and retries in one place, with backoff and jitter.

Retried: UNAVAILABLE (no server), and CANCELLED, which a call racing with a
server's shutdown gets (this client cancels calls only when it closes its
channels, and then no retry can start). Every call of the parameter server
is safe to repeat: pushes are idempotent per (worker, clock).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ps_worker.errors import PSError, from_rpc_error

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 8  # attempts after the first
    backoff_s: float = 0.05  # first delay; doubles up to max_backoff_s
    max_backoff_s: float = 2.0


def call_with_retry(
    call: Callable[[float], T],
    timeout_s: float,
    policy: RetryPolicy,
    peer: str,
    what: str,
    decode_errors: tuple[type[Exception], ...] = (),
) -> T:
    """``call(timeout)`` until it succeeds, fails for good, or the deadline passes.

    Raises the typed PSError matching the final gRPC status.
    """
    deadline = time.monotonic() + timeout_s
    delay = policy.backoff_s
    attempt = 0
    while True:
        remaining = deadline - time.monotonic()
        try:
            return call(max(remaining, 0.001))
        except grpc.RpcError as e:
            retryable = e.code() in RETRYABLE
            if not retryable or attempt >= policy.retries or remaining <= delay:
                raise from_rpc_error(e, peer, what) from None
        except decode_errors as e:
            raise PSError(f"{what} on {peer}: bad reply: {e}") from None
        attempt += 1
        time.sleep(delay * random.uniform(0.5, 1.0))  # backoff before the next attempt
        delay = min(delay * 2, policy.max_backoff_s)
