"""Malformed and hostile requests, sent as raw messages, beyond test_errors_integration:
garbage bytes, oversized and malformed jobs, bad membership, leaves and job ends, oversized
ids, and the scheduler's own calls.
Each gets its documented status, the daemons keep serving, and the weights and the task
queue are unchanged."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import ps_pb2, rpc, scheduler_pb2, scheduler_pb2_grpc
from protos.job import Job, Settings
from protos.layout import TensorSpec
from ps_worker import Client, ClientConfig
from ps_worker.data import prepare
from scheduler.launch import BIN, Daemon, servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

INIT = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
HUGE = "x" * 100_000  # an id far over the server's limit (256 characters)


def raw(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def init_message(config: ps_pb2.JobConfig) -> bytes:
    return ps_pb2.InitRequest(header=ps_pb2.InitHeader(config=config)).SerializeToString()


def header_only(header: ps_pb2.PushHeader) -> bytes:
    return ps_pb2.PushRequest(header=header).SerializeToString()


def test_hostile_requests_to_a_server_and_the_scheduler(tmp_path):
    data = tmp_path / "data"
    prepare("digits", data, shards=4, samples=400)
    with servers(1, tmp_path) as (server,):
        with Client([server.address], job_id="h", worker_id="good", config=ClientConfig()) as c:
            c.init(INIT, optimizer="sgd", lr=0.5)
            c.push({k: torch.ones_like(v) for k, v in INIT.items()})
            good = c.job().to_proto()
            before = c.pull(observe=True)
        argv = [str(BIN / "ps-scheduler"), "--port", "0", "--state", str(tmp_path / "s.db")]
        argv += ["--data-dir", str(data), "--servers", server.address, "--model", "digits-mlp"]
        scheduler = Daemon(argv, tmp_path / "scheduler.log")
        try:
            with (
                grpc.insecure_channel(server.address) as ps_channel,
                grpc.insecure_channel(scheduler.address) as s_channel,
            ):
                calls = rpc.calls(ps_channel)
                sched = scheduler_pb2_grpc.SchedulerStub(s_channel)
                worker = sched.Register(scheduler_pb2.RegisterRequest(host="h"), timeout=10)
                queue = progress(sched)

                def job(**changes) -> bytes:
                    config = ps_pb2.JobConfig()
                    config.CopyFrom(good)
                    config.job_id = "other"
                    config.layout_digest = ""
                    for key, value in changes.items():
                        if key == "tensors":
                            del config.tensors[:]
                            config.tensors.extend(value)
                        elif key == "lr":
                            config.optimizer.lr = value
                        elif key == "workers":
                            config.workers[:] = value
                        else:
                            setattr(config, key, value)
                    return init_message(config)

                def spec(name, shape, dtype=ps_pb2.FLOAT32):
                    return ps_pb2.TensorSpec(name=name, dtype=dtype, shape=shape)

                cases = [
                    ("garbage push", lambda: calls.push(iter([b"\xff\xfe garbage"]), timeout=10),
                     INVALID, "push"),
                    ("garbage step", lambda: calls.step(b"\x0a\xff\xff\xff\xff", timeout=10),
                     INVALID, "step"),
                    ("garbage init", lambda: calls.init(iter([b"\x12\x05abc"]), timeout=10),
                     INVALID, "init"),
                    ("rank 9 tensor", lambda: calls.init(
                        iter([job(tensors=[spec("x", [1] * 9)])]), timeout=10),
                     INVALID, "rank 9"),
                    ("huge model", lambda: calls.init(
                        iter([job(tensors=[spec("x", [1 << 40])])]), timeout=10),
                     INVALID, "bytes"),
                    ("too many tensors", lambda: calls.init(
                        iter([job(tensors=[spec(f"t{i}", [1]) for i in range(100_001)])]),
                        timeout=30),
                     INVALID, "tensors"),
                    ("a million parts", lambda: calls.init(
                        iter([job(part_bytes=1, tensors=[spec("x", [1 << 20])])]), timeout=10),
                     INVALID, "parts"),
                    ("no tensors", lambda: calls.init(iter([job(tensors=[])]), timeout=10),
                     INVALID, "no tensors"),
                    ("unknown dtype", lambda: calls.init(
                        iter([job(tensors=[spec("x", [3], dtype=42)])]), timeout=10),
                     INVALID, "dtype"),
                    ("server index out of range", lambda: calls.init(
                        iter([job(server_index=5)]), timeout=10),
                     INVALID, "server_index"),
                    ("zero learning rate", lambda: calls.init(iter([job(lr=0.0)]), timeout=10),
                     INVALID, "learning rate"),
                    ("unknown mode", lambda: calls.init(iter([job(mode=9)]), timeout=10),
                     INVALID, "mode 9"),
                    ("empty worker id in membership", lambda: calls.set_membership(
                        ps_pb2.MembershipRequest(job_id="h", active_workers=["good", ""]),
                        timeout=10), INVALID, "non-empty"),
                    ("membership of another job", lambda: calls.set_membership(
                        ps_pb2.MembershipRequest(job_id="nope", active_workers=["x"]),
                        timeout=10), grpc.StatusCode.NOT_FOUND, "unknown job"),
                    ("leave of another job", lambda: calls.leave(
                        ps_pb2.LeaveRequest(job_id="nope", worker_id="good"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown job 'nope'"),
                    ("leave with an empty worker id", lambda: calls.leave(
                        ps_pb2.LeaveRequest(job_id="h", worker_id="", session="s"), timeout=10),
                     INVALID, "worker_id is empty"),
                    ("leave with a huge worker id", lambda: calls.leave(
                        ps_pb2.LeaveRequest(job_id="h", worker_id=HUGE), timeout=10),
                     INVALID, "worker_id has 100000 characters; the limit is 256"),
                    ("leave with a huge session", lambda: calls.leave(
                        ps_pb2.LeaveRequest(job_id="h", worker_id="good", session=HUGE),
                        timeout=10), INVALID, "session has 100000 characters"),
                    ("leave with a huge job id", lambda: calls.leave(
                        ps_pb2.LeaveRequest(job_id=HUGE, worker_id="good"), timeout=10),
                     INVALID, "job_id has 100000 characters"),
                    ("push with a huge session", lambda: calls.push(iter([header_only(
                        ps_pb2.PushHeader(job_id="h", worker_id="good", clock=9, session=HUGE)
                    )]), timeout=10), INVALID, "session has 100000 characters"),
                    ("pull with a huge worker id", lambda: list(calls.pull(ps_pb2.PullRequest(
                        job_id="h", worker_id=HUGE), timeout=10)),
                     INVALID, "worker_id has 100000 characters"),
                    ("membership with a huge worker id", lambda: calls.set_membership(
                        ps_pb2.MembershipRequest(job_id="h", active_workers=["good", HUGE]),
                        timeout=10), INVALID, "worker_id has 100000 characters"),
                    ("init naming an empty worker", lambda: calls.init(
                        iter([job(workers=["a", ""])]), timeout=10),
                     INVALID, "worker id is empty"),
                    ("init naming a huge worker", lambda: calls.init(
                        iter([job(workers=["a", HUGE])]), timeout=10),
                     INVALID, "worker id has 100000 characters"),
                    ("end of another job", lambda: calls.end_job(
                        ps_pb2.EndJobRequest(job_id="nope"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown job 'nope'"),
                    ("end of no job id", lambda: calls.end_job(
                        ps_pb2.EndJobRequest(), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown job ''"),
                    ("end with a huge job id", lambda: calls.end_job(
                        ps_pb2.EndJobRequest(job_id=HUGE), timeout=10),
                     INVALID, "job_id has 100000 characters"),
                    ("shm step without a segment", lambda: calls.shm_step(
                        ps_pb2.ShmStepRequest(pull=ps_pb2.PullRequest(job_id="h")), timeout=10),
                     INVALID, "segment"),
                    ("heartbeat of an unknown worker", lambda: sched.Heartbeat(
                        scheduler_pb2.HeartbeatRequest(worker_id="ghost"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown worker"),
                    ("lease for an unknown worker", lambda: sched.Lease(
                        scheduler_pb2.LeaseRequest(worker_id="ghost"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown worker"),
                    ("completion of a shard that does not exist", lambda: sched.Complete(
                        scheduler_pb2.CompleteRequest(
                            worker_id=worker.worker_id,
                            task=scheduler_pb2.Task(epoch=99, shard=7, lease_id="x")),
                        timeout=10), INVALID, "no task"),
                    ("evaluation of an epoch the job has not", lambda: sched.ReportEvaluation(
                        scheduler_pb2.EvaluationRequest(
                            worker_id=worker.worker_id, epoch=500, accuracy=0.5),
                        timeout=10), INVALID, "no epoch"),
                    ("accuracy above 1", lambda: sched.ReportEvaluation(
                        scheduler_pb2.EvaluationRequest(
                            worker_id=worker.worker_id, epoch=0, accuracy=7.0),
                        timeout=10), INVALID, "accuracy"),
                    ("leave of an unknown worker", lambda: sched.Leave(
                        scheduler_pb2.WorkerLeaveRequest(worker_id="ghost"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "unknown worker"),
                    ("garbage bytes to the scheduler", lambda: s_channel.unary_unary(
                        "/ps.Scheduler/Lease")(b"\xff\xff\xff", timeout=10),
                     INVALID, "cannot parse LeaseRequest"),
                ]  # fmt: skip
                for name, call, code, message in cases:
                    error = raw(call)
                    assert error.code() == code, (name, error.code(), error.details())
                    assert message.lower() in (error.details() or "").lower(), (name, error)
                assert progress(sched) == queue  # the task queue is as it was
                ghost = ps_pb2.LeaveRequest(job_id="h", worker_id="ghost", session="g")
                assert list(calls.leave(ghost, timeout=10).active_workers) == []  # harmless
                assert list(calls.leave(ghost, timeout=10).active_workers) == []  # and again
                assert sched.Register(scheduler_pb2.RegisterRequest(host="h2"), timeout=10)
        finally:
            scheduler.stop()
        with Client([server.address], job_id="h", worker_id="r", config=ClientConfig()) as c:
            after = c.pull(observe=True)
            status = c.status()[0]
        assert status.pushes_received == 1 and status.version == 1
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert server.proc.poll() is None


def test_hostile_optimizer_options_in_an_init_leave_the_server_uninitialised(tmp_path):
    """A hand-made JobConfig with options no client would send: each is INVALID_ARGUMENT
    naming the option, the server stays uninitialised, and a good init still works. NaN
    and infinite options were accepted (NaN weights after the first update)."""
    specs = [TensorSpec(n, "float32", tuple(v.shape)) for n, v in INIT.items()]

    def config(edit) -> bytes:
        message = Job.for_model("h", specs, 1, Settings.build(optimizer="sgd")).to_proto()
        edit(message)
        return init_message(message)

    def options(kind: str, **values):
        def edit(c: ps_pb2.JobConfig) -> None:
            c.optimizer.ClearField(c.optimizer.WhichOneof("kind"))
            getattr(c.optimizer, kind).SetInParent()
            for name, value in values.items():
                setattr(getattr(c.optimizer, kind), name, value)

        return edit

    nan, inf = float("nan"), float("inf")
    cases = [
        (options("sgd", momentum=nan), "sgd option momentum must be a finite number"),
        (options("sgd", weight_decay=inf), "sgd option weight_decay must be a finite number"),
        (options("adam", eps=-1.0), "eps and weight_decay must be non-negative"),
        (options("adam", eps=nan), "adam option eps must be a finite number"),
        (options("adam", beta2=inf), "adam option beta2 must be a finite number"),
        (options("adagrad", lr_decay=nan), "adagrad option lr_decay must be a finite number"),
        (options("adagrad", initial_accumulator_value=-inf), "initial_accumulator_value"),
        (lambda c: setattr(c.optimizer, "lr", nan), "learning rate"),
        (lambda c: c.optimizer.ClearField("sgd"), "optimizer: none given"),
        (lambda c: setattr(c, "mode", 42), "mode 42"),
        (lambda c: c.optimizer.schedule.MergeFrom(ps_pb2.LrSchedule(kind=9)), "lr schedule kind"),
        (lambda c: setattr(c.compression, "gradient_dtype", 77), "dtype"),
        (lambda c: setattr(c, "part_bytes", 0), "part_bytes"),
    ]
    with servers(1, tmp_path) as (server,), grpc.insecure_channel(server.address) as channel:
        calls = rpc.calls(channel)
        for edit, message in cases:
            error = raw(lambda edit=edit: calls.init(iter([config(edit)]), timeout=10))
            assert error.code() == INVALID, (message, error.code(), error.details())
            assert message.lower() in (error.details() or "").lower(), (message, error)
            status = ps_pb2.StatusResponse.FromString(
                channel.unary_unary(rpc.method("Status"))(
                    ps_pb2.StatusRequest().SerializeToString(), timeout=10
                )
            )
            assert not status.initialised, message
        with Client([server.address], job_id="h", worker_id="good", config=ClientConfig()) as c:
            assert c.init(INIT, optimizer="sgd", lr=0.5)
            assert c.status()[0].initialised
        assert server.proc.poll() is None


def progress(stub) -> tuple:
    import json

    p = json.loads(stub.Progress(scheduler_pb2.ProgressRequest(), timeout=10).progress_json)
    return p["done"], p["leased"], p["pending"], p["epoch"], len(p["evaluations"])
