"""The scheduler state's SQL schema, its row types and its refusals.

Free of SQLite connections and of gRPC: :mod:`scheduler.state` keeps the rows,
:mod:`scheduler.service` turns a refusal's ``code`` into a gRPC status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    epoch INTEGER NOT NULL, shard INTEGER NOT NULL, position INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', lease_id TEXT, worker TEXT,
    deadline REAL, attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (epoch, shard));
CREATE TABLE IF NOT EXISTS completions (
    epoch INTEGER NOT NULL, shard INTEGER NOT NULL, worker TEXT NOT NULL,
    lease_id TEXT NOT NULL, clock_start INTEGER NOT NULL, clock_end INTEGER NOT NULL,
    versions TEXT NOT NULL, samples INTEGER NOT NULL, completed_at REAL NOT NULL,
    PRIMARY KEY (epoch, shard));
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, host TEXT NOT NULL, device TEXT NOT NULL,
    registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL, state TEXT NOT NULL,
    clock INTEGER NOT NULL DEFAULT 0, samples_per_s REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS evaluations (
    epoch INTEGER PRIMARY KEY, worker TEXT, assigned_at REAL,
    loss REAL, accuracy REAL, evaluated_at REAL);
"""


class StateError(Exception):
    """A request the scheduler's state refuses; ``code`` names the gRPC status."""

    code = "FAILED_PRECONDITION"


class UnknownWorker(StateError):
    code = "NOT_FOUND"


class InvalidRequest(StateError):
    """A request no job could accept: a value out of range, a malformed id."""

    code = "INVALID_ARGUMENT"


class TooManyWorkers(StateError):
    """A registration beyond the workers a job may have (every one is in Progress)."""

    code = "RESOURCE_EXHAUSTED"


class OtherJob(StateError):
    """The state file holds another job."""


@dataclass(frozen=True)
class Task:
    epoch: int
    shard: int
    lease_id: str
    deadline: float


@dataclass(frozen=True)
class LeaseDecision:
    """The answer to a worker asking for work."""

    task: Task | None
    evaluate_epoch: int | None  # evaluate the weights for this finished epoch first
    done: bool
    reason: str  # why there is no task, for logs and progress output
    awaiting_membership: bool = False  # a task waits until the servers count this worker
    released: int = 0  # leases of this worker it no longer worked on, requeued first


@dataclass(frozen=True)
class Completion:
    epoch: int
    shard: int
    worker: str
    lease_id: str
    clock_start: int
    clock_end: int
    versions: list[list[int]]  # per push, each server's version after applying it
    samples: int


@dataclass
class Progress:
    epoch: int
    epochs: int
    shards_per_epoch: int
    done: int
    leased: int
    pending: int
    finished: bool
    workers: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    completions_per_epoch: list[int] = field(default_factory=list)
