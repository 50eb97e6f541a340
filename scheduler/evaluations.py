"""An epoch's evaluation: assigned, once the epoch is done, to one worker, which reports it.

A mixin of :class:`scheduler.state.SchedulerState`, on the same SQLite rows.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from scheduler.records import InvalidRequest, StateError

if TYPE_CHECKING:
    from protos.jobspec import JobSpec


class Evaluations:
    """Which worker evaluates which finished epoch, and the results."""

    db: sqlite3.Connection
    spec: JobSpec
    shards: int

    def _tx(self):
        raise NotImplementedError

    def _count(self, state: str, epoch: int | None = None) -> int:
        raise NotImplementedError

    def _worker_state(self, worker_id: str) -> str:
        raise NotImplementedError

    def _assign_evaluation(self, worker_id: str, now: float) -> int | None:
        """The earliest finished epoch not evaluated, unless a live worker already has it."""
        shards = self.shards
        for epoch in range(self.spec.epochs):
            if self._count("done", epoch) < shards:
                return None
            row = self.db.execute(
                "SELECT worker, accuracy FROM evaluations WHERE epoch=?", (epoch,)
            ).fetchone()
            if row is not None and row[1] is not None:
                continue
            holder = row[0] if row else None
            if (
                holder is not None
                and holder != worker_id
                and self._worker_state(holder) in ("active", "idle")
            ):
                continue
            with self._tx():
                self.db.execute(
                    "INSERT INTO evaluations (epoch, worker, assigned_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(epoch) DO UPDATE SET worker=excluded.worker, "
                    "assigned_at=excluded.assigned_at",
                    (epoch, worker_id, now),
                )
            return epoch
        return None

    def record_evaluation(
        self, epoch: int, loss: float, accuracy: float, worker_id: str, now: float
    ) -> bool:
        """Record an epoch's evaluation by the worker it was assigned to; True if recorded
        now, False for a repeat of the one recorded (same worker and figures)."""
        self._worker_state(worker_id)
        if not 0 <= epoch < self.spec.epochs:
            raise InvalidRequest(f"no epoch {epoch} in this job")
        if not 0.0 <= accuracy <= 1.0:
            raise InvalidRequest(f"accuracy {accuracy} is not within [0, 1]")
        row = self.db.execute(
            "SELECT worker, loss, accuracy FROM evaluations WHERE epoch=?", (epoch,)
        ).fetchone()
        if row is None or row[0] != worker_id:
            raise StateError(
                f"epoch {epoch}'s evaluation is not assigned to worker {worker_id!r} (the "
                "epoch is not finished yet, or another worker evaluates it)"
            )
        if row[2] is not None:
            if (row[1], row[2]) != (loss, accuracy):
                raise StateError(f"epoch {epoch} was evaluated before, with other figures")
            return False
        with self._tx():
            self.db.execute(
                "UPDATE evaluations SET loss=?, accuracy=?, evaluated_at=? WHERE epoch=?",
                (loss, accuracy, now, epoch),
            )
        return True

    def finished(self) -> bool:
        """Every shard of every epoch done, and every epoch evaluated."""
        if self._count("done") < self.shards * self.spec.epochs:
            return False
        evaluated = self.db.execute(
            "SELECT COUNT(*) FROM evaluations WHERE accuracy IS NOT NULL"
        ).fetchone()[0]
        return evaluated >= self.spec.epochs
