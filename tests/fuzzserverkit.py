"""The parameter server's fuzz kit, part two: hostile JobConfig edits for Init, and a
request that gets each status of the README's Errors table (tests/test_fuzz_server.py)."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
from hypothesis import strategies as st

from protos import ps_pb2
from tests.fuzzkit import (
    EXISTS,
    GOOD,
    INVALID,
    MAX_ID,
    FuzzScheduler,
    FuzzServer,
    Held,
    doubles,
    fuzz_job,
    gradient,
    initial,
    outcome,
    stream,
    texts,
    u32,
    u64,
)

Found = tuple[set, set]  # (statuses the edit calls for, statuses it may get)
Mutation = Callable[[ps_pb2.JobConfig, Callable, Held], Found]
EITHER = {INVALID, EXISTS}  # invalid, or a valid job that differs from the held one


def _job_id(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.job_id = draw(texts)
    if not c.job_id or len(c.job_id) > MAX_ID:
        return {INVALID}, set()
    maybe = set() if c.job_id.isprintable() else {INVALID}
    return ({EXISTS} if c.job_id != held.job_id else set()), maybe


def _lr(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.optimizer.lr = draw(doubles)
    lr = c.optimizer.lr
    if not math.isfinite(lr) or lr <= 0:
        return {INVALID}, set()
    return ({EXISTS} if lr != held.job.settings.lr else set()), set()


def _momentum(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.optimizer.sgd.momentum = draw(doubles)
    m = c.optimizer.sgd.momentum
    if not math.isfinite(m) or m < 0:
        return {INVALID}, set()
    return ({EXISTS} if m != 0 else set()), {INVALID}  # momentum >= 1 may be refused


def _mode(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.mode = draw(st.sampled_from([0, 1, 3, 4, 99, 2**31 - 1]))
    return EITHER, set()


def _whole(field: str, values) -> Mutation:
    def edit(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
        old = getattr(c, field)
        setattr(c, field, draw(values))
        if getattr(c, field) == old:
            return set(), set()
        return EITHER, set()  # part_bytes, num_servers, server_index: another layout

    return edit


def _staleness(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.staleness = draw(u32)
    c.backup_workers = draw(u32)  # sync only: an async job may ignore both
    return set(), {INVALID, EXISTS}


def _shape(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    if not c.tensors:
        return {INVALID}, set()
    tensor = c.tensors[draw(st.integers(0, len(c.tensors) - 1))]
    tensor.shape[:] = draw(st.lists(u64, max_size=10))
    if draw(st.booleans()):
        c.layout_digest = ""  # the server then computes the layout itself
    return EITHER, set()


def _tensor(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    if not c.tensors:
        return {INVALID}, set()
    tensor = c.tensors[draw(st.integers(0, len(c.tensors) - 1))]
    how = draw(st.sampled_from(["name", "dtype", "twice", "none"]))
    if how == "name":
        tensor.name = draw(texts.filter(lambda t: t not in {s.name for s in c.tensors}))
    elif how == "dtype":
        tensor.dtype = draw(st.sampled_from([0, 5, 99, 2**31 - 1]))
        return {INVALID}, set()
    elif how == "twice":
        c.tensors.append(tensor)
        return {INVALID}, set()
    else:
        del c.tensors[:]
        return {INVALID}, set()
    return EITHER, set()


def _workers(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.workers[:] = draw(st.lists(texts, min_size=1, max_size=5))
    if any(not w or len(w) > MAX_ID for w in c.workers):
        return {INVALID}, set()
    # The held job names no workers: initial workers then do not conflict (Job.differences).
    return set(), {INVALID}  # (unprintable or repeated ids may be refused)


def _compression(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.compression.topk_ratio = draw(doubles | st.sampled_from([0.5, 1.0, -0.5]))
    c.compression.gradient_dtype = draw(st.sampled_from([0, 0, 1, 2, 5, 99]))
    ratio, dtype = c.compression.topk_ratio, c.compression.gradient_dtype
    if not (math.isfinite(ratio) and 0 <= ratio < 1) or dtype > 4:
        return {INVALID}, set()
    return ({EXISTS} if ratio or dtype else set()), set()


def _schedule(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.optimizer.schedule.kind = draw(st.sampled_from([0, 1, 9]))
    c.optimizer.schedule.total_steps = draw(u64)
    c.optimizer.schedule.final_ratio = draw(doubles)
    if c.optimizer.schedule.kind == 9:
        return {INVALID}, set()
    return set(), {INVALID, EXISTS}


def _digest(c: ps_pb2.JobConfig, draw, held: Held) -> Found:
    c.layout_digest = draw(texts)
    return ({INVALID} if c.layout_digest else set()), set()


def init_mutations() -> list[Mutation]:
    """Edits of a held job's JobConfig, each saying what status it calls for."""
    return [_job_id, _lr, _momentum, _mode, _staleness, _shape, _tensor, _workers,
            _compression, _schedule, _digest,
            _whole("part_bytes", u64), _whole("num_servers", u32),
            _whole("server_index", u32)]  # fmt: skip


# ------------------------------------------------------ one status per README row


def produce(status: str, server: FuzzServer, tmp: Path) -> grpc.StatusCode:
    """Send a request that the README says gets ``status``; the status it got."""
    held = server.held or server.hold(fuzz_job("fz-row"))
    calls = server.calls
    if status == "INVALID_ARGUMENT":  # NaN in a gradient
        header = ps_pb2.PushHeader(job_id=held.job_id, worker_id="w-nan", clock=1)
        chunks = gradient(held.job, math.nan)
        return outcome(lambda: calls.push(iter(stream("push", header, chunks)), timeout=10))[0]
    if status == "UNAUTHENTICATED":
        guarded = FuzzServer(str(tmp), token="fuzz-secret")
        try:
            return outcome(lambda: guarded.status())[0]
        finally:
            guarded.close()
    if status == "FAILED_PRECONDITION":  # another live client's worker id
        header = ps_pb2.PushHeader(job_id=held.job_id, worker_id=GOOD, clock=10**6, session="x")
        chunks = gradient(held.job)
        return outcome(lambda: calls.push(iter(stream("push", header, chunks)), timeout=10))[0]
    if status == "ALREADY_EXISTS":
        config = held.job.to_proto()
        config.optimizer.lr *= 2
        messages = stream("init", ps_pb2.InitHeader(config=config), initial(held.job))
        return outcome(lambda: calls.init(iter(messages), timeout=10))[0]
    if status == "NOT_FOUND":
        return outcome(lambda: calls.status(ps_pb2.StatusRequest(job_id="nope"), timeout=10))[0]
    if status == "RESOURCE_EXHAUSTED":  # one byte over the server's 64 MiB
        big = ps_pb2.StatusRequest(job_id="x" * (64 << 20)).SerializeToString()
        with grpc.insecure_channel(server.address) as unlimited:
            call = unlimited.unary_unary(server.method("Status"))
            return outcome(lambda: call(big, timeout=30))[0]
    if status == "DEADLINE_EXCEEDED":
        return _timed_out_pull(server)
    if status == "UNAVAILABLE":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # free once closed: nothing listens there
        with grpc.insecure_channel(f"127.0.0.1:{port}") as nowhere:
            status_call = nowhere.unary_unary(server.method("Status"))
            return outcome(lambda: status_call(b"", timeout=10))[0]
    if status == "UNKNOWN":  # bytes that do not parse as the scheduler's request
        scheduler = FuzzScheduler()
        try:
            lease = scheduler.channel.unary_unary("/ps.Scheduler/Lease")
            return outcome(lambda: lease(b"\xff\xff\xff", timeout=10))[0]
        finally:
            scheduler.close()
    raise AssertionError(f"no request produces the README's status {status}")


def _timed_out_pull(server: FuzzServer) -> grpc.StatusCode:
    """A sync job of two workers; one pulls the next step, which never comes."""
    if server.held is not None:
        server.calls.end_job(ps_pb2.EndJobRequest(job_id=server.held.job_id), timeout=10)
        server.held = None
    job = fuzz_job("fz-sync", mode="sync", workers=(GOOD, "other"))
    messages = stream("init", ps_pb2.InitHeader(config=job.to_proto()), initial(job))
    server.calls.init(iter(messages), timeout=10)
    pull = ps_pb2.PullRequest(job_id=job.job_id, worker_id=GOOD, min_version=1, session="s")
    code, error = outcome(lambda: list(server.calls.pull(pull, timeout=1.5)))
    server.calls.end_job(ps_pb2.EndJobRequest(job_id=job.job_id), timeout=10)
    assert isinstance(error, grpc.RpcError) and "timed out" in (error.details() or ""), error
    return code
