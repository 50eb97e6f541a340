"""Delay compensation (DC-ASGD, Zheng et al. 2017, constant lambda): the weights kept.

A stale gradient ``g`` was computed on weights ``w_kept`` that have since moved to
``w_now``; DC-ASGD corrects it to first order with the diagonal of the gradient's outer
product as the Hessian's stand-in: ``g + lambda * g * g * (w_now - w_kept)``. The server
keeps, per worker, a copy of this server's share of the weights the worker's last taking-
part pull returned, with that pull's version: a push computed on exactly those weights is
compensated, any other is applied as it came. Copies are bounded in bytes: beyond the
bound the least recently pulled are dropped. They are not checkpointed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ps_server.errors import InvalidArgument
from ps_server.flat import FlatParams


@dataclass
class Kept:
    """One worker's copy: the weights of its last pull (per dtype group), and their version."""

    version: int
    values: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())


class KeptCopies:
    """Per worker, the weights its last taking-part pull returned, within ``limit`` bytes."""

    def __init__(self, limit: int, reject_nonfinite: bool = True) -> None:
        """``reject_nonfinite``: refuse a push whose corrected gradient has a NaN or Inf."""
        self.limit = limit
        self.reject_nonfinite = reject_nonfinite
        self._copies: OrderedDict[str, Kept] = OrderedDict()  # least recently pulled first
        self._bytes = 0

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._copies

    def nbytes(self) -> int:
        """Bytes the copies hold now."""
        return self._bytes

    def check_fits(self, params: FlatParams) -> None:
        """InvalidArgument if one copy of ``params`` is over the limit: a job asking for
        delay compensation would get none."""
        if params.nbytes() > self.limit:
            raise InvalidArgument(
                f"delay compensation keeps a copy of this server's share of the model "
                f"({params.nbytes()} bytes) per worker, and one copy may take at most "
                f"{self.limit} bytes: use more servers, or no delay compensation"
            )

    def keep(self, worker_id: str, version: int, params: FlatParams) -> None:
        """Copy the weights a pull by ``worker_id`` returns (at ``version``), dropping the
        least recently pulled copies to stay within the limit (this one too, if alone it
        is over)."""
        old = self.drop(worker_id)
        size = params.nbytes()
        if size > self.limit:
            return
        while self._bytes + size > self.limit:
            _, evicted = self._copies.popitem(last=False)
            self._bytes -= evicted.nbytes()
            old = old or evicted
        if old is not None and old.values.keys() == params.groups.keys():
            for name, group in params.groups.items():  # reuse the memory
                old.values[name].copy_(group.param)
            copy = Kept(version, old.values)
        else:
            copy = Kept(version, {n: g.param.clone() for n, g in params.groups.items()})
        self._copies[worker_id] = copy
        self._bytes += size

    def drop(self, worker_id: str) -> Kept | None:
        """Forget a worker's copy (it left or was removed); the copy, if there was one."""
        copy = self._copies.pop(worker_id, None)
        if copy is not None:
            self._bytes -= copy.nbytes()
        return copy

    def retain(self, workers: set[str]) -> None:
        """Forget every copy but those of ``workers``."""
        for worker_id in [w for w in self._copies if w not in workers]:
            self.drop(worker_id)

    def clear(self) -> None:
        self._copies.clear()
        self._bytes = 0

    def compensate(
        self,
        worker_id: str,
        pulled_version: int,
        params: FlatParams,
        lam: float,
    ) -> bool:
        """Correct the gathered gradient of a push computed on the weights of
        ``pulled_version``; False, changing nothing, when no copy of those is kept.
        Only the scratch gradient changes: InvalidArgument if the corrected one is not
        finite (unless allowed), a refusal that still changes nothing."""
        copy = self._copies.get(worker_id)
        if copy is None or copy.version != pulled_version:
            return False
        for name, group in params.groups.items():
            g = group.grad  # one temporary: (w_now - w_kept) * g * g
            # lambda as a multiply, not add_'s alpha: one too big for the dtype gives inf
            # (refused below) where alpha would raise
            g.add_(torch.sub(group.param, copy.values[name]).mul_(g).mul_(g).mul_(lam))
        if self.reject_nonfinite:
            params.check_finite("delay-compensated gradient (is delay_compensation too big?)")
        return True
