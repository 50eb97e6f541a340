"""The scheduler's state: job, workers, the data-shard task queue, evaluations.

Kept in SQLite (one file, or ``:memory:`` in tests) so a scheduler killed and
restarted on the same file continues the job; free of gRPC and of clocks:
every decision takes ``now`` (seconds) as an argument.

Tasks are (epoch, shard) pairs handed out as leases in epoch order, each
epoch's shards in an order shuffled from the seed. A lease has a deadline,
extended by the heartbeats of the worker that reports working on it; a worker
whose heartbeats stop is declared dead and its leases go back to the queue, and
so does a lease its live worker no longer reports (after a scheduler restart
that lost a reply, say). Only a lease's holder may complete it, once (a repeat
of that very completion is answered, not recorded again); the same holds for an
epoch's evaluation and the worker it was assigned to.

Workers are ``active`` (training, or about to: counted by the servers' sync
barrier and ssp bound), ``idle`` (asked for work and got none), ``dead`` or
``left``. The servers' membership is the set of active workers.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Collection

import numpy as np

from protos.jobspec import JobSpec
from protos.limits import Limits
from scheduler.evaluations import Evaluations
from scheduler.records import (
    SCHEMA,
    Completion,
    InvalidRequest,
    LeaseDecision,
    OtherJob,
    Progress,
    StateError,
    Task,
    TooManyWorkers,
    UnknownWorker,
)

MAX_WORKERS = Limits().max_workers  # registrations a job takes, the dead ones included


class SchedulerState(Evaluations):
    """Durable job state; every method commits before it returns."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Transaction(self.db)

    # ------------------------------------------------------------------ job

    def create_or_resume(self, spec: JobSpec, shards: int) -> bool:
        """Store a new job, or check that the file holds this one (OtherJob naming what
        differs if not). True if created."""
        row = self.db.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
        if row is not None:
            stored = JobSpec.from_json(row[0])
            old, new = stored.to_dict(), spec.to_dict()
            differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if differ:
                each = "; ".join(
                    f"{k} ({_brief(old.get(k))}, now {_brief(new.get(k))})" for k in differ
                )
                raise OtherJob(
                    f"the state file holds another job {stored.job_id!r}: it differs in {each}"
                )
            return False
        with self._tx():
            self.db.execute("INSERT INTO meta VALUES ('spec', ?)", (spec.to_json(),))
            self.db.execute("INSERT INTO meta VALUES ('shards', ?)", (str(shards),))
            for epoch in range(spec.epochs):
                order = np.random.default_rng([spec.seed, epoch]).permutation(shards)
                self.db.executemany(
                    "INSERT INTO tasks (epoch, shard, position) VALUES (?, ?, ?)",
                    [(epoch, int(shard), pos) for pos, shard in enumerate(order)],
                )
        return True

    def discard(self) -> bool:
        """Forget the job this file holds, if any (to start a new one); True if it held one."""
        held = self.db.execute("SELECT 1 FROM meta WHERE key='spec'").fetchone() is not None
        with self._tx():
            for table in ("meta", "tasks", "completions", "workers", "evaluations"):
                self.db.execute(f"DELETE FROM {table}")
        return held

    @property
    def spec(self) -> JobSpec:
        row = self.db.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
        if row is None:
            raise StateError("no job in this state file")
        return JobSpec.from_json(row[0])

    @property
    def shards(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='shards'").fetchone()[0])

    # -------------------------------------------------------------- workers

    def register(self, host: str, device: str, now: float) -> str:
        """A new worker (a restarted process is a new worker); returns its id."""
        n = self.db.execute("SELECT COUNT(*) FROM workers").fetchone()[0]
        if n >= MAX_WORKERS:
            raise TooManyWorkers(f"this job has had {n} workers, its limit; start a new job")
        worker_id = f"w{n}-{uuid.uuid4().hex[:6]}"
        with self._tx():
            self.db.execute(
                "INSERT INTO workers (worker_id, host, device, registered_at, last_heartbeat, "
                "state) VALUES (?, ?, ?, ?, ?, 'active')",
                (worker_id, host, device, now, now),
            )
        return worker_id

    def _worker_state(self, worker_id: str) -> str:
        row = self.db.execute(
            "SELECT state FROM workers WHERE worker_id=?", (worker_id,)
        ).fetchone()
        if row is None:
            raise UnknownWorker(f"unknown worker {worker_id!r}: register first")
        return row[0]

    def _check_alive(self, worker_id: str) -> None:
        state = self._worker_state(worker_id)
        if state in ("dead", "left"):
            raise StateError(
                f"worker {worker_id!r} is {state} (missed heartbeats for longer than the "
                "lease timeout, or left); register again as a new worker"
            )

    def heartbeat(
        self,
        worker_id: str,
        clock: int,
        samples_per_s: float,
        now: float,
        lease_ids: Collection[str] | None = None,
    ) -> None:
        """Record that a worker lives; the deadlines of the leases it reports working on
        (``lease_ids``; None: all of its leases) move to now + lease timeout. A lease it
        holds but no longer reports keeps its deadline, and is requeued when that passes."""
        self._check_alive(worker_id)
        deadline = now + self.spec.lease_timeout_s
        with self._tx():
            self.db.execute(
                "UPDATE workers SET last_heartbeat=?, clock=?, samples_per_s=? WHERE worker_id=?",
                (now, clock, samples_per_s, worker_id),
            )
            if lease_ids is None:
                self.db.execute(
                    "UPDATE tasks SET deadline=? WHERE worker=? AND state='leased'",
                    (deadline, worker_id),
                )
            else:
                self.db.executemany(
                    "UPDATE tasks SET deadline=? WHERE worker=? AND state='leased' AND lease_id=?",
                    [(deadline, worker_id, lease) for lease in set(lease_ids)],
                )

    def leave(self, worker_id: str, now: float) -> None:
        """A worker exits: its leases go back to the queue."""
        self._worker_state(worker_id)
        with self._tx():
            self.db.execute("UPDATE workers SET state='left' WHERE worker_id=?", (worker_id,))
            self._requeue_leases_of(worker_id)

    def _requeue_leases_of(self, worker_id: str, keep: Collection[str] = ()) -> int:
        """Put a worker's leased shards back in the queue, but for the leases in ``keep``;
        returns how many."""
        kept = sorted(set(keep))
        return self.db.execute(
            "UPDATE tasks SET state='pending', lease_id=NULL, worker=NULL, deadline=NULL "
            f"WHERE worker=? AND state='leased' AND lease_id NOT IN ({','.join('?' * len(kept))})",
            (worker_id, *kept),
        ).rowcount

    def expire(self, now: float) -> list[str]:
        """Declare workers dead whose heartbeats stopped; requeue their leases. Returns them."""
        timeout = self.spec.lease_timeout_s
        dead = [
            r[0]
            for r in self.db.execute(
                "SELECT worker_id FROM workers WHERE state IN ('active', 'idle') "
                "AND last_heartbeat + ? < ?",
                (timeout, now),
            )
        ]
        with self._tx():
            expired = 0
            for worker_id in dead:
                self.db.execute("UPDATE workers SET state='dead' WHERE worker_id=?", (worker_id,))
                expired += self._requeue_leases_of(worker_id)
            # Leases whose own deadline passed (a worker alive but stuck on one shard).
            expired += self.db.execute(
                "UPDATE tasks SET state='pending', lease_id=NULL, worker=NULL, deadline=NULL "
                "WHERE state='leased' AND deadline < ?",
                (now,),
            ).rowcount
            if expired:
                self.db.execute(
                    "INSERT INTO meta (key, value) VALUES ('expired_leases', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                    (expired, expired),
                )
        return dead

    def expired_leases(self) -> int:
        """Leases taken back so far because their worker died or their deadline passed."""
        row = self.db.execute("SELECT value FROM meta WHERE key='expired_leases'").fetchone()
        return int(row[0]) if row else 0

    def resume_grace(self, now: float) -> None:
        """After a scheduler restart, give every live worker a full timeout to reconnect."""
        with self._tx():
            self.db.execute(
                "UPDATE workers SET last_heartbeat=? WHERE state IN ('active', 'idle')", (now,)
            )
            self.db.execute(
                "UPDATE tasks SET deadline=? WHERE state='leased'",
                (now + self.spec.lease_timeout_s,),
            )

    def active_workers(self) -> list[str]:
        """The servers' membership: workers that train or are about to."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT worker_id FROM workers WHERE state='active' ORDER BY registered_at"
            )
        ]

    def live_workers(self) -> list[str]:
        """Workers neither dead nor gone: active or idle."""
        query = "SELECT worker_id FROM workers WHERE state IN ('active', 'idle')"
        return [r[0] for r in self.db.execute(query)]

    def registered_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM workers").fetchone()[0]

    # ---------------------------------------------------------------- tasks

    def lease(
        self,
        worker_id: str,
        now: float,
        members: frozenset[str] | None = None,
        held: Collection[str] | None = None,
    ) -> LeaseDecision:
        """Hand the worker its next task and/or an epoch to evaluate.

        ``members`` is the membership the servers have confirmed; a task is
        only handed to a worker the servers already count (None: skip the check).
        ``held``: the leases the worker still works on; any other lease it holds
        (one whose reply it never got, say) goes back to the queue first (None:
        keep them all).
        """
        self._check_alive(worker_id)
        released = 0
        if held is not None:
            with self._tx():
                released = self._requeue_leases_of(worker_id, keep=held)
        spec = self.spec
        evaluate = self._assign_evaluation(worker_id, now)
        if self.finished():
            return LeaseDecision(None, evaluate, True, "the job is finished", released=released)
        registered = self.registered_count()
        if registered < spec.expected_workers:
            return LeaseDecision(
                None,
                evaluate,
                False,
                f"waiting for workers: {registered} of {spec.expected_workers} registered",
                released=released,
            )
        row = self.db.execute(
            "SELECT epoch, shard FROM tasks WHERE state='pending' ORDER BY epoch, position LIMIT 1"
        ).fetchone()
        if row is None:
            self._set_state(worker_id, "idle")
            reason = (
                "every remaining shard is leased"
                if self._count("leased")
                else "waiting for the last evaluation"
            )
            return LeaseDecision(None, evaluate, False, reason, released=released)
        self._set_state(worker_id, "active")
        if members is not None and worker_id not in members:
            reason = "waiting for the servers to count this worker"
            return LeaseDecision(None, evaluate, False, reason, True, released)
        lease_id = uuid.uuid4().hex[:12]
        deadline = now + spec.lease_timeout_s
        with self._tx():
            self.db.execute(
                "UPDATE tasks SET state='leased', lease_id=?, worker=?, deadline=?, "
                "attempts=attempts+1 WHERE epoch=? AND shard=?",
                (lease_id, worker_id, deadline, row[0], row[1]),
            )
        task = Task(row[0], row[1], lease_id, deadline)
        return LeaseDecision(task, evaluate, False, "", released=released)

    def _set_state(self, worker_id: str, state: str) -> None:
        with self._tx():
            self.db.execute("UPDATE workers SET state=? WHERE worker_id=?", (state, worker_id))

    def _count(self, state: str, epoch: int | None = None) -> int:
        if epoch is None:
            return self.db.execute("SELECT COUNT(*) FROM tasks WHERE state=?", (state,)).fetchone()[
                0
            ]
        return self.db.execute(
            "SELECT COUNT(*) FROM tasks WHERE state=? AND epoch=?", (state, epoch)
        ).fetchone()[0]

    def complete(self, c: Completion, now: float) -> bool:
        """Record a finished shard; True if recorded now, False for a repeat of the
        completion recorded (the same holder, lease and figures). Anything else is refused
        and changes nothing: only the current holder of a lease may complete it."""
        self._worker_state(c.worker)
        spec, shards = self.spec, self.shards
        if not (0 <= c.epoch < spec.epochs and 0 <= c.shard < shards):
            raise InvalidRequest(
                f"no task for epoch {c.epoch} shard {c.shard}: the job has {spec.epochs} "
                f"epoch(s) of {shards} shard(s), counted from 0"
            )
        state, worker, lease_id = self.db.execute(
            "SELECT state, worker, lease_id FROM tasks WHERE epoch=? AND shard=?",
            (c.epoch, c.shard),
        ).fetchone()
        what = f"epoch {c.epoch} shard {c.shard}"
        if state == "done":
            prior = next(p for p in self._completions(c.epoch, c.shard))
            if (prior.worker, prior.lease_id) != (c.worker, c.lease_id):
                raise StateError(
                    f"{what} is already done, under another lease than {c.lease_id!r} of "
                    f"worker {c.worker!r}"
                )
            if prior != c:
                raise StateError(
                    f"lease {c.lease_id!r} ({what}) was completed before with other figures"
                )
            return False
        if (state, worker, lease_id) != ("leased", c.worker, c.lease_id):
            raise StateError(
                f"worker {c.worker!r} holds no lease {c.lease_id!r} on {what} (it is "
                f"{'leased to another' if state == 'leased' else state}: never leased to it, "
                "or requeued when its worker died, left or stopped reporting it)"
            )
        with self._tx():
            self.db.execute(
                "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.epoch,
                    c.shard,
                    c.worker,
                    c.lease_id,
                    c.clock_start,
                    c.clock_end,
                    json.dumps(c.versions),
                    c.samples,
                    now,
                ),
            )
            self.db.execute(
                "UPDATE tasks SET state='done', deadline=NULL WHERE epoch=? AND shard=?",
                (c.epoch, c.shard),
            )
        return True

    # ---------------------------------------------------------------- views

    def completions(self) -> list[Completion]:
        return self._completions()

    def _completions(self, epoch: int | None = None, shard: int | None = None) -> list[Completion]:
        """Every completion, or the one of (epoch, shard)."""
        where = "" if epoch is None else "WHERE epoch=? AND shard=? "
        return [
            Completion(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7])
            for r in self.db.execute(
                "SELECT epoch, shard, worker, lease_id, clock_start, clock_end, versions, "
                f"samples FROM completions {where}ORDER BY epoch, completed_at",
                () if epoch is None else (epoch, shard),
            )
        ]

    def progress(self, now: float) -> Progress:
        spec, shards = self.spec, self.shards
        done = self._count("done")
        current = min(done // shards, spec.epochs - 1) if shards else 0
        pending_epoch = self.db.execute(
            "SELECT MIN(epoch) FROM tasks WHERE state != 'done'"
        ).fetchone()[0]
        return Progress(
            epoch=pending_epoch if pending_epoch is not None else current,
            epochs=spec.epochs,
            shards_per_epoch=shards,
            done=done,
            leased=self._count("leased"),
            pending=self._count("pending"),
            finished=self.finished(),
            workers=[
                {
                    "worker_id": r[0],
                    "host": r[1],
                    "device": r[2],
                    "state": r[3],
                    "clock": r[4],
                    "heartbeat_age_s": round(now - r[5], 3),
                    "samples_per_s": r[6],
                }
                for r in self.db.execute(
                    "SELECT worker_id, host, device, state, clock, last_heartbeat, samples_per_s "
                    "FROM workers ORDER BY registered_at"
                )
            ],
            evaluations=[
                {
                    "epoch": r[0],
                    "loss": r[1],
                    "accuracy": r[2],
                    "worker": r[3],
                    "evaluated_at": r[4],
                }
                for r in self.db.execute(
                    "SELECT epoch, loss, accuracy, worker, evaluated_at FROM evaluations "
                    "WHERE accuracy IS NOT NULL ORDER BY epoch"
                )
            ],
            completions_per_epoch=[self._count("done", e) for e in range(spec.epochs)],
        )


def _brief(value: object, limit: int = 60) -> str:
    """A value for a one-line message, cut short."""
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
