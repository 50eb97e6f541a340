"""A job's workers on one server: each one's clock and membership, and how many there may be."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from protos.limits import Limits
from ps_server.clocks import MAX_CLOCK_LEAD, check_claim
from ps_server.errors import InvalidArgument, ResourceExhausted
from ps_server.records import WorkerState

MAX_WORKERS = Limits().max_workers  # worker ids a job may hold on a server
NAMED = 8  # workers a waiting pull's reason names (a reply stays small)


def named(first: Sequence[str], total: int) -> str:
    """The first (at most :data:`NAMED`) of ``total`` workers, and how many more."""
    if not total:
        return "no active worker (set the membership)"
    more = f" and {total - len(first)} more" if total > len(first) else ""
    return ", ".join(first) + more


class Workers(dict[str, WorkerState]):
    """Worker id -> :class:`WorkerState`. A worker is active (counted by the sync barrier
    and the ssp bound), left (it called Leave), or removed (by the membership)."""

    @classmethod
    def initial(cls, workers: Sequence[str]) -> Workers:
        """The workers an Init names, at clock 0."""
        if len(workers) > MAX_WORKERS:
            raise InvalidArgument(f"{len(workers)} workers; the limit is {MAX_WORKERS}")
        return cls((w, WorkerState(w, 0)) for w in workers)

    def active(self) -> list[str]:
        return [w.worker_id for w in self.values() if w.active]

    def start_clock(self) -> int:
        """A joining worker starts at the slowest active worker's clock, so it holds no one."""
        clocks = [w.clock for w in self.values() if w.active]
        return min(clocks) if clocks else 0

    def check_claim(self, worker_id: str, clock: int) -> None:
        """Refuse a clock beyond what the job can reach (:mod:`ps_server.clocks`)."""
        own = self.get(worker_id)
        if own is not None and 0 <= clock <= own.clock + MAX_CLOCK_LEAD:
            return  # within the lead of its own clock, so of the fastest: no scan per call
        check_claim(worker_id, clock, (w.clock for w in self.values()))

    def check_room(self, new: int) -> None:
        """Refuse ``new`` more workers beyond :data:`MAX_WORKERS`."""
        if len(self) + new > MAX_WORKERS:
            raise ResourceExhausted(
                f"this job has {len(self)} workers; {new} more would pass the limit "
                f"of {MAX_WORKERS}"
            )

    def join(self, worker_id: str) -> WorkerState:
        """The worker (again) active, at the join clock."""
        if worker_id not in self:
            self.check_room(1)
        record = self[worker_id] = WorkerState(worker_id, self.start_clock())
        return record

    def set_active(self, wanted: Sequence[str]) -> None:
        """Make exactly ``wanted`` the active workers (new ones at the join clock)."""
        self.check_room(sum(1 for w in wanted if w not in self))
        start = self.start_clock()
        for w, record in self.items():
            self[w] = replace(record, active=w in wanted, left=False)
        for w in wanted:
            if w not in self:
                self[w] = WorkerState(w, start)
