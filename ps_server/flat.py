"""Flat parameter groups: one server's parts back to back, one set of buffers per dtype.

One optimizer step over a whole group replaces a step per tensor, so the
per-call overhead does not grow with the number of tensors. This module
holds the tensor mechanics of a store: the layout of the buffers, decoding
and checking incoming chunks into them, and the optimizer's update. What a
push *means* (modes, clocks, versions) is :mod:`ps_server.store`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.codec import (
    CodecError,
    Piece,
    RawChunk,
    WireDType,
    check_chunk,
    check_sparse_chunk,
    first_repeat,
    to_raw,
    to_torch,
    wire_dtype,
)
from protos.job import Job
from protos.layout import Part
from protos.optimizers import Optimizer
from ps_server.errors import InvalidArgument

PartKey = tuple[str, int]


@dataclass
class FlatGroup:
    """Every held part of one dtype, back to back in preallocated, reused buffers."""

    wire: WireDType
    param: torch.Tensor
    state: dict[str, torch.Tensor]
    grad: torch.Tensor  # scratch: the incoming gradient, gathered
    accumulator: torch.Tensor | None = None  # sync: sum of this step's gradients


@dataclass(frozen=True)
class GroupState:
    """A copy of one dtype group's tensors, as a checkpoint holds them."""

    param: torch.Tensor
    state: Mapping[str, torch.Tensor]
    accumulator: torch.Tensor | None = None  # only while a sync step is in progress


@dataclass(frozen=True)
class Slot:
    """Where one part lives: elements [start, start + part.count) of its dtype's group."""

    part: Part
    group: str
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.part.count


# slot, element offset within the part, values, and (top-k chunks) the values' indices
Decoded = dict[PartKey, list[tuple[Slot, int, torch.Tensor, torch.Tensor | None]]]


class FlatParams:
    """The parameters, optimizer state and scratch buffers of one server's parts of a job."""

    def __init__(self, job: Job) -> None:
        """Lay the parts out (values uninitialised, no optimizer state yet)."""
        self.job = job
        dtypes = job.layout.dtypes
        sizes: dict[str, int] = {}
        self.slots: dict[PartKey, Slot] = {}
        for part in job.layout.parts_on(job.server_index):
            name = dtypes[part.tensor].name
            self.slots[(part.tensor, part.index)] = Slot(part, name, sizes.get(name, 0))
            sizes[name] = sizes.get(name, 0) + part.count
        self.groups: dict[str, FlatGroup] = {}
        for name, size in sizes.items():
            wire = wire_dtype(name)
            self.groups[name] = FlatGroup(
                wire, torch.empty(size, dtype=wire.torch), {}, torch.empty(size, dtype=wire.torch)
            )

    # ----------------------------------------------------------- set-up

    @classmethod
    def initial(cls, job: Job, chunks: Sequence[RawChunk]) -> FlatParams:
        """A job's parameters on this server from an Init's chunks (work in proportion to
        the job's size)."""
        params = cls(job)
        params.load(chunks)
        return params

    def load(self, chunks: Sequence[RawChunk]) -> None:
        """Set the initial values from chunks covering every part; fresh optimizer state."""
        for key_chunks in self.decode(chunks, what="initial value").values():
            for slot, offset, values, _ in key_chunks:
                start = slot.start + offset
                self.groups[slot.group].param[start : start + values.numel()] = values
        for group in self.groups.values():
            group.state = self.job.settings.server_optimizer.init_state(group.param)

    def export(self, accumulating: bool) -> dict[str, GroupState]:
        """A copy of every group's tensors (with the partial sum when ``accumulating``)."""
        out = {}
        for name, g in self.groups.items():
            state = {key: value.clone() for key, value in g.state.items()}
            summed = g.accumulator.clone() if accumulating and g.accumulator is not None else None
            out[name] = GroupState(g.param.clone(), state, summed)
        return out

    def restore(self, groups: Mapping[str, GroupState], accumulating: bool) -> None:
        """Take a copy of exported tensors; InvalidArgument, changing nothing, if they don't fit."""
        fresh = {
            n: self.job.settings.server_optimizer.init_state(g.param)
            for n, g in self.groups.items()
        }
        for name, group in self.groups.items():
            saved = groups.get(name)
            if saved is None:
                raise _misfit(f"{name}/param")
            _fits(saved.param, group.param, f"{name}/param")
            for key, value in fresh[name].items():
                _fits(saved.state.get(key), value, f"{name}/state/{key}")
            if accumulating:
                _fits(saved.accumulator, group.param, f"{name}/accumulator")
        for name, group in self.groups.items():
            saved = groups[name]
            group.param.copy_(saved.param)
            group.state = fresh[name]
            for key, value in group.state.items():
                value.copy_(saved.state[key])
            if accumulating:
                assert saved.accumulator is not None
                group.accumulator = saved.accumulator.clone()

    # ------------------------------------------------------------- reads

    def values(self, key: PartKey) -> torch.Tensor:
        """The current values of one held part (a view, not a copy)."""
        slot = self.slots[key]
        return self.groups[slot.group].param[slot.start : slot.stop]

    def pieces(self, weight_dtype: str | None = None) -> list[Piece]:
        """Raw views of every held part, as a pull sends them (cast to ``weight_dtype``, a
        compressed copy, when given: the weights stay full precision). The views share
        memory with the parameters: encode them before the next update."""
        cast = wire_dtype(weight_dtype).torch if weight_dtype else None
        out = []
        for tensor, index in self.slots:
            values = self.values((tensor, index))
            if cast is not None and values.dtype != cast:
                values = values.to(cast)
            out.append(Piece(tensor, index, 0, to_raw(values), wire_dtype(values.dtype)))
        return out

    def nbytes(self) -> int:
        return sum(g.param.numel() * g.param.element_size() for g in self.groups.values())

    # ---------------------------------------------------------- gradients

    def decode(self, chunks: Sequence[RawChunk], what: str, gradient: bool = False) -> Decoded:
        """Check chunks cover each part exactly once with the right dtype and sizes.

        A gradient travels as the job's compression says: in its gradient dtype,
        and for top-k as (indices, values) chunks, at least one per part.
        """
        job = self.job
        dtypes = job.layout.dtypes
        compression = job.settings.compression if gradient else None
        sparse = bool(compression and compression.topk_ratio)
        grad_wire = (
            wire_dtype(compression.gradient_dtype)
            if compression and compression.gradient_dtype
            else None
        )
        tensors = {key[0] for key in self.slots}
        decoded: Decoded = {key: [] for key in self.slots}
        for chunk in chunks:
            key = (chunk.tensor, chunk.part)
            slot = self.slots.get(key)
            if slot is None:
                if chunk.tensor in tensors:
                    raise InvalidArgument(
                        f"tensor {chunk.tensor!r} part {chunk.part} is not held by this server"
                    )
                known = chunk.tensor in dtypes
                raise InvalidArgument(
                    f"tensor {chunk.tensor!r} is not held by this server"
                    if known
                    else f"unknown tensor {_shown(chunk.tensor)}"
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
            _check_distinct(what, decoded)
            return decoded
        for key, slot in self.slots.items():
            _check_coverage(what, key, slot, decoded[key])
        return decoded

    def gather(self, decoded: Decoded, reject_nonfinite: bool) -> None:
        """Copy a decoded gradient into the scratch buffers; if asked, check it is finite.

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
        if reject_nonfinite:
            self.check_finite("gradient")

    def check_finite(self, what: str) -> None:
        """InvalidArgument naming the first part whose gathered gradient has a NaN or Inf."""
        for group in self.groups.values():
            if not all_finite(group.grad):
                bad = next(
                    k
                    for k, slot in self.slots.items()
                    if slot.group == group.wire.name
                    and not all_finite(group.grad[slot.start : slot.stop])
                )
                raise InvalidArgument(
                    f"{what} for tensor {bad[0]!r} part {bad[1]} contains NaN or Inf"
                )

    def accumulate(self, first: bool) -> None:
        """Add the gathered gradient to the sync step's sum (start the sum when ``first``)."""
        for group in self.groups.values():
            if group.accumulator is None:
                group.accumulator = torch.empty_like(group.param)
            if first:
                group.accumulator.copy_(group.grad)
            else:
                group.accumulator.add_(group.grad)

    def step(self, optimizer: Optimizer, step: int, lr: float, mean_of: int = 0) -> None:
        """One optimizer step: with the gathered gradient, or the mean of ``mean_of`` summed."""
        for group in self.groups.values():
            grad = group.grad
            if mean_of:
                assert group.accumulator is not None
                grad = group.accumulator.div_(mean_of)
            optimizer.step(group.param, grad, group.state, step, lr)


def _check_coverage(what: str, key: PartKey, slot: Slot, chunks: list) -> None:
    """Dense chunks of one part must cover it exactly once."""
    spans = sorted((offset, v.numel()) for _, offset, v, _ in chunks)
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


def _check_distinct(what: str, decoded: Decoded) -> None:
    """Top-k chunks of one part must name each index once (within a chunk: checked there)."""
    for key, chunks in decoded.items():
        if len(chunks) > 1:
            indices = torch.cat([at for _, _, _, at in chunks if at is not None]).numpy()
            repeated = first_repeat(indices)
            if repeated is not None:
                raise InvalidArgument(
                    f"{what} for tensor {key[0]!r} part {key[1]}: index {repeated} is sent twice"
                )


def _shown(name: str, limit: int = 100) -> str:
    """A client's name as an error message quotes it: at most ``limit`` characters."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _fits(value: torch.Tensor | None, like: torch.Tensor, what: str) -> None:
    if value is None or value.shape != like.shape or value.dtype != like.dtype:
        raise _misfit(what)


def _misfit(what: str) -> InvalidArgument:
    return InvalidArgument(f"tensor {what!r} is missing or does not fit the job")


def all_finite(values: torch.Tensor) -> bool:
    """True if no value is NaN or Inf.

    A sum is finite only if every term is, so one fast reduction settles the
    common case; only a non-finite sum (which an overflow can also cause)
    takes the exact, slower elementwise check.
    """
    if values.numel() == 0 or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())
