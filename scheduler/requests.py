"""Every scheduler request parsed and checked before the state sees it.

A request that does not parse, a number outside what SQLite stores (or outside
sense: a negative rate, a NaN loss), an id over the servers' length limit or
holding a control character is refused with INVALID_ARGUMENT (:class:`InvalidRequest`)
and changes nothing. What depends on the job (an epoch beyond it, a lease not held)
is the state's to refuse.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from protos import scheduler_pb2
from protos.job import JobError
from protos.limits import Limits
from scheduler.records import InvalidRequest

M = TypeVar("M", bound=Message)
LIMITS = Limits()
MAX_WHOLE = (1 << 63) - 1  # SQLite's INTEGER is a signed 64-bit number
MAX_LEASES_REPORTED = 1024  # lease ids in one request (a worker trains one shard at a time)


def parse(cls: type[M], raw: bytes) -> M:
    """``raw`` as a ``cls`` message, checked; InvalidRequest if it is neither."""
    message = cls()
    try:
        message.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidRequest(f"cannot parse {cls.__name__}: {e}") from None
    check(message)
    return message


def check(request: Message) -> None:
    """InvalidRequest naming the first field of ``request`` out of range, if any."""
    r = request
    if isinstance(r, scheduler_pb2.RegisterRequest):
        text("host", r.host)
        text("device", r.device)
        return
    if isinstance(r, scheduler_pb2.ProgressRequest):
        return
    text("worker_id", r.worker_id, empty=False)  # every other request names its worker
    if isinstance(r, scheduler_pb2.HeartbeatRequest):
        whole("clock", r.clock)
        real("samples_per_s", r.samples_per_s, 0.0, math.inf)
        leases(r.lease_ids)
    elif isinstance(r, scheduler_pb2.LeaseRequest):
        leases(r.lease_ids)
    elif isinstance(r, scheduler_pb2.CompleteRequest):
        text("task.lease_id", r.task.lease_id, empty=False)
        whole("clock_start", r.clock_start)
        whole("clock_end", r.clock_end, low=r.clock_start)
        whole("samples", r.samples)
        for i, push in enumerate(r.versions):
            for version in push.version:
                whole(f"versions[{i}]", version)
    elif isinstance(r, scheduler_pb2.EvaluationRequest):
        if r.loss != math.inf:  # a model that diverged: its workers report an infinite loss
            real("loss", r.loss, 0.0, math.inf)
        real("accuracy", r.accuracy, 0.0, 1.0)


def text(name: str, value: str, empty: bool = True) -> None:
    """An id or name: within the servers' id length limit, no control characters."""
    try:
        LIMITS.check_id(name, value, empty=empty)
    except JobError as e:
        raise InvalidRequest(str(e)) from None
    bad = next((c for c in value if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise InvalidRequest(f"{name} holds a control character ({ord(bad):#x})")


def whole(name: str, value: int, low: int = 0, high: int = MAX_WHOLE) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{name} {value} is not within [{low}, {high}]")


def real(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(f"{name} {value} is not a finite number within [{low:g}, {high:g}]")


def leases(ids: Iterable[str]) -> None:
    ids = list(ids)
    if len(ids) > MAX_LEASES_REPORTED:
        raise InvalidRequest(f"{len(ids)} lease ids; the limit is {MAX_LEASES_REPORTED}")
    for lease_id in ids:
        text("lease_ids", lease_id, empty=False)
