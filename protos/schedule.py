"""Learning-rate schedules the servers apply by their count of optimizer steps.

A constant learning rate leaves asynchronous training bouncing around its
optimum to the last update; a cosine decay to a small fraction of the peak
over the job's updates lets it settle. The server counts the steps it
applied (one per barrier in sync and local, one per gradient, or per buffer of
them, in the others), so every worker's update sees the same schedule, and a restored
checkpoint resumes it. In the local modes the workers apply it to their own steps, by
the server version their weights came from; the servers' outer lr is constant.
A warm-up raises the lr linearly over the first updates, whatever the kind:
the first updates of a fresh model are the ones staleness hurts most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos import ps_pb2

KINDS = ("constant", "cosine")
assert {k.upper() for k in KINDS} == set(ps_pb2.LrSchedule.Kind.keys()), "KINDS != proto"


class ScheduleError(ValueError):
    """A schedule with an unknown kind or out-of-range settings."""


@dataclass(frozen=True)
class LrSchedule:
    """``constant``: the job's lr throughout. ``cosine``: from lr down to
    ``final_ratio * lr`` over ``total_steps`` updates, then held there. Either is
    multiplied by ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` updates."""

    kind: str = "constant"
    total_steps: int = 0
    final_ratio: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"lr schedule {self.kind!r} is not one of {', '.join(KINDS)}")
        steps, ratio = self.total_steps, self.final_ratio
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 1 << 64:
            raise ScheduleError(f"lr schedule total_steps {steps!r}: not a whole number < 2**64")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < 1 << 64:
            raise ScheduleError(f"lr warm-up {warmup!r}: not a whole number of steps < 2**64")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ScheduleError(f"lr_final_ratio {ratio!r} is not a number in [0, 1]")
        if self.kind == "cosine" and self.total_steps < 1:
            raise ScheduleError("a cosine lr schedule needs total_steps of at least 1")
        if self.kind == "constant" and (self.total_steps or self.final_ratio):
            raise ScheduleError("a constant lr schedule takes no total_steps or final_ratio")
        if not 0.0 <= self.final_ratio <= 1.0:
            raise ScheduleError(f"final_ratio {self.final_ratio} is not in [0, 1]")

    def factor(self, step: int) -> float:
        """The multiple of the job's lr for the update after ``step`` applied ones."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "constant":
            return warm
        progress = min(step, self.total_steps) / self.total_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * (self.final_ratio + (1.0 - self.final_ratio) * cosine)

    @classmethod
    def parse(
        cls, text: str, final_ratio: float = 0.0, default_steps: int = 0, warmup_steps: int = 0
    ) -> LrSchedule:
        """``constant``, ``cosine:STEPS``, or ``cosine`` with ``default_steps``."""
        kind, _, steps = text.strip().partition(":")
        if kind == "constant":
            if steps:
                raise ScheduleError(f"lr schedule {text!r}: constant takes no steps")
            return cls(warmup_steps=warmup_steps)
        if steps:
            try:
                total = int(steps)
            except ValueError:
                raise ScheduleError(
                    f"lr schedule {text!r}: expected cosine:STEPS with an integer STEPS"
                ) from None
        else:
            total = default_steps
        return cls(kind, total, final_ratio, warmup_steps)

    def spec(self) -> str:
        """``constant`` or ``cosine:STEPS``: what :meth:`parse` reads back (with final_ratio)."""
        return self.kind if self.kind == "constant" else f"{self.kind}:{self.total_steps}"

    def to_proto(self) -> ps_pb2.LrSchedule | None:
        """None for a constant schedule without warm-up: it stays unset on the wire."""
        if self == LrSchedule():
            return None
        return ps_pb2.LrSchedule(
            kind=ps_pb2.LrSchedule.Kind.Value(self.kind.upper()),
            total_steps=self.total_steps,
            final_ratio=self.final_ratio,
            warmup_steps=self.warmup_steps,
        )

    @classmethod
    def from_proto(cls, config: ps_pb2.OptimizerConfig) -> LrSchedule:
        """The schedule an OptimizerConfig carries; ScheduleError if it is not valid."""
        if not config.HasField("schedule"):
            return cls()
        s = config.schedule
        if s.kind not in ps_pb2.LrSchedule.Kind.values():
            raise ScheduleError(f"lr schedule kind {s.kind} is not one of {', '.join(KINDS)}")
        kind = ps_pb2.LrSchedule.Kind.Name(s.kind).lower()
        return cls(kind, s.total_steps, s.final_ratio, s.warmup_steps)

    def __str__(self) -> str:
        text = self.kind
        if self.kind != "constant":
            text = f"cosine:{self.total_steps} (to {self.final_ratio:g} x lr)"
        return text + (f", warm-up {self.warmup_steps}" if self.warmup_steps else "")
