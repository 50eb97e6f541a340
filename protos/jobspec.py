"""The job spec: everything the scheduler, servers and workers agree on."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from protos.compression import Compression, CompressionError
from ps_server.schedule import LrSchedule, ScheduleError

MODES = ("sync", "async", "ssp")
OPTIMIZERS = ("sgd", "adam", "adagrad")


class SpecError(ValueError):
    """A job spec with a missing, unknown or invalid field."""


@dataclass(frozen=True)
class JobSpec:
    data_dir: str
    servers: tuple[str, ...] = ()
    job_id: str = "job"
    model: str = "mnist1d-cnn"
    mode: str = "ssp"
    staleness: int = 2
    backup_workers: int = 0
    staleness_aware_lr: bool = False
    compression: str = "none"  # on the wire: none, fp16, bf16, topk:R, bf16,topk:R
    optimizer: str = "adam"
    lr: float = 0.01
    lr_schedule: str = "constant"  # constant, cosine (over the job's updates) or cosine:STEPS
    lr_final_ratio: float = 0.0  # cosine: the last updates' lr as a fraction of lr
    momentum: float = 0.0  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam
    weight_decay: float = 0.0
    batch_size: int = 100
    epochs: int = 5
    expected_workers: int = 1  # leases wait until this many workers have registered
    seed: int = 0
    lease_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("staleness", "backup_workers", "expected_workers", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append("beta1 and beta2 must lie in [0, 1)")
        if self.momentum < 0 or self.weight_decay < 0:
            problems.append("momentum and weight_decay must not be negative")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not self.lease_timeout_s > 0:
            problems.append("lease_timeout_s must be positive")
        if self.backup_workers and self.mode != "sync":
            problems.append("backup_workers applies to sync mode only")
        try:
            Compression.parse(self.compression)
        except CompressionError as e:
            problems.append(str(e))
        try:
            self.make_schedule(batches_per_epoch=1)
        except ScheduleError as e:
            problems.append(str(e))
        if problems:
            raise SpecError("; ".join(problems))

    def expected_updates(self, batches_per_epoch: int) -> int:
        """Optimizer steps each server applies over the job: one per batch in async
        and ssp; in sync one per barrier, to which every worker brings a batch."""
        total = max(1, self.epochs * batches_per_epoch)  # a bad epochs is reported on its own
        if self.mode == "sync":
            return max(1, total // max(1, self.expected_workers))
        return total

    def make_schedule(self, batches_per_epoch: int) -> LrSchedule:
        """The servers' lr schedule; a bare ``cosine`` spans the job's expected updates."""
        return LrSchedule.parse(
            self.lr_schedule, self.lr_final_ratio, self.expected_updates(batches_per_epoch)
        )

    def make_optimizer(self):
        """The server-side optimizer this spec names, with its options."""
        from ps_server.optimizers import SGD, Adagrad, Adam

        if self.optimizer == "sgd":
            return SGD(momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return Adam(beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay)
        return Adagrad(weight_decay=self.weight_decay)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> JobSpec:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise SpecError(f"unknown job field(s): {', '.join(unknown)}")
        if "data_dir" not in doc:
            raise SpecError("data_dir is required")
        values: dict[str, Any] = {}
        for name, value in doc.items():
            default = getattr(cls, name, None) if name != "data_dir" else ""
            try:
                if name == "servers":
                    values[name] = tuple(str(s) for s in (value or ()))
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError("expected true or false")
                    values[name] = value
                elif isinstance(default, int):
                    values[name] = int(value)
                elif isinstance(default, float):
                    values[name] = float(value)
                else:
                    values[name] = str(value)
            except (TypeError, ValueError) as e:
                raise SpecError(f"{name}: {e}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> JobSpec:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"cannot read job file {path}: {e}") from None
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: expected a mapping of job fields")
        doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(doc)
