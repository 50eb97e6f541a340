"""The job as plain data, and its one translation to and from the wire.

A job is its :class:`Settings` (mode, staleness, backup workers, the
optimizer with all its options, lr and its schedule, compression, part
size) plus the model's layout over the servers. Every way in (flags, job
files, ``PS_*`` variables, ``Client.init``, ``DistributedOptimizer``) ends in
:meth:`Settings.build`; every process reads a job back with
:meth:`Job.from_proto`. The tables of names live in :class:`Mode`,
:data:`protos.optimizers.OPTIMIZERS`, :data:`protos.schedule.KINDS` and
:mod:`protos.compression`; nothing here repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from protos import ps_pb2
from protos.codec import CodecError, wire_dtype
from protos.compression import Compression, CompressionError
from protos.layout import DEFAULT_PART_BYTES, Layout, TensorSpec, plan_layout
from protos.limits import JobError, Limits
from protos.optimizers import (
    OPTIMIZERS,
    OPTION_TYPES,
    SGD,
    Adam,
    Optimizer,
    OptimizerError,
    make_optimizer,
    optimizer_from_proto,
)
from protos.schedule import LrSchedule, ScheduleError

OPTIMIZER_CLASSES = tuple(OPTIMIZERS.values())
_LIMITS = Limits()
# The whole-number settings: the least each may be, and the bound of its wire field.
_WHOLE = (
    ("staleness", 0, 1 << 32),
    ("backup_workers", 0, 1 << 32),
    ("buffer", 1, 1 << 32),
    ("local_steps", 1, 1 << 32),
    ("part_bytes", 1, 1 << 64),
)


def _positive_float(value: Any) -> float | None:
    """``value`` as a float if it is a finite positive real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number > 0 else None


class Mode(str, Enum):
    """How strictly the workers stay in step (docs/design.md has the exact rules)."""

    SYNC = "sync"
    ASYNC = "async"
    SSP = "ssp"
    LOCAL = "local"  # Local SGD, a barrier per round
    LOCAL_ASYNC = "local-async"  # Local SGD, each worker's change applied as it arrives

    @property
    def barrier(self) -> bool:
        """Updates wait for every active worker (but the backup workers)."""
        return self in (Mode.SYNC, Mode.LOCAL)

    @property
    def local(self) -> bool:
        """Workers run the optimizer themselves and push the change of their weights."""
        return self in (Mode.LOCAL, Mode.LOCAL_ASYNC)

    def to_proto(self) -> int:
        return ps_pb2.Mode.Value(self.name)

    @classmethod
    def from_proto(cls, value: int) -> Mode:
        if value not in ps_pb2.Mode.values() or value == ps_pb2.MODE_UNSPECIFIED:
            raise JobError(f"mode {value} is not one of {', '.join(cls.choices())}")
        return cls[ps_pb2.Mode.Name(value)]

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        try:
            return cls(value)
        except ValueError:
            raise JobError(f"mode {value!r} is not one of {', '.join(cls.choices())}") from None

    @classmethod
    def choices(cls) -> list[str]:
        return [m.value for m in cls]


assert {m.name for m in Mode} | {"MODE_UNSPECIFIED"} == set(ps_pb2.Mode.keys()), "Mode != proto"

# The modes each setting applies to: another mode's job is refused a value but the default.
_MODES_OF = {
    "backup_workers": (Mode.SYNC, Mode.LOCAL),
    "staleness_aware_lr": (Mode.ASYNC, Mode.SSP, Mode.LOCAL_ASYNC),
    "buffer": (Mode.ASYNC, Mode.SSP, Mode.LOCAL_ASYNC),
    "delay_compensation": (Mode.ASYNC, Mode.SSP),
    "local_steps": (Mode.LOCAL, Mode.LOCAL_ASYNC),
    "outer_lr": (Mode.LOCAL, Mode.LOCAL_ASYNC),
    "outer_momentum": (Mode.LOCAL, Mode.LOCAL_ASYNC),
}


@dataclass(frozen=True)
class Settings:
    """Everything a job asks of its servers apart from the model itself; the defaults are
    the product's defaults, for every way in."""

    mode: Mode = Mode.SSP
    staleness: int = 2  # ssp: how many clocks a worker may run ahead of the slowest
    backup_workers: int = 0  # sync: a step needs all active workers but this many
    staleness_aware_lr: bool = False  # async, ssp, local-async: lr / max(1, staleness)
    buffer: int = 1  # async, ssp, local-async: the mean of every `buffer` gradients is one update
    delay_compensation: float = 0.0  # async, ssp: DC-ASGD's lambda (0: off)
    local_steps: int = 8  # local modes: batches a worker trains on between pushes
    outer_lr: float = 1.0  # local modes: the server's step on the mean change
    outer_momentum: float = 0.0  # local modes: Nesterov momentum of that step (0: averaging)
    optimizer: Optimizer = field(default_factory=Adam)
    lr: float = 0.01
    lr_schedule: LrSchedule = field(default_factory=LrSchedule)
    compression: Compression = field(default_factory=Compression)
    part_bytes: int = DEFAULT_PART_BYTES  # the layout cuts tensors into parts of at most this

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.mode, Mode):
            problems.append(f"mode {self.mode!r} is not a Mode")
        for name, low, wire in _WHOLE:  # each must fit its field on the wire
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be a whole number >= {low}, got {value!r}")
            elif value >= wire:
                problems.append(f"{name} must be at most {wire - 1}, got {value!r}")
        if not isinstance(self.staleness_aware_lr, bool):
            problems.append(
                f"staleness_aware_lr must be true or false, got {self.staleness_aware_lr!r}"
            )
        if _positive_float(self.outer_lr) is None:
            problems.append(f"outer_lr must be a positive number, got {self.outer_lr!r}")
        else:
            object.__setattr__(self, "outer_lr", float(self.outer_lr))
        for name in ("delay_compensation", "outer_momentum"):
            value = getattr(self, name)
            if value != 0 and _positive_float(value) is None:
                problems.append(f"{name} must be a number >= 0, got {value!r}")
            else:
                object.__setattr__(self, name, float(value))
        if isinstance(self.outer_momentum, float) and not self.outer_momentum < 1:
            problems.append(f"outer_momentum must be below 1, got {self.outer_momentum!r}")
        if _positive_float(self.lr) is None:
            problems.append(f"the learning rate lr must be a positive number, got {self.lr!r}")
        else:
            object.__setattr__(self, "lr", float(self.lr))
        for name, kinds, what in (
            ("optimizer", OPTIMIZER_CLASSES, f"an optimizer ({', '.join(OPTIMIZERS)})"),
            ("lr_schedule", (LrSchedule,), "an lr schedule (constant or cosine:STEPS)"),
            ("compression", (Compression,), "a compression (none, fp16, bf16, topk:R)"),
        ):
            value = getattr(self, name)
            if not isinstance(value, kinds):
                problems.append(f"{name} must be {what}, by name or as an object, got {value!r}")
        if not problems:
            for name, modes in _MODES_OF.items():
                if self.mode not in modes and getattr(self, name) != getattr(_BARE, name):
                    problems.append(
                        f"{name} applies to modes {', '.join(m.value for m in modes)} only"
                    )
        if problems:
            raise JobError("; ".join(problems))

    @property
    def server_optimizer(self) -> Optimizer:
        """The optimizer the servers run: the job's, or in the local modes the outer step
        (SGD on the workers' changes, with Nesterov momentum when outer_momentum > 0)."""
        if self.mode.local:
            momentum = self.outer_momentum
            return SGD(momentum=momentum, nesterov=momentum > 0)
        return self.optimizer

    def server_lr(self, steps: int) -> float:
        """The lr of a server's next update after ``steps`` applied (before the
        staleness-aware division): the scheduled lr, or in the local modes outer_lr."""
        if self.mode.local:
            return self.outer_lr
        return self.lr * self.lr_schedule.factor(steps)

    def worker_lr(self, version: int) -> float:
        """Local modes: the lr of a worker's own steps, scheduled by the server version
        (updates applied) its weights came from."""
        return self.lr * self.lr_schedule.factor(version)

    @classmethod
    def names(cls) -> list[str]:
        """Every keyword :meth:`build` takes: the settings, ``lr_final_ratio`` (for a
        schedule given as a string), then every optimizer option."""
        return [f.name for f in fields(cls)] + ["lr_final_ratio", "lr_warmup", *OPTION_TYPES]

    @classmethod
    def build(cls, **given: Any) -> Settings:
        """Settings from keywords: the fields (strings are parsed: ``mode="ssp"``,
        ``optimizer="adam"``, ``lr_schedule="cosine:500"``, ``compression="bf16"``) and the
        named optimizer's options (``beta1=0``, ``momentum=0.9``, ...). Unknown keywords and
        options of another optimizer are a JobError."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise JobError(
                f"unknown job setting(s) {', '.join(unknown)} (known: {', '.join(cls.names())})"
            )
        values = {k: v for k, v in given.items() if k in _FIELDS}
        options = {k: v for k, v in given.items() if k in OPTION_TYPES}
        final_ratio = given.get("lr_final_ratio")
        warmup = given.get("lr_warmup")
        try:
            if "mode" in values:
                values["mode"] = Mode.parse(values["mode"])
            optimizer = values.get("optimizer", _DEFAULT.optimizer.name)
            if isinstance(optimizer, str):
                values["optimizer"] = make_optimizer(optimizer, **options)
            elif options:
                raise JobError(
                    f"{', '.join(sorted(options))}: give options to the optimizer object, "
                    f"or name the optimizer as a string"
                )
            schedule = values.get("lr_schedule", "constant")
            if isinstance(schedule, str):
                values["lr_schedule"] = LrSchedule.parse(
                    schedule, final_ratio or 0.0, 0, warmup or 0
                )
            elif final_ratio is not None or warmup is not None:
                raise JobError(
                    "lr_final_ratio and lr_warmup go with an lr_schedule given as a string"
                )
            if isinstance(values.get("compression"), str):
                values["compression"] = Compression.parse(values["compression"])
            return cls(**values)
        except (OptimizerError, ScheduleError, CompressionError, TypeError) as e:
            raise JobError(str(e)) from None

    def to_doc(self) -> dict[str, Any]:
        """The settings as plain values, in the keywords :meth:`build` takes back."""
        return {
            "mode": self.mode.value,
            "staleness": self.staleness,
            "backup_workers": self.backup_workers,
            "staleness_aware_lr": self.staleness_aware_lr,
            "buffer": self.buffer,
            "delay_compensation": self.delay_compensation,
            "local_steps": self.local_steps,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "optimizer": self.optimizer.name,
            **self.optimizer.options(),
            "lr": self.lr,
            "lr_schedule": self.lr_schedule.spec(),
            "lr_final_ratio": self.lr_schedule.final_ratio,
            "lr_warmup": self.lr_schedule.warmup_steps,
            "compression": str(self.compression),
            "part_bytes": self.part_bytes,
        }

    def differences(self, other: Settings) -> list[str]:
        """Names of the settings in which two jobs differ."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def to_proto(self, config: ps_pb2.JobConfig) -> None:
        """Write these settings into a JobConfig."""
        config.mode = self.mode.to_proto()
        config.staleness = self.staleness
        config.backup_workers = self.backup_workers
        config.staleness_aware_lr = self.staleness_aware_lr
        config.buffer = self.buffer
        config.delay_compensation = self.delay_compensation
        if self.mode.local:
            config.local.CopyFrom(
                ps_pb2.LocalSgd(
                    steps=self.local_steps,
                    outer_lr=self.outer_lr,
                    outer_momentum=self.outer_momentum,
                )
            )
        config.optimizer.CopyFrom(self.optimizer.to_proto(self.lr))
        schedule = self.lr_schedule.to_proto()
        if schedule is not None:
            config.optimizer.schedule.CopyFrom(schedule)
        if self.compression.enabled:
            config.compression.CopyFrom(self.compression.to_proto())
        config.part_bytes = self.part_bytes

    @classmethod
    def from_proto(cls, config: ps_pb2.JobConfig) -> Settings:
        """The settings a JobConfig carries; JobError names what is not valid."""
        try:
            mode = Mode.from_proto(config.mode)
            local = (
                config.local
                if mode.local
                else ps_pb2.LocalSgd(
                    steps=_BARE.local_steps,
                    outer_lr=_BARE.outer_lr,
                    outer_momentum=_BARE.outer_momentum,
                )
            )
            if config.HasField("local") and not mode.local:
                raise JobError(f"local applies to the local modes only, not {mode.value}")
            return cls(
                mode=mode,
                staleness=config.staleness,
                backup_workers=config.backup_workers,
                staleness_aware_lr=config.staleness_aware_lr,
                buffer=config.buffer or 1,
                delay_compensation=config.delay_compensation,
                local_steps=local.steps,
                outer_lr=local.outer_lr,
                outer_momentum=local.outer_momentum,
                optimizer=optimizer_from_proto(config.optimizer),
                lr=config.optimizer.lr,
                lr_schedule=LrSchedule.from_proto(config.optimizer),
                compression=Compression.from_proto(config.compression),
                part_bytes=config.part_bytes,
            )
        except (OptimizerError, ScheduleError, CompressionError) as e:
            raise JobError(str(e)) from None

    def describe(self) -> str:
        """One line for logs: ``ssp (staleness 2), adam(beta1=0) lr 0.003, ...``."""
        mode = self.mode.value
        if self.mode is Mode.SSP:
            mode += f" (staleness {self.staleness})"
        if self.backup_workers:
            mode += f" ({self.backup_workers} backup workers)"
        if self.buffer > 1:
            mode += f" (buffer {self.buffer})"
        if self.mode.local:
            mode += f" ({self.local_steps} local steps, outer sgd lr {self.outer_lr:g}"
            mode += f" nesterov {self.outer_momentum:g})" if self.outer_momentum else ")"
        text = f"{mode}, {self.optimizer} lr {self.lr:g}"
        if self.lr_schedule != LrSchedule():
            text += f" {self.lr_schedule}"
        if self.staleness_aware_lr:
            text += ", staleness-aware lr"
        if self.delay_compensation:
            text += f", delay compensation {self.delay_compensation:g}"
        if self.compression.enabled:
            text += f", compression {self.compression}"
        return text


_FIELDS = {f.name for f in fields(Settings)}
# Each field's default, read by Settings' own checks (the default Settings needs them).
_BARE = type("Defaults", (), {f.name: f.default for f in fields(Settings) if f.init})
_DEFAULT = Settings()


@dataclass(frozen=True)
class Job:
    """One job: its settings and the model's layout over the servers, as one server (or a
    client, with ``server_index`` 0) holds it. Two inits conflict when :meth:`differences`
    names something: a setting, the layout, or (both naming some) the initial workers."""

    job_id: str
    settings: Settings
    layout: Layout
    server_index: int = 0
    workers: tuple[str, ...] = field(default=(), compare=False)  # initially active: see differences

    def differences(self, other: Job) -> list[str]:
        """Names of what makes two jobs conflict (settings by their own names). Initial
        workers conflict only when both jobs name some (ranks that disagree on the world);
        an Init naming none (a worker daemon, whose membership the scheduler sets) does not."""
        out = [
            f.name
            for f in fields(self)
            if f.compare
            and f.name != "settings"
            and getattr(self, f.name) != getattr(other, f.name)
        ]
        if self.workers and other.workers and set(self.workers) != set(other.workers):
            out.append("workers")
        return self.settings.differences(other.settings) + out

    def to_proto(self) -> ps_pb2.JobConfig:
        config = ps_pb2.JobConfig(
            job_id=self.job_id,
            tensors=[
                ps_pb2.TensorSpec(name=s.name, dtype=wire_dtype(s.dtype).proto, shape=s.shape)
                for s in self.layout.specs
            ],
            num_servers=self.layout.num_servers,
            server_index=self.server_index,
            layout_digest=self.layout.digest,
            workers=self.workers,
        )
        self.settings.to_proto(config)
        return config

    @classmethod
    def from_proto(cls, config: ps_pb2.JobConfig, limits: Limits = _LIMITS) -> Job:
        """Validate a JobConfig and recompute its layout; JobError names what is wrong."""
        size = config.ByteSize()
        if size > limits.max_config_bytes:
            raise JobError(
                f"the job config has {size} bytes; the limit is {limits.max_config_bytes}"
            )
        limits.check_id("job_id", config.job_id, empty=False)
        if len(config.workers) > limits.max_workers:
            raise JobError(f"{len(config.workers)} workers; the limit is {limits.max_workers}")
        for worker in config.workers:
            limits.check_id("worker id", worker, empty=False)
        if len(config.layout_digest) > limits.digest_chars:
            raise JobError(
                f"layout_digest has {len(config.layout_digest)} characters; "
                f"the limit is {limits.digest_chars}"
            )
        if len(config.tensors) > limits.max_tensors:
            raise JobError(
                f"the model has {len(config.tensors)} tensors; the limit is {limits.max_tensors}"
            )
        if config.num_servers > limits.max_servers:
            raise JobError(f"num_servers {config.num_servers} is over {limits.max_servers}")
        if config.num_servers < 1 or config.server_index >= config.num_servers:
            raise JobError(
                f"server_index {config.server_index} is not below num_servers {config.num_servers}"
            )
        settings = Settings.from_proto(config)
        specs = []
        for t in config.tensors:
            limits.check_name("tensor name", t.name)
            try:
                dtype = wire_dtype(t.dtype).name
            except CodecError as e:
                raise JobError(f"tensor {t.name!r}: {e}") from None
            if len(t.shape) > limits.max_rank:
                raise JobError(
                    f"tensor {t.name!r} has rank {len(t.shape)}; the limit is {limits.max_rank}"
                )
            specs.append(TensorSpec(t.name, dtype, tuple(t.shape)))
        if not specs:
            raise JobError("the model has no tensors")
        total = sum(s.numel * wire_dtype(s.dtype).itemsize for s in specs)
        if total > limits.max_model_bytes:
            raise JobError(
                f"the model needs {total} bytes; this server takes at most {limits.max_model_bytes}"
            )
        part_bytes = settings.part_bytes
        parts = sum(-(-s.numel * wire_dtype(s.dtype).itemsize // part_bytes) for s in specs)
        if parts > limits.max_parts:
            raise JobError(
                f"part_bytes {part_bytes} cuts the model into {parts} parts; "
                f"the limit is {limits.max_parts}"
            )
        try:
            layout = plan_layout(specs, config.num_servers, part_bytes)
        except ValueError as e:
            raise JobError(f"layout: {e}") from None
        if config.layout_digest and config.layout_digest != layout.digest:
            raise JobError(
                f"layout digest {config.layout_digest} differs from this server's "
                f"{layout.digest}: client and server disagree on the layout (different versions?)"
            )
        return cls(config.job_id, settings, layout, config.server_index, tuple(config.workers))

    @classmethod
    def for_model(
        cls,
        job_id: str,
        specs: list[TensorSpec],
        num_servers: int,
        settings: Settings,
        workers: Iterable[str] = (),
    ) -> Job:
        """A client's view of a new job over ``num_servers`` servers; ``workers`` are
        worker ids (a list of strings: a bare string is refused, not split into letters)."""
        try:
            ids = None if isinstance(workers, (str, bytes)) else tuple(workers)
        except TypeError:
            ids = None
        if ids is None or not all(isinstance(w, str) and w for w in ids):
            raise JobError(f"workers must be a list of non-empty worker ids, got {workers!r}")
        try:
            layout = plan_layout(specs, num_servers, settings.part_bytes)
        except ValueError as e:
            raise JobError(f"layout: {e}") from None
        return cls(job_id, settings, layout, 0, ids)

    def for_server(self, index: int) -> Job:
        return Job(self.job_id, self.settings, self.layout, index, self.workers)
