"""Hostile and malformed requests to an in-process parameter server: each is refused with
its status before the server does work in proportion to it, changes nothing, and every
reply stays within the message limit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from protos import ps_pb2, rpc
from protos.codec import Piece, encode_frames, wire_dtype
from protos.compression import Compression
from protos.job import Job, JobError, Settings
from protos.layout import TensorSpec
from protos.limits import Limits
from protos.shm import Segment, segment_slots
from ps_server import workers
from ps_server.flat import FlatParams
from ps_server.service import ServiceConfig, start_server
from ps_server.store import ParameterStore
from tests.serverkit import push, refused, status
from tests.storekit import frames as stream_frames
from tests.storekit import grads, initial_values, new_store

pytestmark = pytest.mark.timeout(90)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Served:
    calls: rpc.Calls
    channel: grpc.Channel
    job: Job | None


@contextmanager
def serving(store: ParameterStore, **config) -> Iterator[Served]:
    """The service on a loopback port, on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["server"], box["port"], _ = loop.run_until_complete(
            start_server(store, "127.0.0.1:0", ServiceConfig(**config))
        )
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "the server did not start"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{box['port']}") as channel:
            yield Served(rpc.calls(channel), channel, store.job)
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def header(worker: str = "w", clock: int = 1, **kw) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(job_id="job", worker_id=worker, clock=clock, **kw)


def version(s: Served) -> int:
    return status(s.calls).version


# ---------------------------------------------------------------- 1: a refused step


def test_a_step_or_shm_step_whose_pull_is_refused_applies_no_push(tmp_path, monkeypatch):
    store, job = new_store("async")
    _, size = segment_slots(job.layout, 0)
    segment = Segment.create(str(tmp_path), size)
    try:
        with serving(store, shm_dir=str(tmp_path)) as s:
            step = ps_pb2.StepHeader(push=header())
            for pull in (
                ps_pb2.PullRequest(job_id="nope", worker_id="w", observe=True),
                ps_pb2.PullRequest(job_id="job", worker_id="w", observe=True, clock=1 << 63),
                ps_pb2.PullRequest(job_id="job", worker_id="w", clock=1 << 21),  # too far ahead
            ):
                step.pull.CopyFrom(pull)
                (frames,) = stream_frames(step, job, grads(1.0))
                error = refused(lambda frames=frames: s.calls.step(frames, timeout=10))
                assert error.code() in (grpc.StatusCode.NOT_FOUND, INVALID), error.details()
                shm = ps_pb2.ShmStepRequest(segment=segment.name, push=header(), pull=pull)
                error = refused(lambda shm=shm: s.calls.shm_step(shm, timeout=10))
                assert error.code() in (grpc.StatusCode.NOT_FOUND, INVALID), error.details()
            assert version(s) == 0 and status(s.calls).pushes_received == 0
            # What the push would change refuses the pull: its session taking the worker
            # id, or its worker taking the last place of the job's (the limit made 1 here).
            store.set_membership("job", ["w"])
            step = ps_pb2.StepHeader(push=header("A", session="s1"))
            for pull, code in (
                (ps_pb2.PullRequest(job_id="job", worker_id="A", session="s2"), INVALID),
                (ps_pb2.PullRequest(job_id="job", worker_id="B", session="s3"), EXHAUSTED),
            ):
                step.pull.CopyFrom(pull)
                (frames,) = stream_frames(step, job, grads(1.0))
                with monkeypatch.context() as m:
                    m.setattr(workers, "MAX_WORKERS", 2)
                    error = refused(lambda frames=frames: s.calls.step(frames, timeout=10))
                    assert error.code() == code, error.details()
                    shm = ps_pb2.ShmStepRequest(segment=segment.name, push=step.push, pull=pull)
                    error = refused(lambda shm=shm: s.calls.shm_step(shm, timeout=10))
                    assert error.code() == code, error.details()
            assert version(s) == 0 and status(s.calls).pushes_received == 0
    finally:
        segment.unlink()
        segment.close()


# ------------------------------------------------------- 2: streams beyond their job


def oversized(job_id: str = "job") -> bytes:
    """A message with 1 MiB of values for one part of storekit's job (48 bytes)."""
    piece = Piece("big", 0, 0, np.zeros(1 << 18, np.float32), wire_dtype("float32"))
    return next(encode_frames(None, [piece], 2 << 20))


def held_stream(first: bytes, call) -> tuple[grpc.RpcError, int]:
    """Send ``first``, then an oversized message, then (only once the call has ended) 38
    more: the error and how many messages were sent before it came."""
    sent = [0]
    done = threading.Event()

    def messages():
        for message in [first, oversized()]:
            sent[0] += 1
            yield message
        done.wait(30)  # the rest only after the call ended: the server must not need them
        for _ in range(38):
            sent[0] += 1
            yield oversized()

    future = call.future(messages(), timeout=60)
    try:
        error = future.exception(timeout=30)  # unrefused (the old server), this fails here
        return error, sent[0]
    finally:
        done.set()


def test_a_push_or_init_stream_over_what_the_job_takes_is_refused_before_the_rest():
    store, job = new_store("async")
    with serving(store) as s:
        first = next(encode_frames(header().SerializeToString(), [], 1))
        error, sent = held_stream(first, s.calls.push)
        assert error is not None and error.code() == INVALID, error
        assert "exceed what this server's parts of job 'job' take" in error.details()
        assert sent == 2
        assert version(s) == 0
    with serving(ParameterStore()) as s:
        init = ps_pb2.InitHeader(config=job.to_proto()).SerializeToString()
        error, sent = held_stream(next(encode_frames(init, [], 1)), s.calls.init)
        assert error is not None and error.code() == INVALID, error
        assert "exceed what this server's parts of job 'job' take" in error.details()
        assert sent == 2
        assert not status(s.calls).initialised


def test_a_message_of_countless_empty_chunks_is_refused_at_the_first_over():
    """Each chunk costs the server far more than its 2 bytes on the wire: a message of
    empty chunks is refused at the first over the job's count (or its bytes)."""
    store, _ = new_store("async")
    with serving(store) as s:
        first = next(encode_frames(header().SerializeToString(), [], 1))
        for count, says in [(400, "chunks (over 13)"), (500_000, "messages (over 14")]:
            message = first + b"\x12\x00" * count
            error = refused(lambda message=message: s.calls.push(iter([message]), timeout=30))
            assert error.code() == INVALID and says in error.details(), error.details()
        assert version(s) == 0


# ------------------------------------------------------------ 3: ids, numbers, top-k


def test_ids_clocks_and_names_outside_the_limits_are_refused(tmp_path):
    store, job = new_store("async")
    huge = "j" * (5 << 20)
    with serving(store, shm_dir=str(tmp_path)) as s:
        cases = [
            (
                lambda: s.calls.set_membership(ps_pb2.MembershipRequest(job_id=huge), timeout=10),
                "job_id has 5242880 characters",
            ),
            (
                lambda: s.calls.shm_step(
                    ps_pb2.ShmStepRequest(segment="x", push=ps_pb2.PushHeader(job_id=huge)),
                    timeout=10,
                ),
                "job_id has 5242880 characters",
            ),
            (lambda: push(s.calls, job, "", 1, "s"), "worker_id is empty"),
            (lambda: push(s.calls, job, "a\x00b", 1, "s"), "U+0000"),
            (lambda: push(s.calls, job, "a\nb", 1, "s"), "printable"),
            (lambda: push(s.calls, job, "w", 1, "s\x7f"), "U+007F"),
            (lambda: push(s.calls, job, "w", 1, "s\u0085"), "U+0085"),
            (lambda: push(s.calls, job, "w", (1 << 62) + 1, "s"), "clock 4611686018427387905"),
            (lambda: push(s.calls, job, "w", 1, "s", pulled=1 << 63), "pulled_version"),
            (
                lambda: list(
                    s.calls.pull(
                        ps_pb2.PullRequest(job_id="job", worker_id="w", min_version=1 << 63),
                        timeout=10,
                    )
                ),
                "min_version",
            ),
            (lambda: list(s.calls.pull(ps_pb2.PullRequest(job_id="job"), timeout=10)), "empty"),
            (lambda: status(s.calls, huge), "job_id has 5242880 characters"),
            (
                lambda: s.calls.leave(ps_pb2.LeaveRequest(job_id=huge, worker_id="w"), timeout=10),
                "job_id has 5242880 characters",
            ),
        ]
        for call, says in cases:
            error = refused(call)
            assert error.code() == INVALID, (says, error.code(), error.details()[:200])
            assert says in error.details() and len(error.details()) < 1000, says
        assert version(s) == 0 and status(s.calls).pushes_received == 0
        assert push(s.calls, job, "w w", 1, "s").applied  # a space is printable


def test_job_settings_and_names_outside_their_ranges_are_refused():
    specs = [TensorSpec("w", "float32", (4,))]

    def config(**settings) -> ps_pb2.JobConfig:
        return Job.for_model("j", specs, 1, Settings.build(**settings)).to_proto()

    bad = config(optimizer="sgd")
    bad.optimizer.sgd.dampening = 2.0
    adam = config(optimizer="adam")
    adam.optimizer.adam.eps = 0.0
    adagrad = config(optimizer="adagrad")
    adagrad.optimizer.adagrad.eps = 0.0
    name = config(optimizer="sgd")
    name.tensors[0].name = "w\tx"
    long_name = config(optimizer="sgd")
    long_name.tensors[0].name = "w" * 5000
    digest = config(optimizer="sgd")
    digest.layout_digest = "d" * 100_000
    job_id = config(optimizer="sgd")
    job_id.job_id = "j\x1b[31m"
    for message, says in [
        (bad, "dampening"),
        (adam, "Adam eps must be positive"),
        (adagrad, "Adagrad eps must be positive"),
        (name, r"U\+0009"),
        (long_name, "tensor name has 5000 characters"),
        (digest, "layout_digest has 100000 characters"),
        (job_id, r"U\+001B"),
    ]:
        with pytest.raises(JobError, match=says) as info:
            Job.from_proto(message)
        assert len(str(info.value)) < 1000
    for lr in (float("inf"), float("nan"), 0.0, -1.0):
        message = config(optimizer="sgd")
        message.optimizer.lr = lr
        with pytest.raises(JobError, match="learning rate"):
            Job.from_proto(message)
    with serving(ParameterStore()) as s:  # and through an Init: refused, nothing held
        init = ps_pb2.InitRequest(header=ps_pb2.InitHeader(config=adam))
        error = refused(lambda: s.calls.init(iter([init.SerializeToString()]), timeout=10))
        assert error.code() == INVALID and "eps" in error.details()
        assert not status(s.calls).initialised


def topk_push(job: Job, indices_of) -> list[bytes]:
    """A top-k push: each held part's pieces with the indices ``indices_of(count)`` gives."""
    pieces = []
    for part in job.layout.parts_on(0):
        for indices in indices_of(part.count):
            at = np.asarray(indices, np.uint32)
            values = np.ones(at.size, job.layout.dtypes[part.tensor].raw)
            pieces.append(
                Piece(part.tensor, part.index, 0, values, job.layout.dtypes[part.tensor], at)
            )
    return list(encode_frames(header().SerializeToString(), pieces, 1 << 20))


def test_top_k_indices_named_twice_or_out_of_range_are_refused():
    store, job = new_store("async", compression=Compression(topk_ratio=0.5))
    with serving(store) as s:
        for indices_of, says in [
            (lambda n: [[0, 0]], "index 0 is sent twice"),
            (lambda n: [[1], [0, 1]], "index 1 is sent twice"),
            (lambda n: [[n]], "is past its"),
        ]:
            frames = topk_push(job, indices_of)
            error = refused(lambda frames=frames: s.calls.push(iter(frames), timeout=10))
            assert error.code() == INVALID and says in error.details(), error.details()
        assert version(s) == 0
        assert s.calls.push(iter(topk_push(job, lambda n: [[0], [1]])), timeout=10).applied


# ---------------------------------------------------------------- 4: unparsable bytes


def test_bytes_that_do_not_parse_are_invalid_argument_for_every_method():
    store, _ = new_store("async")
    with serving(store) as s:
        garbage = b"\xff\xff\xff"
        for name, message in [
            ("ShmStep", "ShmStepRequest"),
            ("SetMembership", "MembershipRequest"),
            ("Status", "StatusRequest"),
            ("Leave", "LeaveRequest"),
            ("EndJob", "EndJobRequest"),
        ]:
            call = s.channel.unary_unary(rpc.method(name))
            error = refused(lambda call=call: call(garbage, timeout=10))
            assert error.code() == INVALID, (name, error.code(), error.details())
            assert f"cannot parse {message}" in error.details()
        pull = s.channel.unary_stream(rpc.method("Pull"))
        error = refused(lambda: list(pull(garbage, timeout=10)))
        assert error.code() == INVALID and "cannot parse PullRequest" in error.details()
        assert status(s.calls).initialised  # still serving


# ------------------------------------------------- 5: a big Init leaves the loop free


def test_a_status_is_answered_while_a_big_init_is_worked_out():
    """300,000 parts over 1,024 servers: the layout is worked out off the event loop (it
    took minutes for a million parts, on the loop, and no other call was answered). The
    Init is refused for its wrong layout digest, after the work."""
    specs = [
        ps_pb2.TensorSpec(name=f"t{i}", dtype=ps_pb2.FLOAT32, shape=[3000]) for i in range(100)
    ]
    config = ps_pb2.JobConfig(job_id="big", tensors=specs, num_servers=1024)
    Settings.build(optimizer="sgd", part_bytes=4).to_proto(config)
    config.layout_digest = "0" * 16
    with serving(ParameterStore()) as s:
        init = ps_pb2.InitRequest(header=ps_pb2.InitHeader(config=config)).SerializeToString()
        future = s.calls.init.future(iter([init]), timeout=60)
        answered_during = 0
        while not future.done():
            reply = status(s.calls)  # a deadline of 10 s: the loop must stay free
            answered_during += not future.done()
            assert not reply.initialised
        error = future.exception()
        assert error is not None and error.code() == INVALID
        assert "layout digest" in error.details()
        assert answered_during >= 1


# ------------------------------------------------------ 6: replies within the limit


def test_a_status_reply_stays_within_the_message_limit():
    store, _ = new_store("sync")
    limit = 64 << 10
    wide = "\U0001d538" * (Limits().max_id_chars - 4)  # 4 UTF-8 bytes a character
    with serving(store, max_message_bytes=limit) as s:
        for batch in range(6):
            ids = [f"{batch:02d}{i:02d}{wide}" for i in range(50)]
            s.calls.set_membership(ps_pb2.MembershipRequest(job_id="job", active_workers=ids))
        reply = status(s.calls)
        assert reply.ByteSize() <= limit and reply.config.job_id == "job"
        assert 0 < len(reply.workers) < 300


def test_fit_status_cuts_waiting_histogram_and_workers_to_the_limit():
    from ps_server.requests import fit_status  # here: the module is new, the rest predates it

    _, job = new_store("sync")
    reply = ps_pb2.StatusResponse(initialised=True, config=job.to_proto())
    for i in range(2000):
        reply.workers.add(worker_id=f"w{i:05d}" * 40, clock=i)
        reply.waiting.add(worker_id=f"w{i}", reason="x" * 5000, waiting_for=["a" * 200] * 50)
        reply.staleness_histogram[i * 1000] = i
    total = sum(reply.staleness_histogram.values())
    for limit in (1 << 20, 64 << 10, 8 << 10):
        fitted = ps_pb2.StatusResponse()
        fitted.CopyFrom(reply)
        fitted = fit_status(fitted, limit)
        assert fitted.ByteSize() <= limit, limit
        assert sum(fitted.staleness_histogram.values()) == total  # folded, not lost


def test_a_first_init_builds_the_parameters_off_the_event_loop(monkeypatch):
    """Building a job's parameters takes time in proportion to its size (up to the 64 GiB
    limit): held here until Status has been answered, it must not stop the server."""
    building, release = threading.Event(), threading.Event()
    build = FlatParams.initial

    def held(job, chunks):
        building.set()
        assert release.wait(30)
        return build(job, chunks)

    _, job = new_store("async")
    monkeypatch.setattr(FlatParams, "initial", held)
    with serving(ParameterStore()) as s:
        messages = stream_frames(ps_pb2.InitHeader(config=job.to_proto()), job, initial_values())
        future = s.calls.init.future(iter(messages), timeout=60)
        assert building.wait(30)
        assert not status(s.calls).initialised  # answered while the Init works
        release.set()
        assert future.result().created and status(s.calls).initialised
