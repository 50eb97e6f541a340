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
from protos.optimizers import (
    OPTIMIZERS,
    OPTION_TYPES,
    Adam,
    Optimizer,
    OptimizerError,
    make_optimizer,
    optimizer_from_proto,
)
from protos.schedule import LrSchedule, ScheduleError


class JobError(ValueError):
    """A job setting that is unknown, out of range, or inconsistent with another."""


OPTIMIZER_CLASSES = tuple(OPTIMIZERS.values())
# The whole-number settings: the least each may be, and the bound of its wire field.
_WHOLE = (("staleness", 0, 1 << 32), ("backup_workers", 0, 1 << 32), ("part_bytes", 1, 1 << 64))


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


@dataclass(frozen=True)
class Settings:
    """Everything a job asks of its servers apart from the model itself; the defaults are
    the product's defaults, for every way in."""

    mode: Mode = Mode.SSP
    staleness: int = 2  # ssp: how many clocks a worker may run ahead of the slowest
    backup_workers: int = 0  # sync: a step needs all active workers but this many
    staleness_aware_lr: bool = False  # async, ssp: lr / max(1, staleness) per gradient
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
        if self.backup_workers and self.mode is not Mode.SYNC:
            problems.append("backup_workers applies to sync mode only")
        if problems:
            raise JobError("; ".join(problems))

    @classmethod
    def names(cls) -> list[str]:
        """Every keyword :meth:`build` takes: the settings, ``lr_final_ratio`` (for a
        schedule given as a string), then every optimizer option."""
        return [f.name for f in fields(cls)] + ["lr_final_ratio", *OPTION_TYPES]

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
                values["lr_schedule"] = LrSchedule.parse(schedule, final_ratio or 0.0)
            elif final_ratio is not None:
                raise JobError("lr_final_ratio goes with an lr_schedule given as a string")
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
            "optimizer": self.optimizer.name,
            **self.optimizer.options(),
            "lr": self.lr,
            "lr_schedule": self.lr_schedule.spec(),
            "lr_final_ratio": self.lr_schedule.final_ratio,
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
            return cls(
                mode=Mode.from_proto(config.mode),
                staleness=config.staleness,
                backup_workers=config.backup_workers,
                staleness_aware_lr=config.staleness_aware_lr,
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
        text = f"{mode}, {self.optimizer} lr {self.lr:g}"
        if self.lr_schedule.kind != "constant":
            text += f" {self.lr_schedule}"
        if self.staleness_aware_lr:
            text += ", staleness-aware lr"
        if self.compression.enabled:
            text += f", compression {self.compression}"
        return text


_FIELDS = {f.name for f in fields(Settings)}
_DEFAULT = Settings()


@dataclass(frozen=True)
class Limits:
    """What one job and one request may ask of a server: hostile or mistaken requests are
    refused up front, before any work in proportion to what they claim.

    Ids (job, worker, client session) and tensor names are at most :attr:`max_id_chars` /
    :attr:`max_name_chars` characters, all printable (``str.isprintable``: no control
    characters such as below U+0020, U+007F or U+0080..U+009F, no line or paragraph
    separators, no format or unassigned characters; the plain space is allowed). A clock
    or version a client sends is at most :attr:`max_clock`. A push or init stream carries
    at most the bytes its job's parts on this server take, in at most one chunk per part
    plus one per :attr:`chunk_grain_bytes` of them.
    """

    max_tensors: int = 100_000
    max_rank: int = 8
    max_model_bytes: int = 64 << 30  # the whole model, every server's share together
    max_parts: int = 1_000_000
    max_servers: int = 1024
    max_id_chars: int = 256  # a job id, worker id or client session id
    max_workers: int = 10_000  # worker ids a job may hold on a server (Status lists them all)
    max_name_chars: int = 1024  # a tensor name
    max_config_bytes: int = 16 << 20  # a serialized JobConfig (Status replies carry it)
    max_clock: int = 1 << 62  # a push's clock and pulled_version, a pull's clock, min_version
    chunk_grain_bytes: int = 32  # a stream's chunks: one per part plus one per this many bytes
    digest_chars: int = 64  # a layout digest (this project's are 16)

    def check_id(self, name: str, value: str, empty: bool = True) -> None:
        """A JobError if an id is longer than :attr:`max_id_chars`, not printable, or empty
        (unless allowed). The length is checked first: a huge id costs nothing more."""
        self._check_text(name, value, self.max_id_chars)
        if not value and not empty:
            raise JobError(f"{name} is empty")

    def check_name(self, name: str, value: str) -> None:
        """A JobError if a tensor name is empty, too long or not printable."""
        self._check_text(name, value, self.max_name_chars)
        if not value:
            raise JobError(f"{name} is empty")

    def check_clock(self, name: str, value: int) -> None:
        """A JobError if a clock or version is over :attr:`max_clock`."""
        if value > self.max_clock:
            raise JobError(f"{name} {value} is over the limit {self.max_clock}")

    @staticmethod
    def _check_text(name: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise JobError(f"{name} has {len(value)} characters; the limit is {limit}")
        if not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            raise JobError(
                f"{name} {value!r} has the character U+{ord(bad):04X}: ids and names must be "
                "printable (no control characters)"
            )


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
    def from_proto(cls, config: ps_pb2.JobConfig, limits: Limits = Limits()) -> Job:
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
