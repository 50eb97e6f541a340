"""The parameter store: one server's parts, their optimizer state, and the mode.

Free of gRPC and of threads: every method runs to completion and either
changes the state as a whole or raises a :class:`StoreError` and changes
nothing. Waiting is the caller's business: :meth:`ParameterStore.pull_decision`
says whether a pull may proceed now and, if not, for whom it waits.

Semantics (docs/design.md): every push carries ``(worker_id, clock)``; a clock is
the number of iterations the worker has pushed, so a push carries the
clock the worker reaches with it (1 for its first push).

- sync: gradients for step ``t`` (pushes whose ``pulled_version`` is ``t``)
  are summed until ``R = max(1, active - backup_workers)`` workers have
  contributed; their mean is applied once and the step becomes ``t + 1``.
  Older-step gradients are dropped and counted. A pull with
  ``min_version = t + 1`` waits until that step exists.
- async: every push is applied at once.
- ssp: pushes are applied at once; a pull at clock ``c`` waits until every
  active worker's clock is at least ``c - staleness``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protos.codec import (
    CodecError,
    Piece,
    RawChunk,
    WireDType,
    check_chunk,
    check_sparse_chunk,
    to_raw,
    to_torch,
    wire_dtype,
)
from protos.job import Job, Mode
from protos.layout import Part
from ps_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
)

PartKey = tuple[str, int]


@dataclass
class FlatGroup:
    """Every held part of one dtype, back to back in preallocated, reused buffers.

    One optimizer step over the whole group replaces a step per tensor: the
    per-call overhead no longer grows with the number of tensors.
    """

    wire: WireDType
    param: torch.Tensor
    state: dict[str, torch.Tensor]
    grad: torch.Tensor  # scratch: the incoming gradient, gathered
    accumulator: torch.Tensor | None = None  # sync: sum of this step's gradients


@dataclass(frozen=True)
class Slot:
    """Where one part lives: elements [start, start + part.count) of its dtype's group."""

    part: Part
    group: str
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.part.count


@dataclass
class WorkerRecord:
    worker_id: str
    clock: int  # the last clock processed from this worker (its start clock before any push)
    active: bool = True


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


@dataclass
class Counters:
    updates_applied: int = 0
    pushes_received: int = 0
    stale_dropped: int = 0
    duplicates: int = 0
    staleness: Counter[int] = field(default_factory=Counter)


# slot, element offset within the part, values, and (top-k chunks) the values' indices
GradChunk = tuple[Slot, int, torch.Tensor, torch.Tensor | None]


class ParameterStore:
    """The state of one parameter server."""

    def __init__(self, reject_nonfinite: bool = True) -> None:
        self.reject_nonfinite = reject_nonfinite
        self.job: Job | None = None
        self.parts: dict[PartKey, Slot] = {}
        self.groups: dict[str, FlatGroup] = {}
        self.steps = 0  # optimizer steps applied (sync: the step; async: every push)
        self.version = 0  # updates applied (sync: the step)
        self.workers: dict[str, WorkerRecord] = {}
        self.contributors: list[str] = []  # sync: workers whose gradient is in the accumulators
        self.counters = Counters()
        self.waiters: dict[object, Waiter] = {}
        self.restored = False  # holds a checkpoint's state: workers may have seen newer weights

    # ----------------------------------------------------------------- init

    def initialise(self, job: Job, chunks: Sequence[RawChunk]) -> bool:
        """Hold this server's parts of ``job`` with the given initial values.

        Returns False, changing nothing, when an identical job is already held.
        """
        if self.job is not None:
            if self.job == job:
                return False
            diff = ", ".join(self.job.differences(job))
            raise AlreadyExists(
                f"job {self.job.job_id!r} is already initialised here and differs in: {diff}"
            )
        slots, groups = allocate(job)
        decoded = self._decode(job, slots, chunks, what="initial value")
        for key_chunks in decoded.values():
            for slot, offset, values, _ in key_chunks:
                start = slot.start + offset
                groups[slot.group].param[start : start + values.numel()] = values
        for group in groups.values():
            group.state = job.settings.optimizer.init_state(group.param)
        self.job = job
        self.parts = slots
        self.groups = groups
        self.steps = 0
        self.version = 0
        self.workers = {w: WorkerRecord(w, 0) for w in job.workers}
        return True

    # ----------------------------------------------------------------- push

    def push(
        self,
        job_id: str,
        worker_id: str,
        clock: int,
        pulled_version: int,
        chunks: Sequence[RawChunk],
    ) -> PushResult:
        """Apply (or accumulate, or drop) one worker's gradient for this server's parts."""
        job = self.check_job(job_id)
        if clock < 1:
            raise InvalidArgument(f"worker {worker_id!r}: bad clock {clock} (pushes start at 1)")
        record = self.workers.get(worker_id)
        if record is not None and not record.active:
            raise FailedPrecondition(
                f"worker {worker_id!r} has left the job; it must be made a member again"
            )
        if record is not None and clock <= record.clock:
            self.counters.duplicates += 1
            return PushResult(False, True, False, self.version, 0, 0.0)
        if pulled_version > self.version and self.restored:
            # Weights this server lost when it came back from an older checkpoint: drop the
            # gradient; the reply's version sends the worker back to the current weights.
            self.counters.stale_dropped += 1
            return PushResult(False, False, True, self.version, 0, 0.0)
        if pulled_version > self.version:
            raise InvalidArgument(
                f"worker {worker_id!r}: pulled_version {pulled_version} is ahead of this "
                f"server's version {self.version}"
            )
        if (
            job.settings.mode is Mode.SYNC
            and pulled_version == self.version
            and worker_id in self.contributors
        ):
            raise FailedPrecondition(
                f"worker {worker_id!r} already pushed a gradient for sync step {self.version}"
            )
        self._gather(self._decode(job, self.parts, chunks, what="gradient", gradient=True))

        # Validated: from here on nothing raises.
        record = record or self._join(worker_id)
        record.clock = clock
        self.counters.pushes_received += 1
        staleness = self.version - pulled_version
        self.counters.staleness[staleness] += 1
        if job.settings.mode is Mode.SYNC:
            if staleness > 0:
                self.counters.stale_dropped += 1
                return PushResult(False, False, True, self.version, staleness, 0.0)
            lr = self._scheduled_lr()  # that of the step this gradient joins
            self._accumulate()
            self.contributors.append(worker_id)
            self._maybe_finish_step()
            return PushResult(True, False, False, self.version, 0, lr)
        lr = self._scheduled_lr()
        if job.settings.staleness_aware_lr:
            lr /= max(1, staleness)
        self._apply(lr)
        return PushResult(True, False, False, self.version, staleness, lr)

    def _decode(
        self,
        job: Job,
        slots: dict[PartKey, Slot],
        chunks: Sequence[RawChunk],
        what: str,
        gradient: bool = False,
    ) -> dict[PartKey, list[GradChunk]]:
        """Check chunks cover each part exactly once with the right dtype and sizes.

        A gradient travels as the job's compression says: in its gradient dtype,
        and for top-k as (indices, values) chunks, at least one per part.
        """
        dtypes = job.layout.dtypes
        compression = job.settings.compression if gradient else None
        sparse = bool(compression and compression.topk_ratio)
        grad_wire = (
            wire_dtype(compression.gradient_dtype)
            if compression and compression.gradient_dtype
            else None
        )
        tensors = {key[0] for key in slots}
        decoded: dict[PartKey, list[GradChunk]] = {key: [] for key in slots}
        for chunk in chunks:
            key = (chunk.tensor, chunk.part)
            slot = slots.get(key)
            if slot is None:
                if chunk.tensor in tensors:
                    raise InvalidArgument(
                        f"tensor {chunk.tensor!r} part {chunk.part} is not held by this server"
                    )
                known = any(s.name == chunk.tensor for s in job.layout.specs)
                raise InvalidArgument(
                    f"tensor {chunk.tensor!r} is not held by this server"
                    if known
                    else f"unknown tensor {chunk.tensor!r}"
                )
            wire = grad_wire or dtypes[slot.part.tensor]
            try:
                if sparse:
                    indices, raw = check_sparse_chunk(chunk, wire, slot.part.count)
                    at = torch.from_numpy(indices.astype(np.int64))
                    decoded[key].append((slot, 0, to_torch(raw, wire), at))
                    continue
                raw = check_chunk(chunk, wire, slot.part.count)
            except CodecError as e:
                raise InvalidArgument(f"{what}: {e}") from None
            decoded[key].append((slot, int(chunk.offset), to_torch(raw, wire), None))
        if sparse:
            missing = [key for key, found in decoded.items() if not found]
            if missing:
                raise InvalidArgument(
                    f"{what} for tensor {missing[0][0]!r} part {missing[0][1]}: no chunk sent"
                )
            return decoded
        for key, slot in slots.items():
            spans = sorted((offset, v.numel()) for _, offset, v, _ in decoded[key])
            covered = 0
            for offset, n in spans:
                if offset != covered:
                    raise InvalidArgument(
                        f"{what} for tensor {key[0]!r} part {key[1]}: "
                        + (
                            f"elements {covered}..{offset} missing"
                            if offset > covered
                            else f"element {offset} sent twice"
                        )
                    )
                covered += n
            if covered != slot.part.count:
                raise InvalidArgument(
                    f"{what} for tensor {key[0]!r} part {key[1]}: {covered} of {slot.part.count} "
                    "values sent"
                )
        return decoded

    def _gather(self, decoded: dict[PartKey, list[GradChunk]]) -> None:
        """Copy a validated gradient into the groups' scratch buffers and check it is finite.

        Touches only scratch buffers, so a NaN found here still changes nothing.
        """
        for key_chunks in decoded.values():
            for n, (slot, offset, values, indices) in enumerate(key_chunks):
                grad = self.groups[slot.group].grad
                if indices is None:
                    start = slot.start + offset
                    grad[start : start + values.numel()].copy_(values)  # casts from the wire
                    continue
                part = grad[slot.start : slot.stop]
                if n == 0:  # top-k: the elements no chunk names are zero
                    part.zero_()
                part[indices] = values.to(grad.dtype)
        if not self.reject_nonfinite:
            return
        for group in self.groups.values():
            if not _all_finite(group.grad):
                bad = next(
                    k
                    for k, slot in self.parts.items()
                    if slot.group == group.wire.name
                    and not _all_finite(group.grad[slot.start : slot.stop])
                )
                raise InvalidArgument(
                    f"gradient for tensor {bad[0]!r} part {bad[1]} contains NaN or Inf"
                )

    def _accumulate(self) -> None:
        first = not self.contributors
        for group in self.groups.values():
            if group.accumulator is None:
                group.accumulator = torch.empty_like(group.param)
            if first:
                group.accumulator.copy_(group.grad)
            else:
                group.accumulator.add_(group.grad)

    def _maybe_finish_step(self) -> None:
        """Sync: apply the mean once enough workers have contributed."""
        if not self.contributors or len(self.contributors) < self.required_workers():
            return
        n = len(self.contributors)
        assert self.job is not None
        lr = self._scheduled_lr()
        self.steps += 1
        for group in self.groups.values():
            assert group.accumulator is not None
            group.accumulator.div_(n)
            self.job.settings.optimizer.step(
                group.param, group.accumulator, group.state, self.steps, lr
            )
        self.contributors = []
        self.version += 1
        self.counters.updates_applied += 1

    def _scheduled_lr(self) -> float:
        """The job's lr for the next optimizer step, by its schedule."""
        assert self.job is not None
        return self.job.settings.lr * self.job.settings.lr_schedule.factor(self.steps)

    def _apply(self, lr: float) -> None:
        assert self.job is not None
        self.steps += 1
        for group in self.groups.values():
            self.job.settings.optimizer.step(group.param, group.grad, group.state, self.steps, lr)
        self.version += 1
        self.counters.updates_applied += 1

    # ----------------------------------------------------------------- pull

    def pull_decision(
        self, job_id: str, worker_id: str, clock: int, min_version: int
    ) -> PullDecision:
        """Whether a pull may be served now (sync: step reached; ssp: bound met)."""
        job = self.check_job(job_id)
        record = self.workers.get(worker_id)
        if record is not None and not record.active:
            raise FailedPrecondition(
                f"worker {worker_id!r} has left the job; it must be made a member again"
            )
        if job.settings.mode is Mode.SYNC:
            if self.version >= min_version or (self.restored and min_version > self.version + 1):
                # (the second case: a worker that saw steps lost in a restore gets the current
                # weights at once instead of waiting for a step no one will push for)
                return PullDecision(True)
            required = self.required_workers()
            missing = tuple(w for w in self.active_workers() if w not in self.contributors)
            return PullDecision(
                False,
                f"sync step {self.version}: have {len(self.contributors)} of {required} "
                f"required gradients; waiting for {_names(missing)}",
                missing,
            )
        if job.settings.mode is Mode.SSP:
            c = max(clock, record.clock if record else self._start_clock())
            bound = c - job.settings.staleness
            behind = tuple(
                w.worker_id for w in self.workers.values() if w.active and w.clock < bound
            )
            if not behind:
                return PullDecision(True)
            clocks = ", ".join(f"{w} at clock {self.workers[w].clock}" for w in behind)
            return PullDecision(
                False,
                f"ssp clock {c} (staleness {job.settings.staleness}): waiting for {clocks} "
                f"to reach clock {bound}",
                behind,
            )
        return PullDecision(True)

    def pull(
        self, job_id: str, worker_id: str, observe: bool = False
    ) -> tuple[int, int, list[Piece]]:
        """(version, the worker's clock, raw views of every held part) for a ready pull.

        A worker seen for the first time joins here, unless it only observes.
        The views share memory with the parameters: encode them before the
        next push is applied.
        """
        self.check_job(job_id)
        record = self.workers.get(worker_id)
        if record is None and not observe:
            record = self._join(worker_id)
        assert self.job is not None
        weight_dtype = self.job.settings.compression.weight_dtype
        cast = wire_dtype(weight_dtype).torch if weight_dtype else None
        pieces = []
        for tensor, index in self.parts:
            values = self.values(tensor, index)
            if cast is not None and values.dtype != cast:
                values = values.to(cast)  # a compressed copy: the weights stay full precision
            pieces.append(Piece(tensor, index, 0, to_raw(values), wire_dtype(values.dtype)))
        return self.version, record.clock if record else 0, pieces

    # ----------------------------------------------------------- membership

    def active_workers(self) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.active]

    def required_workers(self) -> int:
        """Sync: gradients needed to finish a step."""
        assert self.job is not None
        return max(1, len(self.active_workers()) - self.job.settings.backup_workers)

    def _start_clock(self) -> int:
        """A joining worker starts at the slowest active worker's clock, so it holds no one."""
        clocks = [w.clock for w in self.workers.values() if w.active]
        return min(clocks) if clocks else 0

    def _join(self, worker_id: str) -> WorkerRecord:
        record = WorkerRecord(worker_id, self._start_clock())
        self.workers[worker_id] = record
        return record

    def set_membership(self, job_id: str, active: Iterable[str]) -> list[str]:
        """Make exactly ``active`` the active workers; departed ones release the waits."""
        self.check_job(job_id)
        wanted = list(dict.fromkeys(active))
        if any(not w for w in wanted):
            raise InvalidArgument("worker ids must be non-empty")
        start = self._start_clock()
        for record in self.workers.values():
            record.active = record.worker_id in wanted
        for w in wanted:
            if w not in self.workers:
                self.workers[w] = WorkerRecord(w, start)
        if self.job is not None and self.job.settings.mode is Mode.SYNC:
            self._maybe_finish_step()
        return self.active_workers()

    # --------------------------------------------------------------- status

    def check_job(self, job_id: str) -> Job:
        if self.job is None:
            raise FailedPrecondition("the model is not initialised on this server: call Init first")
        if job_id != self.job.job_id:
            raise NotFound(f"unknown job {job_id!r} (this server holds job {self.job.job_id!r})")
        return self.job

    def parameter_bytes(self) -> int:
        return sum(g.param.numel() * g.param.element_size() for g in self.groups.values())

    def values(self, tensor: str, index: int) -> torch.Tensor:
        """The current values of one held part (a view, not a copy)."""
        slot = self.parts[(tensor, index)]
        return self.groups[slot.group].param[slot.start : slot.stop]

    def waiting(self) -> list[tuple[Waiter, PullDecision]]:
        """Every registered waiting pull with its current reason."""
        assert self.job is not None
        out = []
        for w in self.waiters.values():
            try:
                decision = self.pull_decision(self.job.job_id, w.worker_id, w.clock, w.min_version)
            except StoreError as e:  # e.g. its worker left: the pull is about to fail
                decision = PullDecision(False, str(e))
            if not decision.ready:
                out.append((w, decision))
        return out


def allocate(job: Job) -> tuple[dict[PartKey, Slot], dict[str, FlatGroup]]:
    """Lay this server's parts out back to back, one flat group per dtype."""
    dtypes = job.layout.dtypes
    sizes: dict[str, int] = {}
    slots: dict[PartKey, Slot] = {}
    for part in job.layout.parts_on(job.server_index):
        name = dtypes[part.tensor].name
        slots[(part.tensor, part.index)] = Slot(part, name, sizes.get(name, 0))
        sizes[name] = sizes.get(name, 0) + part.count
    groups = {}
    for name, size in sizes.items():
        wire = wire_dtype(name)
        groups[name] = FlatGroup(
            wire, torch.empty(size, dtype=wire.torch), {}, torch.empty(size, dtype=wire.torch)
        )
    return slots, groups


def _all_finite(values: torch.Tensor) -> bool:
    """True if no value is NaN or Inf.

    A sum is finite only if every term is, so one fast reduction settles the
    common case; only a non-finite sum (which an overflow can also cause)
    takes the exact, slower elementwise check.
    """
    if values.numel() == 0 or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def _names(workers: Sequence[str]) -> str:
    return ", ".join(workers) if workers else "no active worker (set the membership)"
