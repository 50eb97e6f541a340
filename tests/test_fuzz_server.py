"""Property-based fuzzing of every ParameterServer method on one in-process server.

Each example sends one hostile request: well-formed but hostile (ids empty, huge, with
control characters or of other jobs and workers; clocks and versions far ahead; NaN and
infinite numbers) or malformed (random bytes, truncated messages, broken tensor data and
streams). The status must be one the README documents for what the input gets wrong
(never UNKNOWN or INTERNAL); a refused call changes nothing (Status and the weights are
as before); and the server then still applies a valid push and serves a pull.
"""

from __future__ import annotations

import itertools
import math

import grpc
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from protos import ps_pb2
from protos.codec import CodecError, decode_frame
from protos.shm import Segment, segment_slots
from tests.fuzzkit import (
    FAILED,
    GOOD,
    INVALID,
    NOT_FOUND,
    OK,
    STREAM_FLAWS,
    FuzzServer,
    Held,
    brief,
    corrupt,
    corrupt_stream,
    documented_statuses,
    flaws,
    fuzz,
    fuzz_job,
    garbage,
    gradient,
    initial,
    judge,
    outcome,
    parses,
    stream,
    texts,
    too_long,
    u64,
)
from tests.fuzzserverkit import init_mutations, produce

pytestmark = pytest.mark.timeout(120)
_jobs = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FuzzServer(str(tmp_path_factory.mktemp("shm")))
    yield s
    s.close()


def hold(server: FuzzServer, topk: bool) -> Held:
    """The server holds a fresh async job (dense or top-k) of its own unique id."""
    held = server.held
    if held is None or bool(held.job.settings.compression.topk_ratio) != topk:
        held = server.hold(fuzz_job(f"fz-{next(_jobs)}", topk=0.25 if topk else 0.0))
    return held


def attempt(server: FuzzServer, call, refuse, maybe=frozenset(), what="", after=None):
    """Send one hostile call: judge its status, check a refusal changed nothing, then
    (after ``after``, which undoes what an accepted call may) check the server is healthy."""
    before = server.snapshot()
    status = server.status()
    code, reply = outcome(call)
    judge(code, reply, refuse, maybe, what)
    if code != OK:
        assert server.snapshot() == before, f"{what}: refused ({code.name}) but state changed"
    elif after is not None:
        after(status)
    server.healthy()
    return code, reply


def seen(status: ps_pb2.StatusResponse) -> set[str]:
    return {w.worker_id for w in status.workers}


def ids_refuse(held: Held, job_id: str, *ids: str) -> tuple[set, set]:
    """What ids call for: too long, another job, control characters (may be refused)."""
    refuse, maybe = set(), set()
    if too_long(job_id, *ids):
        refuse.add(INVALID)
    if job_id != held.job_id:
        refuse |= {NOT_FOUND} | ({INVALID} if not job_id else set())
    if not all(text.isprintable() for text in (job_id, *ids)):
        maybe.add(INVALID)  # control characters, unassigned code points
    return refuse, maybe


def push_refuse(h: ps_pb2.PushHeader, held: Held, status) -> tuple[set, set]:
    refuse, maybe = ids_refuse(held, h.job_id, h.worker_id, h.session)
    if not h.worker_id or h.clock == 0 or h.pulled_version > status.version:
        refuse.add(INVALID)
    if h.clock > max((w.clock for w in status.workers), default=0) + 1:
        maybe.add(INVALID)  # a clock far ahead may be refused as a bad clock
    if h.worker_id == GOOD:  # another live client's worker id
        refuse.add(FAILED)
    elif h.worker_id in seen(status):  # its own client's, one that left, one removed
        maybe.add(FAILED)
    return refuse, maybe


def pull_refuse(r: ps_pb2.PullRequest, held: Held, status) -> tuple[set, set]:
    refuse, maybe = ids_refuse(held, r.job_id, r.worker_id, r.session)
    if r.min_version > status.version or r.clock >= 2**63:
        maybe.add(INVALID)  # async ignores both; a bad clock or version may be refused
    if not r.observe:
        if not r.worker_id:
            refuse.add(INVALID)
        if r.worker_id == GOOD:
            refuse.add(FAILED)
        elif r.worker_id in seen(status):
            maybe.add(FAILED)
    return refuse, maybe


def job_ids(held: Held) -> st.SearchStrategy[str]:
    return st.just(held.job_id) | st.just(held.job_id) | texts


WORKERS = (GOOD, "w-a", "w-b", "w-new")  # a fixed pool: the strategies' shape never
# depends on the server's state (hypothesis replays an example against a changed server)


def worker_ids(status) -> st.SearchStrategy[str]:
    return st.sampled_from(WORKERS) | texts


def version(status, choice: int | None, value: int) -> int:
    """0, the current version, one ahead, or any uint64 (``choice`` None)."""
    return value if choice is None else (0, status.version, status.version + 1)[choice]


versions = st.tuples(st.none() | st.integers(0, 2), u64)


def sessions(held: Held) -> st.SearchStrategy[str]:
    return texts.filter(lambda s: s != held.session)


def push_header(draw, held: Held, status) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(
        job_id=draw(job_ids(held)),
        worker_id=draw(worker_ids(status)),
        clock=draw(u64),
        pulled_version=version(status, *draw(versions)),
        session=draw(sessions(held)),
    )


def pull_request(draw, held: Held, status) -> ps_pb2.PullRequest:
    return ps_pb2.PullRequest(
        job_id=draw(job_ids(held)),
        worker_id=draw(worker_ids(status)),
        clock=draw(u64),
        min_version=version(status, *draw(versions)),
        observe=draw(st.booleans()),
        session=draw(sessions(held)),
    )


def gradient_chunks(draw, held: Held) -> tuple[list, set]:
    """A gradient of the held job, valid (any finite values) or with one flaw."""
    chunks = gradient(held.job, draw(st.sampled_from([0.0, -1e-3, 3e38])))
    flaw = draw(st.none() | st.sampled_from(flaws(held.job)))
    if flaw is None:
        return chunks, set()
    return corrupt(flaw, chunks, draw, held.job), {INVALID}


# ------------------------------------------------------------------ the methods


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@fuzz(90)
@given(data=st.data())
def test_push(server, topk, data):
    held = hold(server, topk)
    status = server.status()
    header = push_header(data.draw, held, status)
    refuse, maybe = push_refuse(header, held, status)
    chunks, bad = gradient_chunks(data.draw, held)
    messages = stream("push", header, chunks)
    if data.draw(st.booleans()):
        flaw = data.draw(st.sampled_from(STREAM_FLAWS))
        messages = corrupt_stream(flaw, messages, data.draw, ps_pb2.PushRequest)
        bad = {INVALID}
    attempt(server, lambda: server.calls.push(iter(messages), timeout=10), refuse | bad, maybe,
            f"push {brief(header)} flawed={bool(bad)}")  # fmt: skip


@fuzz(80)
@given(data=st.data())
def test_pull(server, data):
    held = hold(server, False)
    status = server.status()
    request = pull_request(data.draw, held, status)
    refuse, maybe = pull_refuse(request, held, status)
    attempt(server, lambda: list(server.calls.pull(request, timeout=10)), refuse, maybe,
            f"pull {brief(request)}")  # fmt: skip


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@fuzz(90)
@given(data=st.data())
def test_step(server, topk, data):
    """A push and a pull in one message: refused whole when either part is refused (a
    push must not be applied for a pull that is then refused)."""
    held = hold(server, topk)
    status = server.status()
    push, pull = push_header(data.draw, held, status), pull_request(data.draw, held, status)
    valid_push = data.draw(st.booleans())  # often a valid push, so the pull's defects show
    if valid_push:
        push = ps_pb2.PushHeader(job_id=held.job_id, worker_id=f"w-{data.draw(u64)}", clock=1,
                                 session=data.draw(sessions(held)))  # fmt: skip
    if data.draw(st.booleans()):  # mostly a valid pull, so the push's defects show
        observe = data.draw(st.booleans())
        pull = ps_pb2.PullRequest(
            job_id=push.job_id, worker_id=push.worker_id, session=push.session, observe=observe
        )
    refuse, maybe = push_refuse(push, held, status)
    pull_refused, pull_maybe = pull_refuse(pull, held, status)
    refuse |= pull_refused
    maybe |= pull_maybe
    if not pull.observe and pull.worker_id == push.worker_id and pull.session != push.session:
        maybe.add(FAILED)  # the push's client holds the id the pull names
    chunks, bad = (gradient(held.job), set()) if valid_push else gradient_chunks(data.draw, held)
    message = ps_pb2.StepRequest(header=ps_pb2.StepHeader(push=push, pull=pull), chunks=chunks)
    raw = message.SerializeToString()
    form = data.draw(st.sampled_from(["whole", "no_header", "truncated", "header_twice"]))
    if form == "no_header":
        raw, bad = ps_pb2.StepRequest(chunks=chunks).SerializeToString(), {INVALID}
    elif form == "truncated":
        raw, bad = raw[: data.draw(st.integers(0, len(raw) - 1))], {INVALID}
    elif form == "header_twice":  # valid protobuf (fields merge): accepted or refused
        raw = ps_pb2.StepRequest(header=message.header).SerializeToString() + raw
    step = server.channel.unary_unary(server.method("Step"))
    attempt(server, lambda: step(raw, timeout=10), refuse | bad, maybe,
            f"step {form} push={brief(push)} pull={brief(pull)} flawed={bool(bad)}")  # fmt: skip


def segments(server: FuzzServer, size: int) -> tuple[Segment, Segment]:
    """A client's segment for the held job's parts, and one too small (made once)."""
    made = getattr(server, "segments_made", None)
    if made is None or made[0].size != size:
        made = server.segments_made = (Segment.create(server.shm_dir, size),
                                       Segment.create(server.shm_dir, 8))  # fmt: skip
    return made


@fuzz(80)
@given(data=st.data())
def test_shm_step(server, data):
    held = hold(server, False)
    status = server.status()
    slots, size = segment_slots(held.job.layout, 0)
    segment, small = segments(server, size)
    segment.buffer[:] = bytes(segment.size)  # the client's gradient: zeros
    refuse, maybe = set(), set()
    which = data.draw(st.sampled_from(["good", "nan", "small", "name"]))
    name = {"good": segment.name, "nan": segment.name, "small": small.name}.get(which)
    if name is None:
        name = data.draw(texts | st.sampled_from(["../x", "gradstore-nothere", "."]))
        refuse.add(INVALID)
    elif which == "small":
        refuse.add(INVALID)
    has_push, has_pull = data.draw(st.booleans()), data.draw(st.booleans())
    request = ps_pb2.ShmStepRequest(segment=name)
    if has_push:
        request.push.CopyFrom(push_header(data.draw, held, status))
        r, m = push_refuse(request.push, held, status)
        refuse, maybe = refuse | r, maybe | m
        if which == "nan":
            slot = data.draw(st.sampled_from(slots))
            dtype = held.job.layout.dtypes[slot.part.tensor].raw
            np.frombuffer(segment.buffer, dtype, 1, slot.offset)[0] = math.nan
            refuse.add(INVALID)
    if has_pull:
        request.pull.CopyFrom(pull_request(data.draw, held, status))
        r, m = pull_refuse(request.pull, held, status)
        refuse, maybe = refuse | r, maybe | m
    if not has_push and not has_pull:
        refuse.add(INVALID)
    if has_push and has_pull and request.pull.worker_id == request.push.worker_id:
        maybe.add(FAILED)
    attempt(server, lambda: server.calls.shm_step(request, timeout=10), refuse, maybe,
            f"shm step {which} {brief(request)}")  # fmt: skip


@fuzz(80)
@given(data=st.data())
def test_set_membership(server, data):
    held = hold(server, False)
    status = server.status()
    job_id = data.draw(job_ids(held))
    workers = data.draw(st.lists(worker_ids(status) | st.just(GOOD), max_size=6))
    refuse, maybe = ids_refuse(held, job_id, *workers)
    if any(not w for w in workers):
        refuse.add(INVALID)
    if len(set(workers)) < len(workers):
        maybe.add(INVALID)
    request = ps_pb2.MembershipRequest(job_id=job_id, active_workers=workers)

    def restore(before: ps_pb2.StatusResponse) -> None:  # the membership as it was
        active = [w.worker_id for w in before.workers if w.active]
        again = ps_pb2.MembershipRequest(job_id=held.job_id, active_workers=active)
        server.calls.set_membership(again, timeout=10)

    attempt(server, lambda: server.calls.set_membership(request, timeout=10), refuse, maybe,
            f"membership {brief(request)}", after=restore)  # fmt: skip


@fuzz(60)
@given(job_id=texts | st.just(""))
def test_status(server, job_id):
    held = hold(server, False)
    refuse, maybe = ids_refuse(held, job_id)
    if not job_id:
        refuse = set()  # empty: whatever job the server holds
    before = server.snapshot()
    attempt(server, lambda: server.calls.status(ps_pb2.StatusRequest(job_id=job_id), timeout=10),
            refuse, maybe, f"status {brief(job_id)}")  # fmt: skip
    after = server.snapshot()
    assert ps_pb2.StatusResponse.FromString(after[0]).version == (
        ps_pb2.StatusResponse.FromString(before[0]).version + 1  # the healthy push only
    )


@fuzz(80)
@given(data=st.data())
def test_leave(server, data):
    held = hold(server, False)
    status = server.status()
    r = ps_pb2.LeaveRequest(job_id=data.draw(job_ids(held)),
                            worker_id=data.draw(worker_ids(status) | st.just(GOOD)),
                            session=data.draw(sessions(held)))  # fmt: skip
    refuse, maybe = ids_refuse(held, r.job_id, r.worker_id, r.session)
    if not r.worker_id:
        refuse.add(INVALID)
    if r.worker_id == GOOD:
        refuse.add(FAILED)
    elif r.worker_id in seen(status):
        maybe.add(FAILED)
    attempt(server, lambda: server.calls.leave(r, timeout=10), refuse, maybe,
            f"leave {brief(r)}")  # fmt: skip


@fuzz(50)
@given(data=st.data())
def test_end_job_of_another_job(server, data):
    held = hold(server, False)
    job_id = data.draw(texts.filter(lambda j: j != held.job_id))
    refuse, maybe = ids_refuse(held, job_id)
    attempt(server, lambda: server.calls.end_job(ps_pb2.EndJobRequest(job_id=job_id), timeout=10),
            refuse, maybe, f"end job {brief(job_id)}")  # fmt: skip


@fuzz(120)
@given(data=st.data())
def test_init_over_a_held_job(server, data):
    """A hostile JobConfig for a server that holds a job: INVALID_ARGUMENT when it is
    invalid, ALREADY_EXISTS when it differs, accepted (created=False) when identical."""
    held = hold(server, False)
    config = held.job.to_proto()
    refuse, maybe = set(), set()
    for mutate in data.draw(st.lists(st.sampled_from(init_mutations()), max_size=3)):
        r, m = mutate(config, data.draw, held)
        refuse, maybe = refuse | r, maybe | m
    header = ps_pb2.InitHeader(config=config)
    messages = stream("init", header, initial(held.job))
    code, reply = attempt(server, lambda: server.calls.init(iter(messages), timeout=10),
                          refuse, maybe, f"init {brief(config)}")  # fmt: skip
    if code == OK:
        assert not reply.created, "a second job was created over the held one"


@fuzz(50)
@given(data=st.data())
def test_init_with_broken_values_leaves_the_server_uninitialised(server, data):
    held = hold(server, False)
    server.calls.end_job(ps_pb2.EndJobRequest(job_id=held.job_id), timeout=10)
    server.held = None
    job = fuzz_job(f"fz-{next(_jobs)}")
    chunks = initial(job)
    header = ps_pb2.InitHeader(config=job.to_proto())
    if data.draw(st.booleans()):
        flaw = data.draw(st.sampled_from([f for f in flaws(job) if f != "nonfinite"]))
        messages = stream("init", header, corrupt(flaw, chunks, data.draw, job))
    else:
        flaw = data.draw(st.sampled_from([f for f in STREAM_FLAWS if f != "garbage"]))
        messages = corrupt_stream(flaw, stream("init", header, chunks), data.draw,
                                  ps_pb2.InitRequest)  # fmt: skip
    code, reply = outcome(lambda: server.calls.init(iter(messages), timeout=10))
    judge(code, reply, {INVALID}, what=f"init with {flaw}")
    assert not server.status().initialised, f"init with {flaw}: the server holds a job"
    server.hold(job)


METHODS = {  # method: (request type, how it is called)
    "Init": (ps_pb2.InitHeader, "stream"),
    "Push": (ps_pb2.PushHeader, "stream"),
    "Step": (ps_pb2.StepHeader, "unary"),
    "Pull": (ps_pb2.PullRequest, "server_stream"),
    "ShmStep": (ps_pb2.ShmStepRequest, "unary"),
    "SetMembership": (ps_pb2.MembershipRequest, "unary"),
    "Status": (ps_pb2.StatusRequest, "unary"),
    "Leave": (ps_pb2.LeaveRequest, "unary"),
    "EndJob": (ps_pb2.EndJobRequest, "unary"),
}
FRAMED = {"Init", "Push", "Step"}  # raw frames: the header type is what must parse


def malformed(name: str, data: bytes) -> bool:
    """Whether bytes are no valid request of the method (frames: no parsable header)."""
    header_type = METHODS[name][0]
    if name not in FRAMED:
        return not parses(header_type, data)
    try:
        frame = decode_frame(data)
    except CodecError:
        return True
    if frame.header is None:
        return True
    return not parses(header_type, bytes(frame.header))


@pytest.mark.parametrize("name", sorted(METHODS))
@fuzz(25)
@given(data=st.data())
def test_random_bytes(server, name, data):
    """Bytes that are no valid request, random or a truncated valid one: INVALID_ARGUMENT."""
    held = hold(server, False)
    header_type, kind = METHODS[name]
    valid = ps_pb2.PushRequest(header=ps_pb2.PushHeader(job_id=held.job_id, worker_id="w"),
                               chunks=gradient(held.job)).SerializeToString()  # fmt: skip
    cut = st.integers(1, len(valid) - 1).map(lambda n: valid[:n])
    raw = data.draw(garbage(header_type) | cut)
    assume(malformed(name, raw))
    path = server.method(name)
    if kind == "stream":
        call = lambda: server.channel.stream_unary(path)(iter([raw]), timeout=10)  # noqa: E731
    elif kind == "server_stream":
        call = lambda: list(server.channel.unary_stream(path)(raw, timeout=10))  # noqa: E731
    else:
        call = lambda: server.channel.unary_unary(path)(raw, timeout=10)  # noqa: E731
    attempt(server, call, {INVALID}, what=f"{name} {raw!r}"[:300])


def test_huge_repeated_fields(server):
    """60,000 chunks (each part 10,000 times) are refused; a membership of 20,000 workers
    is taken or refused whole (a server may limit a job's workers), and the server stays
    healthy."""
    held = hold(server, False)
    chunks = gradient(held.job) * 10_000
    header = ps_pb2.PushHeader(job_id=held.job_id, worker_id="w-many", clock=1, session="s")
    attempt(server, lambda: server.calls.push(iter(stream("push", header, chunks)), timeout=30),
            {INVALID}, what="push of 60,000 chunks")  # fmt: skip
    many = [f"w{i:05d}" + "x" * 200 for i in range(20_000)]
    request = ps_pb2.MembershipRequest(job_id=held.job_id, active_workers=[GOOD, *many])
    code, _ = attempt(server, lambda: server.calls.set_membership(request, timeout=30), set(),
                      {grpc.StatusCode.RESOURCE_EXHAUSTED, INVALID}, "20,001 members")  # fmt: skip
    if code == OK:
        server.hold(fuzz_job(f"fz-{next(_jobs)}"))  # a fresh job: Status is small again


@pytest.mark.parametrize("status", documented_statuses())
def test_every_documented_status_is_produced(server, status, tmp_path):
    """Every row of the README's Errors table: a request that gets that status."""
    got = produce(status, server, tmp_path)
    assert got == getattr(grpc.StatusCode, status), (status, got)
