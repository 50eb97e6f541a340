"""The job a server holds, and its translation from and to the wire message."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum

from protos import ps_pb2
from protos.codec import CodecError, wire_dtype
from protos.compression import Compression, CompressionError
from protos.layout import Layout, TensorSpec, plan_layout
from ps_server.errors import InvalidArgument
from ps_server.optimizers import SGD, Adagrad, Adam, Optimizer
from ps_server.schedule import LrSchedule, ScheduleError


class Mode(str, Enum):
    SYNC = "sync"
    ASYNC = "async"
    SSP = "ssp"


_MODE_TO_PROTO = {Mode.SYNC: ps_pb2.SYNC, Mode.ASYNC: ps_pb2.ASYNC, Mode.SSP: ps_pb2.SSP}
_MODE_FROM_PROTO = {v: k for k, v in _MODE_TO_PROTO.items()}


@dataclass(frozen=True)
class Job:
    """One server's view of a job. Two inits conflict when their Jobs differ."""

    job_id: str
    mode: Mode
    optimizer: Optimizer
    lr: float
    layout: Layout
    server_index: int
    staleness: int = 0
    backup_workers: int = 0
    staleness_aware_lr: bool = False
    compression: Compression = field(default_factory=Compression)
    schedule: LrSchedule = field(default_factory=LrSchedule)
    workers: tuple[str, ...] = field(default=(), compare=False)

    def differences(self, other: Job) -> list[str]:
        """Names of the fields that make two jobs conflict."""
        return [
            f.name
            for f in fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]


def mode_to_proto(mode: Mode) -> int:
    return _MODE_TO_PROTO[mode]


_SCHEDULE_TO_PROTO = {"constant": ps_pb2.LrSchedule.CONSTANT, "cosine": ps_pb2.LrSchedule.COSINE}
_SCHEDULE_FROM_PROTO = {v: k for k, v in _SCHEDULE_TO_PROTO.items()}


def schedule_from_proto(config: ps_pb2.OptimizerConfig) -> LrSchedule:
    if not config.HasField("schedule"):
        return LrSchedule()
    s = config.schedule
    if s.kind not in _SCHEDULE_FROM_PROTO:
        raise InvalidArgument(f"lr schedule kind {s.kind} is not constant or cosine")
    try:
        return LrSchedule(_SCHEDULE_FROM_PROTO[s.kind], s.total_steps, s.final_ratio)
    except ScheduleError as e:
        raise InvalidArgument(str(e)) from None


def schedule_to_proto(schedule: LrSchedule) -> ps_pb2.LrSchedule | None:
    """None for a constant schedule: it stays unset on the wire."""
    if schedule.kind == "constant":
        return None
    return ps_pb2.LrSchedule(
        kind=_SCHEDULE_TO_PROTO[schedule.kind],
        total_steps=schedule.total_steps,
        final_ratio=schedule.final_ratio,
    )


def optimizer_to_proto(optimizer: Optimizer, lr: float) -> ps_pb2.OptimizerConfig:
    if isinstance(optimizer, SGD):
        return ps_pb2.OptimizerConfig(
            lr=lr,
            sgd=ps_pb2.SGDConfig(
                momentum=optimizer.momentum,
                dampening=optimizer.dampening,
                nesterov=optimizer.nesterov,
                weight_decay=optimizer.weight_decay,
            ),
        )
    if isinstance(optimizer, Adam):
        return ps_pb2.OptimizerConfig(
            lr=lr,
            adam=ps_pb2.AdamConfig(
                beta1=optimizer.beta1,
                beta2=optimizer.beta2,
                eps=optimizer.eps,
                weight_decay=optimizer.weight_decay,
            ),
        )
    return ps_pb2.OptimizerConfig(
        lr=lr,
        adagrad=ps_pb2.AdagradConfig(
            lr_decay=optimizer.lr_decay,
            eps=optimizer.eps,
            weight_decay=optimizer.weight_decay,
            initial_accumulator_value=optimizer.initial_accumulator_value,
        ),
    )


def optimizer_from_proto(config: ps_pb2.OptimizerConfig) -> Optimizer:
    kind = config.WhichOneof("kind")
    try:
        if kind == "sgd":
            c = config.sgd
            return SGD(c.momentum, c.dampening, c.nesterov, c.weight_decay)
        if kind == "adam":
            c = config.adam
            return Adam(c.beta1, c.beta2, c.eps, c.weight_decay)
        if kind == "adagrad":
            c = config.adagrad
            return Adagrad(c.lr_decay, c.eps, c.weight_decay, c.initial_accumulator_value)
    except ValueError as e:
        raise InvalidArgument(f"optimizer {kind}: {e}") from None
    raise InvalidArgument("optimizer: none given (sgd, adam or adagrad)")


def job_to_proto(job: Job) -> ps_pb2.JobConfig:
    layout = job.layout
    config = ps_pb2.JobConfig(
        job_id=job.job_id,
        mode=_MODE_TO_PROTO[job.mode],
        staleness=job.staleness,
        backup_workers=job.backup_workers,
        staleness_aware_lr=job.staleness_aware_lr,
        optimizer=optimizer_to_proto(job.optimizer, job.lr),
        tensors=[
            ps_pb2.TensorSpec(name=s.name, dtype=wire_dtype(s.dtype).proto, shape=s.shape)
            for s in layout.specs
        ],
        part_bytes=layout.part_bytes,
        num_servers=layout.num_servers,
        server_index=job.server_index,
        layout_digest=layout.digest,
        workers=job.workers,
        compression=job.compression.to_proto() if job.compression.enabled else None,
    )
    schedule = schedule_to_proto(job.schedule)
    if schedule is not None:
        config.optimizer.schedule.CopyFrom(schedule)
    return config


@dataclass(frozen=True)
class Limits:
    """What one job may ask of a server: a hostile or mistaken Init is refused up front."""

    max_tensors: int = 100_000
    max_rank: int = 8
    max_model_bytes: int = 64 << 30  # the whole model, every server's share together
    max_parts: int = 1_000_000
    max_servers: int = 1024


def job_from_proto(config: ps_pb2.JobConfig, limits: Limits = Limits()) -> Job:
    """Validate a JobConfig and recompute its layout; raises InvalidArgument."""
    if not config.job_id:
        raise InvalidArgument("job_id is empty")
    if len(config.tensors) > limits.max_tensors:
        raise InvalidArgument(
            f"the model has {len(config.tensors)} tensors; the limit is {limits.max_tensors}"
        )
    if config.num_servers > limits.max_servers:
        raise InvalidArgument(f"num_servers {config.num_servers} is over {limits.max_servers}")
    if config.mode not in _MODE_FROM_PROTO:
        raise InvalidArgument(f"mode {config.mode} is not sync, async or ssp")
    if config.num_servers < 1 or config.server_index >= config.num_servers:
        raise InvalidArgument(
            f"server_index {config.server_index} is not below num_servers {config.num_servers}"
        )
    if config.part_bytes < 1:
        raise InvalidArgument("part_bytes must be positive")
    if not config.optimizer.lr > 0:
        raise InvalidArgument(f"learning rate must be positive, got {config.optimizer.lr}")
    specs = []
    for t in config.tensors:
        try:
            dtype = wire_dtype(t.dtype).name
        except CodecError as e:
            raise InvalidArgument(f"tensor {t.name!r}: {e}") from None
        if len(t.shape) > limits.max_rank:
            raise InvalidArgument(
                f"tensor {t.name!r} has rank {len(t.shape)}; the limit is {limits.max_rank}"
            )
        specs.append(TensorSpec(t.name, dtype, tuple(t.shape)))
    if not specs:
        raise InvalidArgument("the model has no tensors")
    total = sum(s.numel * wire_dtype(s.dtype).itemsize for s in specs)
    if total > limits.max_model_bytes:
        raise InvalidArgument(
            f"the model needs {total} bytes; this server takes at most {limits.max_model_bytes}"
        )
    parts = sum(-(-s.numel * wire_dtype(s.dtype).itemsize // config.part_bytes) for s in specs)
    if parts > limits.max_parts:
        raise InvalidArgument(
            f"part_bytes {config.part_bytes} cuts the model into {parts} parts; "
            f"the limit is {limits.max_parts}"
        )
    try:
        layout = plan_layout(specs, config.num_servers, config.part_bytes)
    except ValueError as e:
        raise InvalidArgument(f"layout: {e}") from None
    if config.layout_digest and config.layout_digest != layout.digest:
        raise InvalidArgument(
            f"layout digest {config.layout_digest} differs from this server's {layout.digest}: "
            "client and server disagree on the layout (different versions?)"
        )
    mode = _MODE_FROM_PROTO[config.mode]
    if config.backup_workers and mode is not Mode.SYNC:
        raise InvalidArgument("backup_workers applies to sync mode only")
    try:
        compression = Compression.from_proto(config.compression)
    except CompressionError as e:
        raise InvalidArgument(str(e)) from None
    return Job(
        job_id=config.job_id,
        mode=mode,
        optimizer=optimizer_from_proto(config.optimizer),
        lr=config.optimizer.lr,
        layout=layout,
        server_index=config.server_index,
        staleness=config.staleness,
        backup_workers=config.backup_workers,
        staleness_aware_lr=config.staleness_aware_lr,
        compression=compression,
        schedule=schedule_from_proto(config.optimizer),
        workers=tuple(config.workers),
    )
