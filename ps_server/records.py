"""The parameter store's records as plain data: workers, counters, views, results.

Immutable, apart from :class:`Tally` (the store's running counters, frozen
into :class:`Counters` for readers). The store makes them (checkpoints too,
when they read one back); Status, metrics and checkpoints read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from protos.job import Job
from ps_server.flat import GroupState


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    clock: int  # the last clock processed from this worker (its start clock before any push)
    active: bool = True
    left: bool = False  # inactive because it left (Leave), not removed: contact joins it again


@dataclass(frozen=True)
class Counters:
    """What a server has counted since its job began (a checkpoint carries them on)."""

    updates_applied: int = 0
    pushes_received: int = 0
    stale_dropped: int = 0
    duplicates: int = 0
    staleness: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    compensated: int = 0  # delay compensation: gradients corrected by the weights pulled
    uncompensated: int = 0  # delay compensation: applied as they came (no copy of those kept)


@dataclass(frozen=True)
class StoreView:
    """What a store holds, as immutable plain data: for Status, metrics and checkpoints."""

    job: Job | None = None
    steps: int = 0  # optimizer steps applied (barrier: one per step; else one per buffer)
    version: int = 0  # updates applied (the same count)
    workers: tuple[WorkerState, ...] = ()
    contributors: tuple[str, ...] = ()  # sync: workers whose gradient is in this step's sum
    counters: Counters = field(default_factory=Counters)
    parameter_bytes: int = 0
    buffered: int = 0  # buffer > 1: gradients in the pending update (ps_server.rules)
    buffered_staleness: int = 0  # their staleness summed
    kept_bytes: int = 0  # delay compensation: bytes of pulled weights kept now

    @property
    def contributions(self) -> int:
        """Gradients in the pending update: a barrier step's or a buffer's."""
        return len(self.contributors) + self.buffered

    def counts(self) -> dict[str, int]:
        """Status's counts of issue 16 (what the reply's ``contributions`` means now)."""
        c = self.counters
        return {
            "contributions": self.contributions,
            "compensated": c.compensated,
            "uncompensated": c.uncompensated,
            "kept_bytes": self.kept_bytes,
        }

    @property
    def active_workers(self) -> tuple[str, ...]:
        return tuple(w.worker_id for w in self.workers if w.active)


@dataclass(frozen=True)
class StoreState:
    """A store's whole state, copied: its view and every dtype group's tensors."""

    view: StoreView
    groups: Mapping[str, GroupState]


@dataclass(frozen=True)
class PushResult:
    applied: bool
    duplicate: bool
    dropped: bool
    version: int
    staleness: int
    lr: float


@dataclass(frozen=True)
class PullDecision:
    """Whether a pull may proceed now; if not, why and for whom it waits."""

    ready: bool
    reason: str = ""
    waiting_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class Waiter:
    worker_id: str
    clock: int
    min_version: int
    session: str = ""  # a waiting pull keeps its session live


@dataclass
class Tally:
    """The store's running counters (frozen into :class:`Counters` for readers)."""

    updates_applied: int = 0
    pushes_received: int = 0
    stale_dropped: int = 0
    duplicates: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    compensated: int = 0
    uncompensated: int = 0

    def frozen(self) -> Counters:
        return Counters(
            self.updates_applied,
            self.pushes_received,
            self.stale_dropped,
            self.duplicates,
            MappingProxyType(dict(self.staleness)),
            self.compensated,
            self.uncompensated,
        )

    @classmethod
    def of(cls, c: Counters) -> Tally:
        return cls(
            c.updates_applied,
            c.pushes_received,
            c.stale_dropped,
            c.duplicates,
            Counter(c.staleness),
            c.compensated,
            c.uncompensated,
        )
