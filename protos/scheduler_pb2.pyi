from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("host", "device")
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    host: str
    device: str
    def __init__(self, host: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "job_spec_json")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_spec_json: str
    def __init__(self, worker_id: _Optional[str] = ..., job_spec_json: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "clock", "samples_per_s", "lease_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    clock: int
    samples_per_s: float
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., samples_per_s: _Optional[float] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("finished",)
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    def __init__(self, finished: _Optional[bool] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("worker_id", "lease_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("epoch", "shard", "lease_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    shard: int
    lease_id: str
    def __init__(self, epoch: _Optional[int] = ..., shard: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("has_task", "task", "has_evaluation", "evaluate_epoch", "finished", "reason")
    HAS_TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    HAS_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    has_task: bool
    task: Task
    has_evaluation: bool
    evaluate_epoch: int
    finished: bool
    reason: str
    def __init__(self, has_task: _Optional[bool] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., has_evaluation: _Optional[bool] = ..., evaluate_epoch: _Optional[int] = ..., finished: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("worker_id", "task", "clock_start", "clock_end", "versions", "samples")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLOCK_START_FIELD_NUMBER: _ClassVar[int]
    CLOCK_END_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task: Task
    clock_start: int
    clock_end: int
    versions: _containers.RepeatedCompositeFieldContainer[ServerVersions]
    samples: int
    def __init__(self, worker_id: _Optional[str] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., clock_start: _Optional[int] = ..., clock_end: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ServerVersions, _Mapping]]] = ..., samples: _Optional[int] = ...) -> None: ...

class ServerVersions(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[_Iterable[int]] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("recorded",)
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    recorded: bool
    def __init__(self, recorded: _Optional[bool] = ...) -> None: ...

class EvaluationRequest(_message.Message):
    __slots__ = ("worker_id", "epoch", "loss", "accuracy")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    loss: float
    accuracy: float
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class EvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerLeaveRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WorkerLeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProgressRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProgressResponse(_message.Message):
    __slots__ = ("progress_json",)
    PROGRESS_JSON_FIELD_NUMBER: _ClassVar[int]
    progress_json: str
    def __init__(self, progress_json: _Optional[str] = ...) -> None: ...
