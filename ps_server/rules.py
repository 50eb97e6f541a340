"""How gradients become updates: the barrier (sync, local) and the buffer (the rest).

Every update is ``Settings.server_optimizer`` at ``Settings.server_lr(steps)``: the
job's optimizer and schedule, or in the local modes the outer SGD step (lr outer_lr) on
the workers' changes ``w_pulled - w_local``, which they push as their gradients.

Barrier modes (sync, local): gradients for step ``t`` (pushes whose ``pulled_version`` is
``t``) are summed until ``max(1, active - backup_workers)`` active workers have given
theirs; the mean of all in (a departed worker's included) is one update, and the step
becomes ``t + 1``. With no worker active, what is in is applied.

The other modes (async, ssp, local-async), n-softsync: each accepted gradient (delay-
compensated first, when the job asks: :mod:`ps_server.compensation`) goes into a buffer;
once ``Settings.buffer`` (K) are in, their mean is ONE update (version + 1) at
``Settings.server_lr(steps)``, divided by ``max(1, their mean staleness)`` when the lr is
staleness-aware. The sum lives in the dtype groups' accumulators (the barrier's, unused
in these modes), the count and the staleness sum here; a checkpoint carries all three.
K = 1 is plain async: each gradient is applied at once from the scratch buffer, with no
copy. A pull serves the current weights: a pending buffer is not visible until applied;
when no worker is active any more, what is in is applied (as the barrier does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from protos.job import Settings
from ps_server.errors import InvalidArgument
from ps_server.flat import FlatParams


@dataclass
class Barrier:
    """This step's gradients (summed in the accumulators): whose, and from which client."""

    contributors: list[str] = field(default_factory=list)
    sessions: dict[str, str] = field(default_factory=dict)  # not checkpointed

    def add(self, params: FlatParams, worker_id: str, session: str) -> None:
        """Take the gathered gradient of ``worker_id``, sent by the client ``session``."""
        params.accumulate(first=not self.contributors)
        self.contributors.append(worker_id)
        self.sessions[worker_id] = session

    def given_by(self, active: list[str]) -> int:
        """How many of the ``active`` workers have given their gradient."""
        members = set(active)
        return sum(1 for w in self.contributors if w in members)

    def complete(self, active: list[str], required: int) -> bool:
        """Enough active workers are in (or none is active and something is)."""
        return bool(self.contributors) and (not active or self.given_by(active) >= required)

    def apply(self, params: FlatParams, settings: Settings, steps: int) -> None:
        """Apply the mean of what is in as the ``steps``-th update; start the next step."""
        lr = settings.server_lr(steps - 1)
        params.step(settings.server_optimizer, steps, lr, mean_of=len(self.contributors))
        self.contributors, self.sessions = [], {}


@dataclass
class Buffer:
    """The gradients in, and not yet applied: how many, and their staleness summed."""

    count: int = 0
    staleness: int = 0

    def lr(self, settings: Settings, steps: int) -> float:
        """The lr of the update the buffer makes after ``steps`` applied (as far as known
        while it fills: the staleness-aware division uses the gradients in so far)."""
        lr = settings.server_lr(steps)
        if settings.staleness_aware_lr and self.count:
            lr /= max(1, self.staleness / self.count)
        return lr

    def add(self, params: FlatParams, settings: Settings, staleness: int, steps: int) -> float:
        """Take the gathered gradient in; the lr of the update it joins."""
        if settings.buffer > 1:
            params.accumulate(first=not self.count)
        self.count += 1
        self.staleness += staleness
        return self.lr(settings, steps)

    def full(self, settings: Settings) -> bool:
        return self.count >= settings.buffer

    def apply(self, params: FlatParams, settings: Settings, steps: int) -> float:
        """Apply the mean of what is in as the ``steps``-th update and empty the buffer;
        the lr it was applied with."""
        assert self.count, "an empty buffer is not applied"
        lr = self.lr(settings, steps - 1)
        mean_of = self.count if settings.buffer > 1 else 0  # K = 1: the scratch gradient
        params.step(settings.server_optimizer, steps, lr, mean_of=mean_of)
        self.count = self.staleness = 0
        return lr


def check_pending(
    settings: Settings, buffered: int, staleness: int, contributors: Sequence[str]
) -> None:
    """InvalidArgument unless a checkpoint's pending update fits its job: a buffer below
    K (its staleness summed over what is in), a step's contributors only in a barrier mode."""
    if not 0 <= buffered < settings.buffer or staleness < 0 or (staleness and not buffered):
        raise InvalidArgument(
            f"the state holds {buffered} buffered gradients (staleness {staleness}) for a "
            f"buffer of {settings.buffer}"
        )
    if contributors and not settings.mode.barrier:
        raise InvalidArgument(
            f"the state holds a step's gradients for mode {settings.mode.value}, which has none"
        )
