"""A scheduler killed and restarted on its state file finishes the job: a lease stays tied
to work in progress, so none is held forever by a live worker that is not working on it.

The trap: a Lease whose write was durable but whose reply died with the scheduler left
the shard leased to a live worker that never knew; its heartbeats kept the lease alive,
it sat idle ("every remaining shard is leased") and the job never finished.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc
from protos.jobspec import JobSpec
from ps_worker.data import prepare
from scheduler.cluster import LocalCluster
from scheduler.state import Completion, SchedulerState

SHARDS = 2
SPEC = JobSpec(data_dir="d", epochs=1, lease_timeout_s=10.0)


def finish(state: SchedulerState, worker: str, task, now: float) -> bool:
    c = Completion(task.epoch, task.shard, worker, task.lease_id, 0, 1, [[1]], 10)
    return state.complete(c, now)


def killed_after_a_lost_lease_reply(path: Path) -> tuple[SchedulerState, str, str, object]:
    """Worker a finished one shard; b was leased the last one, but the reply was lost in
    the kill. Returns the state restarted on its file, a, b and b's unseen task."""
    state = SchedulerState(str(path))
    state.create_or_resume(SPEC, SHARDS)
    a, b = state.register("h", "cpu", 0.0), state.register("h", "cpu", 0.0)
    assert finish(state, a, state.lease(a, 1.0, held=()).task, 2.0)
    lost = state.lease(b, 2.0, held=()).task  # durable, but b never hears of it
    state.close()  # SIGKILL
    resumed = SchedulerState(str(path))
    assert not resumed.create_or_resume(SPEC, SHARDS)
    resumed.resume_grace(100.0)
    return resumed, a, b, lost


def test_a_lease_whose_reply_was_lost_goes_back_when_its_worker_asks_for_work(tmp_path):
    state, a, b, lost = killed_after_a_lost_lease_reply(tmp_path / "job.db")
    # b retried its Lease on the new scheduler, working on nothing; a asks too.
    state.heartbeat(b, 0, 0.0, 100.5, lease_ids=())
    decision = state.lease(b, 101.0, held=())
    assert decision.released == 1
    assert (decision.task.epoch, decision.task.shard) == (lost.epoch, lost.shard)
    assert decision.task.lease_id != lost.lease_id
    assert finish(state, b, decision.task, 102.0)
    evaluation = state.lease(a, 103.0, held=())
    assert evaluation.evaluate_epoch == 0 and evaluation.task is None
    assert state.record_evaluation(0, 0.5, 0.5, a, 104.0)
    assert state.finished() and state.lease(b, 105.0, held=()).done
    assert sorted((c.epoch, c.shard) for c in state.completions()) == [(0, 0), (0, 1)]


def test_heartbeats_keep_only_the_leases_their_worker_reports(tmp_path):
    """A live worker that never asks again (its lease unreported) loses the lease when its
    deadline passes; one it reports is kept however long it takes."""
    state, a, b, _ = killed_after_a_lost_lease_reply(tmp_path / "job.db")
    now = 100.0
    while now < 130.0:  # three lease timeouts of heartbeats that report nothing
        now += 3.0
        state.heartbeat(b, 0, 0.0, now, lease_ids=())
        state.heartbeat(a, 0, 0.0, now, lease_ids=())
        assert state.expire(now) == []  # both live
    p = state.progress(now)
    assert (p.leased, p.pending) == (0, 1) and state.expired_leases() == 1
    kept = state.lease(a, now, held=()).task
    for _ in range(10):
        now += 3.0
        state.heartbeat(a, 0, 0.0, now, lease_ids=[kept.lease_id])
        state.expire(now)
    assert state.progress(now).leased == 1
    assert finish(state, a, kept, now)


# ------------------------------------------------------- real processes, SIGKILLed


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, shards=4, samples=480)
    return out


def job(data: Path, mode: str) -> JobSpec:
    return JobSpec.from_dict(
        {
            **{"data_dir": str(data), "model": "digits-mlp", "mode": mode, "epochs": 2},
            **{"batch_size": 16, "lr": 0.003, "lease_timeout_s": 3.0, "staleness": 1},
        }
    )


def wait_for(cluster: LocalCluster, predicate, what: str, timeout_s: float = 60.0) -> dict:
    """Poll the scheduler's progress until predicate(progress) holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p = cluster.progress()
        if p is not None and predicate(p):
            return p
        time.sleep(0.05)  # polling progress, with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def kill_scheduler(cluster: LocalCluster) -> None:
    assert cluster.scheduler is not None
    cluster.scheduler.proc.send_signal(signal.SIGKILL)
    cluster.scheduler.proc.wait(10)


def every_shard_once(work_dir: Path, spec: JobSpec) -> None:
    state = SchedulerState(str(work_dir / "scheduler.db"))
    try:
        keys = [(c.epoch, c.shard) for c in state.completions()]
    finally:
        state.close()
    assert sorted(keys) == [(e, s) for e in range(spec.epochs) for s in range(4)]


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_a_scheduler_killed_while_workers_hold_leases_finishes_the_job(tmp_path, digits):
    """Sync (async: the test after this one; every mode: tests/test_chaos.py)."""
    spec = job(digits, "sync")
    with LocalCluster(spec, tmp_path, workers=2).start() as cluster:
        wait_for(cluster, lambda p: p["done"] >= 1 and p["leased"] >= 1, "a lease mid-job")
        kill_scheduler(cluster)
        progress = cluster.wait(120)  # which restarts it on its state file, same port
        assert progress["finished"]
        assert cluster.restarts == [
            "the scheduler exited with code -9; restarted on its state file"
        ]
    every_shard_once(tmp_path, spec)


class Forgetful:
    """A worker whose Lease reply was lost in the scheduler's death: it holds a lease it
    never heard of. Afterwards it behaves as ps-worker does: heartbeats reporting what it
    works on, Lease, Complete and ReportEvaluation (without training or evaluating: an
    async job waits for nobody)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.worker_id = self.stub.Register(pb.RegisterRequest(host="h"), timeout=10).worker_id
        self.stop = threading.Event()
        self.completed: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []

    def lose_a_lease(self, cluster: LocalCluster) -> None:
        """Ask until a task comes (once the servers count this worker); forget it."""
        ask = pb.LeaseRequest(worker_id=self.worker_id)
        wait_for(cluster, lambda _: self.stub.Lease(ask, timeout=10).has_task, "a task")

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id), timeout=5)
                lease = self.stub.Lease(pb.LeaseRequest(worker_id=self.worker_id), timeout=5)
                if lease.has_evaluation:  # its figures, without evaluating
                    scored = pb.EvaluationRequest(
                        worker_id=self.worker_id, epoch=lease.evaluate_epoch, loss=1.0
                    )
                    self.stub.ReportEvaluation(scored, timeout=5)
                if lease.has_task:
                    t = lease.task
                    done = pb.CompleteRequest(worker_id=self.worker_id, task=t, clock_end=0)
                    assert self.stub.Complete(done, timeout=5).recorded
                    self.completed.append((t.epoch, t.shard))
                if lease.finished:
                    self.stub.Leave(pb.WorkerLeaveRequest(worker_id=self.worker_id), timeout=5)
                    return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:  # the scheduler is down: again
                    self.errors.append(e)
                    return
            self.stop.wait(0.2)  # the poll interval of a worker with nothing to do


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_a_lease_granted_as_the_scheduler_died_is_not_held_forever(tmp_path, digits):
    """An async job's scheduler SIGKILLed while two ps-workers train and a third worker
    holds a lease it never heard of: the job finishes, every shard once."""
    spec = job(digits, "async")
    with LocalCluster(spec, tmp_path, workers=2).start() as cluster:
        assert cluster.scheduler is not None
        wait_for(cluster, lambda p: p["done"] >= 1, "the first shard")
        forgetful = Forgetful(cluster.scheduler.address)
        forgetful.lose_a_lease(cluster)
        kill_scheduler(cluster)
        worker = threading.Thread(target=forgetful.run)
        worker.start()
        try:
            progress = cluster.wait(90)
        finally:
            forgetful.stop.set()
            worker.join(30)
            forgetful.channel.close()
        assert progress["finished"] and not forgetful.errors
        assert cluster.restarts == [
            "the scheduler exited with code -9; restarted on its state file"
        ]
    every_shard_once(tmp_path, spec)
