from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    SYNC: _ClassVar[Mode]
    ASYNC: _ClassVar[Mode]
    SSP: _ClassVar[Mode]
    LOCAL: _ClassVar[Mode]
    LOCAL_ASYNC: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
MODE_UNSPECIFIED: Mode
SYNC: Mode
ASYNC: Mode
SSP: Mode
LOCAL: Mode
LOCAL_ASYNC: Mode

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SGDConfig(_message.Message):
    __slots__ = ("momentum", "dampening", "nesterov", "weight_decay")
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    def __init__(self, momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdamConfig(_message.Message):
    __slots__ = ("beta1", "beta2", "eps", "weight_decay")
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    def __init__(self, beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdagradConfig(_message.Message):
    __slots__ = ("lr_decay", "eps", "weight_decay", "initial_accumulator_value")
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    lr_decay: float
    eps: float
    weight_decay: float
    initial_accumulator_value: float
    def __init__(self, lr_decay: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class LrSchedule(_message.Message):
    __slots__ = ("kind", "total_steps", "final_ratio", "warmup_steps")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONSTANT: _ClassVar[LrSchedule.Kind]
        COSINE: _ClassVar[LrSchedule.Kind]
    CONSTANT: LrSchedule.Kind
    COSINE: LrSchedule.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_RATIO_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    kind: LrSchedule.Kind
    total_steps: int
    final_ratio: float
    warmup_steps: int
    def __init__(self, kind: _Optional[_Union[LrSchedule.Kind, str]] = ..., total_steps: _Optional[int] = ..., final_ratio: _Optional[float] = ..., warmup_steps: _Optional[int] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("lr", "sgd", "adam", "adagrad", "schedule")
    LR_FIELD_NUMBER: _ClassVar[int]
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    ADAGRAD_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    sgd: SGDConfig
    adam: AdamConfig
    adagrad: AdagradConfig
    schedule: LrSchedule
    def __init__(self, lr: _Optional[float] = ..., sgd: _Optional[_Union[SGDConfig, _Mapping]] = ..., adam: _Optional[_Union[AdamConfig, _Mapping]] = ..., adagrad: _Optional[_Union[AdagradConfig, _Mapping]] = ..., schedule: _Optional[_Union[LrSchedule, _Mapping]] = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = ("job_id", "mode", "staleness", "backup_workers", "staleness_aware_lr", "optimizer", "tensors", "part_bytes", "num_servers", "server_index", "layout_digest", "workers", "compression", "buffer", "delay_compensation", "local")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_AWARE_LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PART_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    DELAY_COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    mode: Mode
    staleness: int
    backup_workers: int
    staleness_aware_lr: bool
    optimizer: OptimizerConfig
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    part_bytes: int
    num_servers: int
    server_index: int
    layout_digest: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    compression: Compression
    buffer: int
    delay_compensation: float
    local: LocalSgd
    def __init__(self, job_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., staleness: _Optional[int] = ..., backup_workers: _Optional[int] = ..., staleness_aware_lr: _Optional[bool] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., part_bytes: _Optional[int] = ..., num_servers: _Optional[int] = ..., server_index: _Optional[int] = ..., layout_digest: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., buffer: _Optional[int] = ..., delay_compensation: _Optional[float] = ..., local: _Optional[_Union[LocalSgd, _Mapping]] = ...) -> None: ...

class LocalSgd(_message.Message):
    __slots__ = ("steps", "outer_lr", "outer_momentum")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    steps: int
    outer_lr: float
    outer_momentum: float
    def __init__(self, steps: _Optional[int] = ..., outer_lr: _Optional[float] = ..., outer_momentum: _Optional[float] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("gradient_dtype", "weight_dtype", "topk_ratio")
    GRADIENT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    gradient_dtype: DType
    weight_dtype: DType
    topk_ratio: float
    def __init__(self, gradient_dtype: _Optional[_Union[DType, str]] = ..., weight_dtype: _Optional[_Union[DType, str]] = ..., topk_ratio: _Optional[float] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor", "part", "offset", "dtype", "data", "padding", "indices")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    part: int
    offset: int
    dtype: DType
    data: bytes
    padding: bytes
    indices: bytes
    def __init__(self, tensor: _Optional[str] = ..., part: _Optional[int] = ..., offset: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ..., indices: _Optional[bytes] = ...) -> None: ...

class InitHeader(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: JobConfig
    def __init__(self, config: _Optional[_Union[JobConfig, _Mapping]] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: InitHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[InitHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("created", "version")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    created: bool
    version: int
    def __init__(self, created: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job_id", "worker_id", "clock", "pulled_version", "session")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    PULLED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    clock: int
    pulled_version: int
    session: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., pulled_version: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("applied", "duplicate", "dropped", "version", "staleness", "lr")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    duplicate: bool
    dropped: bool
    version: int
    staleness: int
    lr: float
    def __init__(self, applied: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., dropped: _Optional[bool] = ..., version: _Optional[int] = ..., staleness: _Optional[int] = ..., lr: _Optional[float] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "clock", "min_version", "observe", "session")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    clock: int
    min_version: int
    observe: bool
    session: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., min_version: _Optional[int] = ..., observe: _Optional[bool] = ..., session: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "worker_clock", "mode", "push")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_CLOCK_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    version: int
    worker_clock: int
    mode: Mode
    push: PushResponse
    def __init__(self, version: _Optional[int] = ..., worker_clock: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., push: _Optional[_Union[PushResponse, _Mapping]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class StepHeader(_message.Message):
    __slots__ = ("push", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushHeader
    pull: PullRequest
    def __init__(self, push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: StepHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[StepHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class ShmStepRequest(_message.Message):
    __slots__ = ("segment", "push", "pull")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    segment: str
    push: PushHeader
    pull: PullRequest
    def __init__(self, segment: _Optional[str] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class BulkHello(_message.Message):
    __slots__ = ("nonce", "token", "instance")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    token: bool
    instance: str
    def __init__(self, nonce: _Optional[bytes] = ..., token: _Optional[bool] = ..., instance: _Optional[str] = ...) -> None: ...

class BulkAuth(_message.Message):
    __slots__ = ("mac",)
    MAC_FIELD_NUMBER: _ClassVar[int]
    mac: bytes
    def __init__(self, mac: _Optional[bytes] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("push", "pull", "data_bytes", "timeout_s")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    push: PushHeader
    pull: PullRequest
    data_bytes: int
    timeout_s: float
    def __init__(self, push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ..., data_bytes: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class BulkReply(_message.Message):
    __slots__ = ("code", "message", "reason", "header", "data_bytes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    header: PullHeader
    data_bytes: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., header: _Optional[_Union[PullHeader, _Mapping]] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class MembershipRequest(_message.Message):
    __slots__ = ("job_id", "active_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    active_workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., active_workers: _Optional[_Iterable[str]] = ...) -> None: ...

class MembershipResponse(_message.Message):
    __slots__ = ("active_workers", "version")
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    active_workers: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, active_workers: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "session")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    session: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("active_workers",)
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    active_workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, active_workers: _Optional[_Iterable[str]] = ...) -> None: ...

class EndJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class EndJobResponse(_message.Message):
    __slots__ = ("ended",)
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ended: bool
    def __init__(self, ended: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker_id", "clock", "active")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    clock: int
    active: bool
    def __init__(self, worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., active: _Optional[bool] = ...) -> None: ...

class Waiter(_message.Message):
    __slots__ = ("worker_id", "reason", "waiting_for")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    waiting_for: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ..., waiting_for: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("initialised", "config", "version", "workers", "waiting", "updates_applied", "pushes_received", "stale_dropped", "duplicates", "staleness_histogram", "parameter_bytes", "contributions", "hostname", "unix_socket", "shm_dir", "compensated", "uncompensated", "kept_bytes", "bulk_port", "instance")
    class StalenessHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    INITIALISED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STALE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    UNIX_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    COMPENSATED_FIELD_NUMBER: _ClassVar[int]
    UNCOMPENSATED_FIELD_NUMBER: _ClassVar[int]
    KEPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    initialised: bool
    config: JobConfig
    version: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    waiting: _containers.RepeatedCompositeFieldContainer[Waiter]
    updates_applied: int
    pushes_received: int
    stale_dropped: int
    duplicates: int
    staleness_histogram: _containers.ScalarMap[int, int]
    parameter_bytes: int
    contributions: int
    hostname: str
    unix_socket: str
    shm_dir: str
    compensated: int
    uncompensated: int
    kept_bytes: int
    bulk_port: int
    instance: str
    def __init__(self, initialised: _Optional[bool] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ..., version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., waiting: _Optional[_Iterable[_Union[Waiter, _Mapping]]] = ..., updates_applied: _Optional[int] = ..., pushes_received: _Optional[int] = ..., stale_dropped: _Optional[int] = ..., duplicates: _Optional[int] = ..., staleness_histogram: _Optional[_Mapping[int, int]] = ..., parameter_bytes: _Optional[int] = ..., contributions: _Optional[int] = ..., hostname: _Optional[str] = ..., unix_socket: _Optional[str] = ..., shm_dir: _Optional[str] = ..., compensated: _Optional[int] = ..., uncompensated: _Optional[int] = ..., kept_bytes: _Optional[int] = ..., bulk_port: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...
