"""EndJob: a server drops the job it holds, and its checkpoints, and takes another job without a
restart. On the store, then through real ps-server processes (checkpoints, restarts, token)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from protos import ps_pb2, rpc
from ps_server.errors import FailedPrecondition, NotFound
from ps_server.store import ParameterStore
from scheduler.launch import BIN, Daemon
from tests import serverkit
from tests.serverkit import refused, status, wait_until
from tests.storekit import chunks_for, frames, initial_values, make_job, new_store, push


def test_ending_the_job_empties_the_store_for_another_job():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0, session="sa")
    before = store.view()
    with pytest.raises(NotFound, match="unknown job 'other'"):
        store.end("other")
    assert store.view() == before  # nothing changed
    assert store.end("job")
    assert store.job is None and store.view() == ParameterStore().view()
    assert not store.end("job")  # nothing held: nothing ended
    with pytest.raises(NotFound, match="job 'job' was ended on this server"):
        push(store, job, "a", 2, 1.0, session="sa")  # the ended job's workers are told so
    with pytest.raises(FailedPrecondition, match="not initialised"):
        store.check_job("never")
    other = replace(make_job("async"), job_id="other")
    assert store.initialise(other, chunks_for(other, initial_values()))
    with pytest.raises(NotFound, match=r"job 'job' was ended on this server \(this server holds"):
        store.check_job("job")
    assert store.version == 0 and store.active_workers() == []


def start(log: Path, *extra: str) -> Daemon:
    argv = [str(BIN / "ps-server"), "--port", "0", "--unix-socket", "none", *extra]
    daemon = Daemon(argv, log)
    assert daemon.address
    return daemon


def end(calls: rpc.Calls, job_id: str, **kw) -> ps_pb2.EndJobResponse:
    return calls.end_job(ps_pb2.EndJobRequest(job_id=job_id), timeout=10, **kw)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_an_ended_job_frees_the_server_and_its_checkpoints_stay_gone(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    manifest = checkpoints / "manifest.json"
    a = make_job("sync", workers=["a", "b"])
    b = replace(make_job("async"), job_id="b-job")
    server = start(
        tmp_path / "s1.log", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1"
    )
    try:
        with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(1) as pool:
            calls = rpc.calls(channel)
            assert not end(calls, "job").ended  # nothing held yet
            assert serverkit.init(calls, a).created
            for worker in ("a", "b"):  # step 0
                assert serverkit.push(calls, a, worker, 1, f"s{worker}").applied
            wait_until(manifest.exists, "a checkpoint of job 'job'")  # written every version
            assert serverkit.push(calls, a, "a", 2, "sa", pulled=1).applied
            pull = ps_pb2.PullRequest(
                job_id="job", worker_id="a", clock=2, min_version=2, session="sa"
            )
            waiting = pool.submit(lambda: refused(lambda: list(calls.pull(pull, timeout=50))))
            wait_until(lambda: status(calls).waiting, "a's pull to wait for b")
            assert refused(lambda: end(calls, "b-job")).code() == grpc.StatusCode.NOT_FOUND
            assert status(calls).config.job_id == "job"  # another id changes nothing
            assert end(calls, "job").ended
            error = waiting.result(timeout=20)  # released at once, with the reason
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert "job 'job' was ended on this server" in error.details()
            assert not manifest.exists() and not list(checkpoints.glob("state-*"))
            assert not status(calls).initialised
            assert serverkit.init(calls, b).created  # a different job, no restart
            after = status(calls)
            assert after.initialised and after.config.job_id == "b-job" and after.version == 0
            assert end(calls, "b-job").ended
    finally:
        assert server.stop() == 0
    assert not manifest.exists()  # nothing held at SIGTERM: nothing written
    again = start(tmp_path / "s2.log", "--checkpoint-dir", str(checkpoints))
    try:
        with grpc.insecure_channel(again.address) as channel:
            assert not status(rpc.calls(channel)).initialised  # nothing restored
    finally:
        again.stop()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_ending_a_job_needs_the_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("end-secret\n")
    server = start(tmp_path / "s.log", "--token-file", str(token))
    good = (("authorization", "Bearer end-secret"),)
    try:
        with grpc.insecure_channel(server.address) as channel:
            calls = rpc.calls(channel)
            job = make_job("async")
            header = ps_pb2.InitHeader(config=job.to_proto())
            messages = frames(header, job, initial_values())
            assert calls.init(iter(messages), timeout=10, metadata=good).created
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                error = refused(lambda metadata=metadata: end(calls, "job", metadata=metadata))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = calls.status(ps_pb2.StatusRequest(), timeout=10, metadata=good)
            assert reply.initialised and reply.config.job_id == "job"  # the job survives
            assert end(calls, "job", metadata=good).ended
    finally:
        server.stop()
