"""Which client holds each worker id: one live client (session) per worker id.

A client sends a random session id with every push and pull. The session a
server saw last for a worker id holds that id; another session's push or
pull for it is refused (:class:`~ps_server.errors.WorkerIdInUse`) while the
holder is live: the worker is active, the holder has not left, and it was
seen within the liveness window (:data:`protos.status.LIVENESS_S`, which
clients know too) or has a pull waiting. A holder that left or
went quiet is replaced by the next session, which joins as a new worker
would (a restarted process reusing its rank's id). Sessions are not
checkpointed: after a restart the first session seen claims the id.

Pure bookkeeping over a clock passed in; the store decides what a conflict means.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from protos.status import LIVENESS_S

__all__ = ["ENDED_SESSIONS", "LIVENESS_S", "EndedSessions", "Holder", "Sessions"]

ENDED_SESSIONS = 100_000  # the clients of ended jobs a store remembers, to refuse them


@dataclass(frozen=True)
class Holder:
    session: str
    seen: float  # the clock's time of its last push or pull
    left: bool = False  # it called Leave: done for good, its id is free


class Sessions:
    """The holder of each worker id, and when it was last seen."""

    def __init__(
        self, now: Callable[[], float] = time.monotonic, liveness_s: float = LIVENESS_S
    ) -> None:
        self._now = now
        self._liveness_s = liveness_s  # a holder seen this recently keeps its worker id
        self._holders: dict[str, Holder] = {}
        self._all: set[str] = set()  # every session seen in this job, holder or not

    def holder(self, worker_id: str) -> Holder | None:
        return self._holders.get(worker_id)

    def seen(self, worker_id: str, session: str) -> None:
        """``session`` holds ``worker_id`` and was seen now."""
        self._holders[worker_id] = Holder(session, self._now())
        self._all.add(session)

    def left(self, worker_id: str, session: str) -> None:
        """``session`` is done with ``worker_id``: the id is free, the session may not return."""
        self._holders[worker_id] = Holder(session, self._now(), left=True)
        self._all.add(session)

    def every_session(self) -> frozenset[str]:
        """Every session seen (pushed, pulled or left) since the last clear."""
        return frozenset(self._all)

    def clear(self) -> None:
        self._holders.clear()
        self._all.clear()

    def conflict(
        self, worker_id: str, session: str, active: bool, waiting: Iterable[str]
    ) -> str | None:
        """Why ``session`` may not use ``worker_id`` now (another live client holds it), or
        None. ``active``: the worker counts for the job; ``waiting``: the sessions of its
        pulls that wait now (each counts as seen now)."""
        if any(other != session for other in waiting):
            return _in_use(worker_id, "it has a pull waiting now")
        held = self._holders.get(worker_id)
        if held is None or held.session == session or held.left or not active:
            return None
        ago = self._now() - held.seen
        if ago >= self._liveness_s:
            return None
        return _in_use(worker_id, f"last seen {ago:.1f} s ago")


class EndedSessions:
    """The clients seen in ended jobs (the latest :data:`ENDED_SESSIONS`), by job id: a
    new job with the same id refuses them, as clients of the job that was ended."""

    def __init__(self) -> None:
        self._jobs: dict[str, str] = {}  # session -> job id, oldest first

    def remember(self, sessions: frozenset[str], job_id: str) -> None:
        for session in sessions - {""}:
            self._jobs.pop(session, None)  # re-inserted: the latest are kept
            self._jobs[session] = job_id
        while len(self._jobs) > ENDED_SESSIONS:
            del self._jobs[next(iter(self._jobs))]

    def get(self, session: str) -> str | None:
        """The ended job ``session`` took part in, if remembered."""
        return self._jobs.get(session)


def _in_use(worker_id: str, when: str) -> str:
    return (
        f"worker id {worker_id!r} is already used by another live client ({when}); give each "
        f"process its own worker_id (e.g. from its rank)"
    )
