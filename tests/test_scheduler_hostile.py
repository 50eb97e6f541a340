"""Bogus requests to a real scheduler (gRPC on loopback): each gets a clear status and
changes nothing. Only a lease's holder completes it, once; only the worker an epoch's
evaluation was assigned to reports it, once; numbers SQLite cannot hold, ids over the
servers' limit, control characters and unparseable bytes are INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from protos import rpc, scheduler_pb2_grpc
from protos import scheduler_pb2 as pb
from protos.jobspec import JobSpec
from protos.limits import Limits
from protos.security import ClientSecurity
from scheduler.records import InvalidRequest
from scheduler.requests import check
from scheduler.service import start_scheduler
from scheduler.state import Completion, SchedulerState
from scheduler.status import fetch_progress

SHARDS = 4
TOO_LONG = "w" * (Limits().max_id_chars + 1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
UNKNOWN_WORKER = grpc.StatusCode.NOT_FOUND


@dataclass
class World:
    """A job mid-way: epoch 0 done by ``a``, which evaluates it and holds ``a_task``; ``b``
    holds ``b_task``; ``c`` left, its lease ``c_task`` requeued; one shard never leased."""

    state: SchedulerState
    stub: scheduler_pb2_grpc.SchedulerStub
    channel: grpc.Channel
    a: str
    b: str
    c: str
    a_task: pb.Task
    b_task: pb.Task
    c_task: pb.Task
    pending: tuple[int, int]
    done: pb.Task  # a completed epoch-0 shard, with its figures below
    done_request: pb.CompleteRequest
    address: str = ""


def wire(task) -> pb.Task:
    return pb.Task(epoch=task.epoch, shard=task.shard, lease_id=task.lease_id)


def complete_request(worker: str, task: pb.Task, **kw) -> pb.CompleteRequest:
    versions = [pb.ServerVersions(version=[1]), pb.ServerVersions(version=[2])]
    figures = {"clock_start": 0, "clock_end": 2, "samples": 10, "versions": versions}
    return pb.CompleteRequest(worker_id=worker, task=task, **{**figures, **kw})


def as_completion(r: pb.CompleteRequest) -> Completion:
    return Completion(
        r.task.epoch,
        r.task.shard,
        r.worker_id,
        r.task.lease_id,
        r.clock_start,
        r.clock_end,
        [list(v.version) for v in r.versions],
        r.samples,
    )


@pytest.fixture
def world() -> Iterator[World]:
    state = SchedulerState(":memory:")
    state.create_or_resume(JobSpec(data_dir="d", epochs=2, lease_timeout_s=60.0), SHARDS)
    now = time.time()
    a, b, c = (state.register("h", "cpu", now) for _ in range(3))
    first = []
    for _ in range(SHARDS):
        task = wire(state.lease(a, now).task)
        request = complete_request(a, task)
        assert state.complete(as_completion(request), now)
        first.append((task, request))
    a_lease = state.lease(a, now)
    assert a_lease.evaluate_epoch == 0
    b_task, c_task = wire(state.lease(b, now).task), wire(state.lease(c, now).task)
    state.leave(c, now)
    pending = state.db.execute(
        "SELECT epoch, shard FROM tasks WHERE state='pending' AND shard != ?", (c_task.shard,)
    ).fetchone()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port, service, _ = asyncio.run_coroutine_threadsafe(
        start_scheduler(state, "127.0.0.1:0"), loop
    ).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=rpc.channel_options())
    try:
        yield World(
            state,
            scheduler_pb2_grpc.SchedulerStub(channel),
            channel,
            a,
            b,
            c,
            wire(a_lease.task),
            b_task,
            c_task,
            pending,
            *first[0],
            f"127.0.0.1:{port}",
        )
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        asyncio.run_coroutine_threadsafe(service.membership.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        state.close()


def snapshot(w: World) -> tuple:
    """Everything the state holds, and the progress a person sees."""
    tables = ("meta", "tasks", "completions", "workers", "evaluations")
    rows = {t: sorted(map(repr, w.state.db.execute(f"SELECT * FROM {t}"))) for t in tables}
    progress = json.loads(w.stub.Progress(pb.ProgressRequest(), timeout=10).progress_json)
    for worker in progress["workers"]:
        del worker["heartbeat_age_s"]  # the clock moves on
    return rows, progress


def refused(w: World, method: str, request, code: grpc.StatusCode, *says: str) -> None:
    """The call fails with ``code``, its message holding each of ``says``; nothing changed."""
    before = snapshot(w)
    with pytest.raises(grpc.RpcError) as info:
        getattr(w.stub, method)(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert all(part in info.value.details() for part in says), info.value.details()
    assert snapshot(w) == before


# ------------------------------------------------------------------ completions


def test_only_the_holder_completes_a_lease_and_only_once(world):
    w = world
    pending = pb.Task(epoch=w.pending[0], shard=w.pending[1], lease_id="0123456789ab")
    cases = [
        (complete_request("ghost", w.a_task), UNKNOWN_WORKER, "unknown worker 'ghost'"),
        (complete_request(w.a, pending), REFUSED, "holds no lease"),  # never leased
        (complete_request(w.b, w.a_task), REFUSED, "holds no lease"),  # another's lease id
        (
            complete_request(w.a, pb.Task(epoch=w.a_task.epoch, shard=w.a_task.shard)),
            INVALID,
            "task.lease_id is empty",
        ),
        (
            complete_request(w.a, pb.Task(**{**_fields(w.a_task), "lease_id": "f" * 12})),
            REFUSED,
            "holds no lease",
        ),  # the holder, a wrong lease id
        (complete_request(w.c, w.c_task), REFUSED, "requeued"),  # c left: its lease went back
        (complete_request(w.b, w.done), REFUSED, "already done, under another lease"),
        (
            complete_request(w.a, pb.Task(epoch=2, shard=0, lease_id="x")),
            INVALID,
            "no task for epoch 2",
        ),
        (
            complete_request(w.a, pb.Task(epoch=0, shard=SHARDS, lease_id="x")),
            INVALID,
            f"shard {SHARDS}",
        ),
        (
            complete_request(w.a, w.done, samples=11),
            REFUSED,
            "completed before with other figures",
        ),
    ]
    for request, code, says in cases:
        refused(w, "Complete", request, code, says)
    before = snapshot(w)
    # The holder's own report, again (its first reply lost): answered, not recorded again.
    assert not w.stub.Complete(w.done_request, timeout=10).recorded
    assert snapshot(w) == before
    assert w.stub.Complete(complete_request(w.b, w.b_task), timeout=10).recorded
    assert not w.stub.Complete(complete_request(w.b, w.b_task), timeout=10).recorded
    assert len(w.state.completions()) == SHARDS + 1


def _fields(task: pb.Task) -> dict:
    return {"epoch": task.epoch, "shard": task.shard, "lease_id": task.lease_id}


# ------------------------------------------------------------------ evaluations


def evaluation(worker: str, epoch: int, loss: float = 0.5, accuracy: float = 0.5):
    return pb.EvaluationRequest(worker_id=worker, epoch=epoch, loss=loss, accuracy=accuracy)


def test_only_the_assigned_worker_reports_an_evaluation_and_only_once(world):
    w = world
    cases = [
        (evaluation("ghost", 0), UNKNOWN_WORKER, "unknown worker 'ghost'"),
        (evaluation(w.b, 0), REFUSED, "not assigned to worker"),  # a evaluates epoch 0
        (evaluation(w.a, 1), REFUSED, "not assigned to worker"),  # nobody finished epoch 1
        (evaluation(w.a, 2), INVALID, "no epoch 2 in this job"),
        (evaluation(w.a, 0, accuracy=1.5), INVALID, "accuracy 1.5"),
    ]
    for request, code, says in cases:
        refused(w, "ReportEvaluation", request, code, says)
    w.stub.ReportEvaluation(evaluation(w.a, 0), timeout=10)
    before = snapshot(w)
    w.stub.ReportEvaluation(evaluation(w.a, 0), timeout=10)  # a retry: answered, no change
    assert snapshot(w) == before
    refused(w, "ReportEvaluation", evaluation(w.a, 0, 0.1), REFUSED, "evaluated before")
    assert [e["accuracy"] for e in w.state.progress(time.time()).evaluations] == [0.5]


# ---------------------------------------------------------------- wire checks

TOO_BIG = [1 << 63, (1 << 64) - 1]
NOT_FINITE_OR_NEGATIVE = [float("nan"), float("inf"), float("-inf"), -1.0]


def wire_cases(w: World) -> list[tuple[str, object, tuple[str, ...]]]:
    """(method, request, what the refusal says): each INVALID_ARGUMENT."""
    hb = {"worker_id": w.a, "lease_ids": [w.a_task.lease_id]}
    cases: list[tuple[str, object, str | tuple[str, ...]]] = []
    for big in TOO_BIG:
        cases += [
            ("Heartbeat", pb.HeartbeatRequest(**hb, clock=big), f"clock {big}"),
            ("Complete", complete_request(w.a, w.a_task, clock_start=big), "clock_start"),
            (
                "Complete",
                complete_request(w.a, w.a_task, clock_start=0, clock_end=big),
                "clock_end",
            ),
            ("Complete", complete_request(w.a, w.a_task, samples=big), "samples"),
            (
                "Complete",
                complete_request(w.a, w.a_task, versions=[pb.ServerVersions(version=[big])]),
                "versions[0]",
            ),
        ]
    cases.append(("Complete", complete_request(w.a, w.a_task, clock_start=5), "clock_end 2"))
    for bad in NOT_FINITE_OR_NEGATIVE:
        cases += [
            ("Heartbeat", pb.HeartbeatRequest(**hb, samples_per_s=bad), "samples_per_s"),
            ("ReportEvaluation", evaluation(w.a, 0, accuracy=bad), "accuracy"),
        ]
        if bad != float("inf"):  # a diverged model's loss: see the test below
            cases.append(("ReportEvaluation", evaluation(w.a, 0, loss=bad), "loss"))
    for text, says in [(TOO_LONG, "the limit is"), ("w\n1", "control character")]:
        texts = [
            ("Register", pb.RegisterRequest(host=text, device="cpu"), "host"),
            ("Register", pb.RegisterRequest(host="h", device=text), "device"),
            ("Heartbeat", pb.HeartbeatRequest(worker_id=text), "worker_id"),
            ("Heartbeat", pb.HeartbeatRequest(worker_id=w.a, lease_ids=[text]), "lease_ids"),
            ("Lease", pb.LeaseRequest(worker_id=text), "worker_id"),
            ("Lease", pb.LeaseRequest(worker_id=w.a, lease_ids=[text]), "lease_ids"),
            ("Complete", complete_request(text, w.a_task), "worker_id"),
            (
                "Complete",
                complete_request(w.a, pb.Task(**{**_fields(w.a_task), "lease_id": text})),
                "task.lease_id",
            ),
            ("ReportEvaluation", evaluation(text, 0), "worker_id"),
            ("Leave", pb.WorkerLeaveRequest(worker_id=text), "worker_id"),
        ]
        cases += [(method, request, (field, says)) for method, request, field in texts]
    return [(m, r, says if isinstance(says, tuple) else (says,)) for m, r, says in cases]


def test_numbers_and_ids_out_of_range_are_invalid_and_change_nothing(world):
    for method, request, says in wire_cases(world):
        refused(world, method, request, INVALID, *says)
    assert world.state.registered_count() == 3


def test_unparseable_bytes_to_every_method_are_invalid_argument(world):
    junk = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"]  # bad tag; short; not UTF-8
    methods = pb.DESCRIPTOR.services_by_name["Scheduler"].methods
    before = snapshot(world)
    for method in methods:
        call = world.channel.unary_unary(
            f"/ps.Scheduler/{method.name}", request_serializer=None, response_deserializer=None
        )
        for raw in junk:
            if method.input_type.name == "ProgressRequest" and raw == junk[2]:
                continue  # field 1 is no field of an empty message: kept as unknown, parses
            with pytest.raises(grpc.RpcError) as info:
                call(raw, timeout=10)
            assert info.value.code() == INVALID, (method.name, raw, info.value.details())
            assert info.value.details().startswith(f"cannot parse {method.input_type.name}")
    assert snapshot(world) == before


def test_a_diverged_models_infinite_loss_is_a_loss_and_nan_is_not():
    check(evaluation("w", 0, loss=float("inf")))
    with pytest.raises(InvalidRequest, match="loss nan"):
        check(evaluation("w", 0, loss=float("nan")))


def test_registrations_beyond_the_limit_are_refused_and_a_full_progress_is_read(world, monkeypatch):
    """Trap: 900 registrations of 256-emoji hosts made Progress 5.6 MB; ps-cluster read it
    over a channel with gRPC's 4 MiB default, took the refusal for an unreachable scheduler
    and reported a finished job as failed. The registrations had no limit."""
    import scheduler.state

    host = "\U0001f600" * Limits().max_id_chars
    for _ in range(2500):  # about 5 MB of Progress, as the attack's
        world.stub.Register(pb.RegisterRequest(host=host, device=host), timeout=10)
    progress = fetch_progress(world.address, ClientSecurity())
    assert len(progress["workers"]) == 2503 and progress["workers"][-1]["host"] == host
    monkeypatch.setattr(scheduler.state, "MAX_WORKERS", 2503)
    too_many = grpc.StatusCode.RESOURCE_EXHAUSTED
    refused(world, "Register", pb.RegisterRequest(host="h"), too_many, "2503 workers, its limit")
