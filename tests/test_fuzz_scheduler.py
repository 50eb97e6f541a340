"""Property-based fuzzing of every Scheduler method on one in-process scheduler.

Each example sends one hostile request: ids empty, huge, unprintable, of workers that
left or were never registered; numbers at 0, 2^63 and 2^64 - 1, NaN and infinite; tasks
and leases of other workers, epochs and shards out of range; or bytes that do not parse.
The status must be the one the input calls for (never INTERNAL, and UNKNOWN only for
bytes that do not parse, as the README documents); a refused call changes no row of the
scheduler's state; and a valid lease and completion still work afterwards.
"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos import scheduler_pb2 as pb
from tests.fuzzkit import (
    FAILED,
    INVALID,
    NOT_FOUND,
    OK,
    FuzzScheduler,
    brief,
    doubles,
    fuzz,
    garbage,
    judge,
    outcome,
    texts,
    too_long,
    u32,
    u64,
)

pytestmark = pytest.mark.timeout(120)
EPOCHS, SHARDS = 1000, 4
MAX_WHOLE = 2**63 - 1  # what SQLite's INTEGER holds


class Sched:
    """The scheduler, its healthy worker ``w`` and the workers the fuzz registered."""

    def __init__(self) -> None:
        self.s = FuzzScheduler(EPOCHS, SHARDS)
        self.stub = self.s.stub
        self.w = self.stub.Register(pb.RegisterRequest(host="h", device="cpu")).worker_id
        self.others = [self.stub.Register(pb.RegisterRequest(host="o")).worker_id for _ in "ab"]
        self.stub.Leave(pb.WorkerLeaveRequest(worker_id=self.others[1]))
        self.healthy()

    def healthy(self) -> None:
        """The healthy worker leases its next shard and completes it (first reporting an
        evaluation it is given)."""
        lease = self.stub.Lease(pb.LeaseRequest(worker_id=self.w), timeout=10)
        if lease.has_evaluation:
            report = pb.EvaluationRequest(
                worker_id=self.w, epoch=lease.evaluate_epoch, loss=0.5, accuracy=0.5
            )
            self.stub.ReportEvaluation(report, timeout=10)
        assert lease.has_task, lease
        done = pb.CompleteRequest(worker_id=self.w, task=lease.task, clock_end=1, samples=1)
        assert self.stub.Complete(done, timeout=10).recorded

    def attempt(self, call, refuse, maybe=frozenset(), what="", read_only=False):
        before = self.s.tables()
        code, reply = outcome(call)
        judge(code, reply, refuse, maybe, what)
        if code != OK or read_only:
            assert self.s.tables() == before, f"{what}: {code.name} but the state changed"
        self.healthy()
        return code, reply


@pytest.fixture(scope="module")
def sched():
    s = Sched()
    yield s
    s.s.close()


def workers(s: Sched) -> st.SearchStrategy[str]:
    return st.sampled_from([s.w, *s.others, "ghost"]) | texts


def worker_refuse(s: Sched, worker_id: str) -> tuple[set, set]:
    """What a request naming this worker calls for."""
    refuse, maybe = set(), set()
    if not worker_id or too_long(worker_id):
        refuse.add(INVALID)
    if not worker_id.isprintable():
        maybe.add(INVALID)
    if worker_id == s.others[1]:
        refuse.add(FAILED)  # it left
    elif worker_id not in (s.w, s.others[0]):
        refuse.add(NOT_FOUND)
    return refuse, maybe


def lease_ids(s: Sched) -> st.SearchStrategy[list[str]]:
    return st.lists(texts | st.just("0" * 12), max_size=4)


@fuzz(40)
@given(host=texts, device=texts)
def test_register(sched, host, device):
    refuse = {INVALID} if too_long(host, device) else set()
    maybe = set() if (host + device).isprintable() else {INVALID}
    request = pb.RegisterRequest(host=host, device=device)
    sched.attempt(lambda: sched.stub.Register(request, timeout=10), refuse, maybe,
                  f"register {brief(request)}")  # fmt: skip


@fuzz(60)
@given(data=st.data())
def test_heartbeat(sched, data):
    s = sched
    r = pb.HeartbeatRequest(
        worker_id=data.draw(workers(s)),
        clock=data.draw(u64),
        samples_per_s=data.draw(doubles),
        lease_ids=data.draw(lease_ids(s)),
    )
    refuse, maybe = worker_refuse(s, r.worker_id)
    if r.clock > MAX_WHOLE or math.isnan(r.samples_per_s) or r.samples_per_s < 0:
        refuse.add(INVALID)
    if math.isinf(r.samples_per_s) or r.lease_ids:
        maybe |= {INVALID, FAILED}
    s.attempt(lambda: s.stub.Heartbeat(r, timeout=10), refuse, maybe, f"heartbeat {brief(r)}")


@fuzz(50)
@given(data=st.data())
def test_lease(sched, data):
    s = sched
    r = pb.LeaseRequest(worker_id=data.draw(workers(s)), lease_ids=data.draw(lease_ids(s)))
    refuse, maybe = worker_refuse(s, r.worker_id)
    if r.lease_ids:
        maybe |= {INVALID, FAILED}
    s.attempt(lambda: s.stub.Lease(r, timeout=10), refuse, maybe, f"lease {brief(r)}")


@fuzz(80)
@given(data=st.data())
def test_complete(sched, data):
    """Completions by the lease's holder with hostile numbers, and completions of tasks
    the sender does not hold (another's lease, a shard never leased, out of range)."""
    s = sched
    held = s.stub.Lease(pb.LeaseRequest(worker_id=s.w), timeout=10)
    assert held.has_task, held
    if held.has_evaluation:
        report = pb.EvaluationRequest(worker_id=s.w, epoch=held.evaluate_epoch, accuracy=0.5)
        s.stub.ReportEvaluation(report, timeout=10)
    worker = data.draw(st.just(s.w) | workers(s))
    task = data.draw(st.sampled_from(["held", "other"]))
    if task == "held":
        t = held.task
    else:
        t = pb.Task(
            epoch=data.draw(st.sampled_from([0, held.task.epoch, EPOCHS]) | u32),
            shard=data.draw(st.sampled_from([0, 1, SHARDS]) | u32),
            lease_id=data.draw(texts | st.just(held.task.lease_id)),
        )
    r = pb.CompleteRequest(
        worker_id=worker,
        task=t,
        clock_start=data.draw(st.just(0) | u64),
        clock_end=data.draw(st.just(5) | u64),
        versions=[
            pb.ServerVersions(version=v)
            for v in data.draw(st.lists(st.lists(u64, max_size=3), max_size=3))
        ],
        samples=data.draw(st.just(10) | u64),
    )
    refuse, maybe = worker_refuse(s, worker)
    numbers = [r.clock_start, r.clock_end, r.samples, *(v for x in r.versions for v in x.version)]
    if max(numbers) > MAX_WHOLE or r.clock_end < r.clock_start or not t.lease_id:
        refuse.add(INVALID)
    if too_long(t.lease_id) or not t.lease_id.isprintable():
        maybe.add(INVALID)
    mine = (held.task.epoch, held.task.shard, held.task.lease_id)
    holder = worker == s.w and (t.epoch, t.shard, t.lease_id) == mine
    if not holder:
        refuse.add(FAILED)  # not this worker's lease (or no such task)
        maybe |= {INVALID, NOT_FOUND}
    code, reply = s.attempt(lambda: s.stub.Complete(r, timeout=10), refuse, maybe,
                            f"complete {brief(r)}")  # fmt: skip
    if code == OK:
        assert reply.recorded, "the holder's first completion is recorded"


@fuzz(60)
@given(data=st.data())
def test_report_evaluation(sched, data):
    s = sched
    r = pb.EvaluationRequest(worker_id=data.draw(workers(s)),
                             epoch=data.draw(st.sampled_from([0, EPOCHS]) | u32),
                             loss=data.draw(doubles), accuracy=data.draw(doubles))  # fmt: skip
    refuse, maybe = worker_refuse(s, r.worker_id)
    if r.epoch >= EPOCHS or not 0.0 <= r.accuracy <= 1.0:  # NaN included
        refuse |= {FAILED, INVALID}
    if not math.isfinite(r.loss) or r.loss < 0:
        maybe.add(INVALID)
    maybe.add(FAILED)  # an epoch not finished, or not assigned to this worker
    s.attempt(lambda: s.stub.ReportEvaluation(r, timeout=10), refuse, maybe,
              f"evaluation {brief(r)}")  # fmt: skip


@fuzz(40)
@given(data=st.data())
def test_leave(sched, data):
    s = sched
    worker = data.draw(workers(s).filter(lambda w: w != s.w))  # the healthy one stays
    refuse, maybe = worker_refuse(s, worker)
    refuse.discard(FAILED)  # leaving twice changes nothing
    maybe.add(FAILED)
    if worker == s.others[0]:  # it leaves for good: a new one takes its place
        s.others[0] = s.stub.Register(pb.RegisterRequest(host="o"), timeout=10).worker_id
        refuse, maybe = set(), {FAILED}
    r = pb.WorkerLeaveRequest(worker_id=worker)
    s.attempt(lambda: s.stub.Leave(r, timeout=10), refuse, maybe, f"leave {brief(r)}")


METHODS = {
    "Register": pb.RegisterRequest,
    "Heartbeat": pb.HeartbeatRequest,
    "Lease": pb.LeaseRequest,
    "Complete": pb.CompleteRequest,
    "ReportEvaluation": pb.EvaluationRequest,
    "Leave": pb.WorkerLeaveRequest,
    "Progress": pb.ProgressRequest,
}


@pytest.mark.parametrize("name", sorted(METHODS))
@fuzz(20)
@given(data=st.data())
def test_random_bytes(sched, name, data):
    """Bytes that are no request: INVALID_ARGUMENT (or UNKNOWN, which the README
    documents for the scheduler), and nothing changes."""
    raw = data.draw(garbage(METHODS[name]))
    call = sched.s.channel.unary_unary(f"/ps.Scheduler/{name}")
    sched.attempt(lambda: call(raw, timeout=10), {INVALID, grpc.StatusCode.UNKNOWN},
                  what=f"{name} {raw!r}")  # fmt: skip


def test_progress_changes_nothing(sched):
    sched.attempt(lambda: sched.stub.Progress(pb.ProgressRequest(), timeout=10), set(),
                  what="progress", read_only=True)  # fmt: skip
