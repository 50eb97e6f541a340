"""The parameter store: one server's parts, their optimizer state, and the mode.

Free of gRPC and of threads: every method runs to completion and either
changes the state as a whole or raises a :class:`StoreError` and changes
nothing. Waiting is the caller's business: :meth:`ParameterStore.pull_decision`
says whether a pull may proceed now and, if not, for whom it waits.

The store owns its state: waiting pulls are registered with ``add_waiter``, Status and
metrics read an immutable ``view``, checkpoints copy it out and in (``snapshot_state``,
``restore_state``).

Semantics (docs/design.md): every push carries ``(worker_id, clock)``; a clock is
the number of iterations the worker has pushed, so a push carries the
clock the worker reaches with it (1 for its first push). A worker joins at
the slowest active worker's clock, or at its own claim when that is further (a
restarted server lost pushes, not progress: :mod:`ps_server.clocks`); a push
that joins lands one past that, and its client adopts the server's clock.

How gradients become updates: :mod:`ps_server.rules` (the barrier of sync and local,
the buffer of the others) and :mod:`ps_server.compensation` (DC-ASGD). In the barrier
modes an older step's gradient is dropped and counted, and a pull with ``min_version =
t + 1`` waits until that step exists; in ssp a pull at clock ``c`` waits until every
active worker's clock is at least ``c - staleness``.

A worker is active (counted by the barrier and the bound), left (it called
Leave: a later push or pull from another client joins it again), or removed
(by set_membership: refused until made a member again). One live client
(session) per worker id: see :mod:`ps_server.sessions`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch

from protos.codec import Piece, RawChunk
from protos.job import Job, Mode
from protos.limits import Limits
from ps_server.clocks import joining_clock
from ps_server.compensation import KeptCopies
from ps_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
    WorkerIdInUse,
)
from ps_server.flat import FlatParams
from ps_server.records import (
    PullDecision,
    PushResult,
    StoreState,
    StoreView,
    Tally,
    Waiter,
    WorkerState,
)
from ps_server.rules import Barrier, Buffer, check_pending
from ps_server.sessions import LIVENESS_S, EndedSessions, Sessions
from ps_server.workers import NAMED, Workers, named

WAITING_LISTED = 1000  # waiting pulls Status lists


class ParameterStore:
    """The state of one parameter server."""

    def __init__(
        self,
        reject_nonfinite: bool = True,
        now: Callable[[], float] = time.monotonic,
        liveness_s: float = LIVENESS_S,
        kept_bytes: int = Limits().max_kept_bytes,
    ) -> None:
        """``liveness_s``: how long a quiet client keeps its worker id (shorter in tests);
        ``kept_bytes``: the bound of delay compensation's copies (:mod:`.compensation`)."""
        self._reject_nonfinite = reject_nonfinite
        self._sessions = Sessions(now, liveness_s)
        self._waiters: dict[int, Waiter] = {}  # in-flight calls: they outlive an ended job
        self._tokens = itertools.count()
        self._ended: str | None = None  # the job ended last, for the error its workers get
        self._ended_sessions = EndedSessions()  # refused in a new job with the same id
        self._kept = KeptCopies(kept_bytes, reject_nonfinite)
        self._reset()

    def _reset(self) -> None:
        """Hold no job."""
        self._job: Job | None = None
        self._params: FlatParams | None = None
        self._steps = 0
        self._version = 0
        self._workers = Workers()
        self._barrier = Barrier()  # sync, local: this step's gradients
        self._tally = Tally()
        self._buffer = Buffer()  # the modes without a barrier: gradients not yet applied
        self._kept.clear()
        self._restored = False  # holds a checkpoint's state: workers may have seen newer weights
        self._sessions.clear()

    @property
    def job(self) -> Job | None:
        return self._job

    @property
    def version(self) -> int:
        return self._version

    @property
    def steps(self) -> int:
        return self._steps

    # ----------------------------------------------------------------- init

    def initialise(
        self, job: Job, chunks: Sequence[RawChunk], params: FlatParams | None = None
    ) -> bool:
        """Hold this server's parts of ``job`` with the given initial values (or ``params``,
        :meth:`FlatParams.initial` of them, built ahead off the caller's event loop).

        Returns False, changing nothing, when an identical job is already held.
        """
        if self._job is not None:
            diff = self._job.differences(job)
            if not diff:
                return False
            if "workers" in diff:  # ranks that disagree on the world: say how
                i = diff.index("workers")
                diff[i] += (
                    f" (held: {', '.join(self._job.workers)}; asked: {', '.join(job.workers)})"
                )
            raise AlreadyExists(
                f"job {self._job.job_id!r} is already initialised here and differs in: "
                f"{', '.join(diff)}"
            )
        workers = Workers.initial(job.workers)
        params = params or FlatParams.initial(job, chunks)
        if job.settings.delay_compensation:
            self._kept.check_fits(params)
        self._job, self._params = job, params
        self._steps = self._version = 0
        self._workers = workers
        return True

    # ----------------------------------------------------------------- push

    def push(
        self,
        job_id: str,
        worker_id: str,
        clock: int,
        pulled_version: int,
        chunks: Sequence[RawChunk],
        session: str = "",
    ) -> PushResult:
        """Apply (or accumulate, or drop) one worker's gradient for this server's parts.

        ``session`` is the sending client's; another live client's worker id is refused."""
        job, params = self.check_job(job_id, session), self._held()
        if clock < 1:
            raise InvalidArgument(f"worker {worker_id!r}: bad clock {clock} (pushes start at 1)")
        record = self._contact(worker_id, session)
        if record is not None and clock <= record.clock:
            self._tally.duplicates += 1
            return PushResult(False, True, False, self._version, 0, 0.0)
        self._workers.check_claim(worker_id, clock)
        if worker_id not in self._workers:
            self._workers.check_room(1)
        if pulled_version > self._version and self._restored:
            # Weights this server lost when it came back from an older checkpoint: drop the
            # gradient; the reply's version sends the worker back to the current weights. Its
            # clock moves all the same: the server lost the push, not the worker's progress.
            self._land(worker_id, record, clock, session)
            self._tally.stale_dropped += 1
            return PushResult(False, False, True, self._version, 0, 0.0)
        if pulled_version > self._version:
            raise InvalidArgument(
                f"worker {worker_id!r}: pulled_version {pulled_version} is ahead of this "
                f"server's version {self._version}"
            )
        sync = job.settings.mode.barrier
        # a new client for this worker id whose previous client already gave this step's gradient
        # (its push is dropped); the same client giving it twice is refused
        barrier = self._barrier
        again = sync and pulled_version == self._version and worker_id in barrier.contributors
        if again and barrier.sessions.get(worker_id) == session:
            raise FailedPrecondition(
                f"worker {worker_id!r} already pushed a gradient for {job.settings.mode.value} "
                f"step {self._version}"
            )
        decoded = params.decode(chunks, what="gradient", gradient=True)
        params.gather(decoded, self._reject_nonfinite)

        lam = 0.0 if sync else job.settings.delay_compensation
        done = bool(lam) and self._kept.compensate(worker_id, pulled_version, params, lam)
        # Validated: from here on nothing raises.
        self._land(worker_id, record, clock, session)
        self._tally.pushes_received += 1
        staleness = self._version - pulled_version
        self._tally.staleness[staleness] += 1
        if sync:
            if staleness > 0 or again:
                self._tally.stale_dropped += 1
                return PushResult(False, False, True, self._version, staleness, 0.0)
            lr = job.settings.server_lr(self._steps)  # that of the step this gradient joins
            barrier.add(params, worker_id, session)
            self._maybe_finish_step()
            return PushResult(True, False, False, self._version, 0, lr)
        if lam:
            self._tally.compensated += done
            self._tally.uncompensated += not done
        lr = self._buffer.add(params, job.settings, staleness, self._steps)
        if self._buffer.full(job.settings):
            self._apply(self._buffer)
        return PushResult(True, False, False, self._version, staleness, lr)

    def _apply(self, rule: Barrier | Buffer) -> None:
        """Apply what ``rule`` holds as one update (:mod:`ps_server.rules`)."""
        self._steps += 1
        rule.apply(self._held(), self._held_job().settings, self._steps)
        self._version += 1
        self._tally.updates_applied += 1

    def _maybe_finish_step(self) -> None:
        """Barrier modes: apply the step once complete (:class:`ps_server.rules.Barrier`; a
        departed worker's gradient in stays in the mean but does not count)."""
        if self._barrier.complete(self.active_workers(), self.required_workers()):
            self._apply(self._barrier)

    def _land(self, worker_id: str, record: WorkerState | None, clock: int, session: str) -> None:
        """Record a push at ``clock`` by this client; a joining one lands at the join clock
        or its claim (:mod:`ps_server.clocks`; the client adopts it from Status)."""
        if record is None:
            record = self._workers.join(worker_id)
            clock = joining_clock(clock, record.clock)
        self._workers[worker_id] = replace(record, clock=clock)
        self._sessions.seen(worker_id, session)

    # ----------------------------------------------------------------- pull

    def pull_decision(
        self, job_id: str, worker_id: str, clock: int, min_version: int, session: str = ""
    ) -> PullDecision:
        """Whether a (taking part) pull may be served now (sync: step reached; ssp: bound
        met); a StoreError if the pull is refused (e.g. another live client's worker id)."""
        job = self.check_job(job_id, session)
        record = self._contact(worker_id, session)
        if job.settings.mode.barrier:
            if self._version >= min_version or (self._restored and min_version > self._version + 1):
                # (the second case: a worker that saw steps lost in a restore gets the current
                # weights at once instead of waiting for a step no one will push for)
                return PullDecision(True)
            required = self.required_workers()
            active = self.active_workers()
            missing = tuple(w for w in active if w not in self._barrier.contributors)
            return PullDecision(
                False,
                f"{job.settings.mode.value} step {self._version}: have "
                f"{self._barrier.given_by(active)} of {required} "
                f"required gradients; waiting for {named(missing[:NAMED], len(missing))}",
                missing[:NAMED],
            )
        if job.settings.mode is Mode.SSP:
            c = max(clock, record.clock if record else self._workers.start_clock())
            bound = c - job.settings.staleness
            behind = tuple(
                w.worker_id for w in self._workers.values() if w.active and w.clock < bound
            )
            if not behind:
                return PullDecision(True)
            first = [f"{w} at clock {self._workers[w].clock}" for w in behind[:NAMED]]
            clocks = named(first, len(behind))
            return PullDecision(
                False,
                f"ssp clock {c} (staleness {job.settings.staleness}): waiting for {clocks} "
                f"to reach clock {bound}",
                behind[:NAMED],
            )
        return PullDecision(True)

    def pull(
        self, job_id: str, worker_id: str, observe: bool = False, session: str = "", clock: int = 0
    ) -> tuple[int, int, list[Piece]]:
        """(version, the worker's clock, raw views of every held part) for a ready pull.

        A worker seen for the first time (or again after it left, or by a new
        client) joins here, unless it only observes; an observing pull is never
        refused. The views share memory with the parameters: encode them before
        the next push is applied.
        """
        job, params = self.check_job(job_id, "" if observe else session), self._held()
        if observe:
            record = self._workers.get(worker_id)
        else:
            record = self.check_contact(job_id, worker_id, session, clock)
            record = record or self._workers.join(worker_id)
            if clock > record.clock:  # pushes this server lost (ps_server.clocks)
                record = self._workers[worker_id] = replace(record, clock=clock)
            self._sessions.seen(worker_id, session)
            if job.settings.delay_compensation:
                self._kept.keep(worker_id, self._version, params)
        pieces = params.pieces(job.settings.compression.weight_dtype)
        return self._version, record.clock if record else 0, pieces

    def add_waiter(self, waiter: Waiter) -> int:
        """Register a pull that waits (Status lists it); returns its token."""
        token = next(self._tokens)
        self._waiters[token] = waiter
        return token

    def remove_waiter(self, token: int) -> None:
        """Forget a waiting pull (served, failed or abandoned)."""
        del self._waiters[token]

    def waiting(self) -> list[tuple[Waiter, PullDecision]]:
        """The registered waiting pulls with their current reasons: one per worker (the
        oldest), at most :data:`WAITING_LISTED`, so a Status reply stays small."""
        job = self._held_job()
        out = []
        oldest = {}
        for w in self._waiters.values():
            oldest.setdefault(w.worker_id, w)
        for w in itertools.islice(oldest.values(), WAITING_LISTED):
            try:
                decision = self.pull_decision(
                    job.job_id, w.worker_id, w.clock, w.min_version, w.session
                )
            except StoreError as e:  # e.g. its worker left: the pull is about to fail
                decision = PullDecision(False, str(e))
            if not decision.ready:
                out.append((w, decision))
        return out

    # ----------------------------------------------------------- membership

    def active_workers(self) -> list[str]:
        return self._workers.active()

    def required_workers(self) -> int:
        """Sync: gradients needed to finish a step."""
        backup = self._held_job().settings.backup_workers
        return max(1, len(self.active_workers()) - backup)

    def check_contact(
        self, job_id: str, worker_id: str, session: str, clock: int = 0
    ) -> WorkerState | None:
        """Raise what a pull (taking part) by this client at ``clock`` would be refused with,
        changing nothing; the record it continues, None when the worker joins."""
        self.check_job(job_id, session)
        record = self._contact(worker_id, session)
        self._workers.check_claim(worker_id, clock)
        if worker_id not in self._workers:
            self._workers.check_room(1)
        return record

    def check_room(self, worker_ids: Iterable[str]) -> None:
        """ResourceExhausted if these workers, joining, would pass the job's limit."""
        self._workers.check_room(len({w for w in worker_ids if w not in self._workers}))

    def _contact(self, worker_id: str, session: str) -> WorkerState | None:
        """The record a push or pull by this client continues; None when the worker joins
        (afresh: unknown, left, or its id's previous client went quiet). A StoreError if the
        client may not: it left, the worker was removed, or another live client holds the id."""
        record = self._workers.get(worker_id)
        holder = self._sessions.holder(worker_id)
        if holder is not None and holder.left and holder.session == session:
            raise FailedPrecondition(
                f"worker {worker_id!r}: this client left the job (Leave); a new client may "
                f"take part with this worker id"
            )
        if record is not None and not record.active and not record.left:
            raise FailedPrecondition(
                f"worker {worker_id!r} has left the job (it is not in the membership); it must "
                f"be made a member again"
            )
        self._check_session(worker_id, session, record)
        if record is None or record.left or (holder is not None and holder.session != session):
            return None
        return record

    def _check_session(self, worker_id: str, session: str, record: WorkerState | None) -> None:
        waiting = (w.session for w in self._waiters.values() if w.worker_id == worker_id)
        active = record is not None and record.active
        conflict = self._sessions.conflict(worker_id, session, active, waiting)
        if conflict is not None:
            raise WorkerIdInUse(conflict)

    def leave(self, job_id: str, worker_id: str, session: str) -> list[str]:
        """The client ``session`` is done as ``worker_id``: the worker stops counting at
        once (a sync step its absence completes is applied now) and its id is free. Leaving
        twice, or as a worker never seen, changes nothing; leaving another live client's
        worker id is refused (WorkerIdInUse). Returns the active workers."""
        job = self.check_job(job_id, session)
        if not worker_id:
            raise InvalidArgument("worker_id is empty")
        holder = self._sessions.holder(worker_id)
        if holder is not None and holder.left and holder.session == session:
            return self.active_workers()  # already left
        record = self._workers.get(worker_id)
        self._check_session(worker_id, session, record)
        if record is not None and record.active:
            self._workers[worker_id] = replace(record, active=False, left=True)
        self._sessions.left(worker_id, session)
        self._departed(job)
        return self.active_workers()

    def set_membership(self, job_id: str, active: Iterable[str]) -> list[str]:
        """Make exactly ``active`` the active workers; departed ones release the waits."""
        job = self.check_job(job_id)
        wanted = list(dict.fromkeys(active))
        if any(not w for w in wanted):
            raise InvalidArgument("worker ids must be non-empty")
        self._workers.set_active(wanted)
        self._departed(job)
        return self.active_workers()

    def _departed(self, job: Job) -> None:
        """Workers stopped counting: a barrier step their absence completes is applied; a
        buffer with no worker left active to fill it too; their kept weights are dropped."""
        if job.settings.mode.barrier:
            self._maybe_finish_step()
            return
        active = self.active_workers()
        self._kept.retain(set(active))
        if not active and self._buffer.count:
            self._apply(self._buffer)

    def end(self, job_id: str) -> bool:
        """Drop the job held here (weights, optimizer state, counters, workers), so that any
        Init may follow; its waiting pulls, and its workers' later calls, are refused as
        the calls of an ended job. False when no job is held; NotFound for another job's id."""
        if self._job is None:
            return False
        self.check_job(job_id)
        self._ended = job_id
        self._ended_sessions.remember(self._sessions.every_session(), job_id)
        self._reset()
        return True

    # ---------------------------------------------------------- read, copy

    def check_job(self, job_id: str, session: str = "") -> Job:
        """The job held, if it is ``job_id`` and ``session`` (a client's, if given) is not
        one of an ended job with that id; else the StoreError to refuse the call with."""
        ended = f"job {job_id!r} was ended on this server" if job_id == self._ended else ""
        if session and self._ended_sessions.get(session) == job_id and self._job is not None:
            raise NotFound(
                f"job {job_id!r} was ended on this server; this client took part in it, and "
                f"a new client may take part in the job {job_id!r} held now"
            )
        if self._job is None:
            if ended:
                raise NotFound(ended)
            raise FailedPrecondition("the model is not initialised on this server: call Init first")
        if job_id != self._job.job_id:
            what = ended or f"unknown job {job_id!r}"
            raise NotFound(f"{what} (this server holds job {self._job.job_id!r})")
        return self._job

    def parameter_bytes(self) -> int:
        return self._params.nbytes() if self._params else 0

    def values(self, tensor: str, index: int) -> torch.Tensor:
        """The current values of one held part (a view, not a copy)."""
        return self._held().values((tensor, index))

    def view(self) -> StoreView:
        """The state but the tensors, as immutable data (cheap: no tensor is copied)."""
        return StoreView(
            self._job,
            self._steps,
            self._version,
            tuple(self._workers.values()),
            tuple(self._barrier.contributors),
            self._tally.frozen(),
            self.parameter_bytes(),
            self._buffer.count,
            self._buffer.staleness,
            self._kept.nbytes(),
        )

    def snapshot_state(self) -> StoreState | None:
        """A copy of the whole state, tensors included (None before the model is initialised)."""
        if self._params is None:
            return None
        view = self.view()
        return StoreState(view, self._params.export(bool(view.contributions)))

    def restore_state(self, state: StoreState) -> None:
        """Make an empty store hold a copied state; a StoreError, changing nothing, if it
        does not fit. Pushes computed on newer weights than it holds are then dropped."""
        view = state.view
        if self._job is not None:
            raise AlreadyExists(f"this store already holds job {self._job.job_id!r}")
        if view.job is None:
            raise InvalidArgument("the state holds no job")
        check_pending(view.job.settings, view.buffered, view.buffered_staleness, view.contributors)
        params = FlatParams(view.job)
        params.restore(state.groups, accumulating=bool(view.contributions))
        self._job, self._params = view.job, params
        self._steps, self._version = view.steps, view.version
        self._workers = Workers((w.worker_id, w) for w in view.workers)
        self._barrier = Barrier(list(view.contributors))  # sessions are not checkpointed
        self._tally = Tally.of(view.counters)
        self._buffer = Buffer(view.buffered, view.buffered_staleness)
        self._restored = True
        self._sessions.clear()

    def _held(self) -> FlatParams:
        assert self._params is not None, "checked by check_job"
        return self._params

    def _held_job(self) -> Job:
        assert self._job is not None, "checked by check_job"
        return self._job
