"""Where a worker's clock lands on this server, and how far ahead a client may claim.

A clock counts the pushes a worker has made (docs/design.md). The server keeps
each worker's last clock; the client keeps its own, the highest any server
told it. Two rules reconcile them:

- A worker's clock here never stays behind what the worker says it has
  pushed: a server restarted from a checkpoint (or afresh) lost the workers'
  pushes, not their progress. A pull's clock (the last one pushed) moves it;
  a push dropped because it was computed on weights the server lost moves it;
  a joining push lands at its claim or one past the join clock (the slowest
  active worker's), whichever is further. Else an ssp pull would wait for
  clocks no worker will ever push again; a high clock holds no one back.
- A claim may run at most :data:`MAX_CLOCK_LEAD` ahead of the fastest clock
  the server knows: a client cannot poison its clock with 2**63, and a
  restored server can still take up to that many lost pushes.
"""

from __future__ import annotations

from collections.abc import Iterable

from ps_server.errors import InvalidArgument

MAX_CLOCK_LEAD = 1 << 20  # pushes a claim may run ahead of the fastest known clock


def check_claim(worker_id: str, claim: int, known: Iterable[int]) -> None:
    """Refuse a clock outside what the job can reach (below 0, or too far ahead)."""
    if claim < 0:
        raise InvalidArgument(f"worker {worker_id!r}: bad clock {claim}")
    limit = max(known, default=0) + MAX_CLOCK_LEAD
    if claim > limit:
        raise InvalidArgument(
            f"worker {worker_id!r}: clock {claim} is more than {MAX_CLOCK_LEAD} ahead of the "
            f"fastest clock on this server ({limit - MAX_CLOCK_LEAD})"
        )


def joining_clock(claim: int, join_clock: int) -> int:
    """The clock a joining push lands at: one past the join clock, or its claim."""
    return max(claim, join_clock + 1)
