"""The gRPC service in-process: refusals carry their typed reasons (shared memory, sessions)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from protos import ps_pb2, rpc
from protos.codec import encode_frames, to_raw
from protos.layout import server_pieces
from protos.shm import Segment, segment_slots
from protos.status import SHM_SEGMENT_UNAVAILABLE, SHM_UNSUPPORTED, WORKER_ID_IN_USE, reason_of
from ps_server.service import ParameterService, ServiceConfig
from ps_server.store import ParameterStore
from tests.storekit import chunks_for, frames, grads, initial_values, make_job

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def serving(store: ParameterStore, shm_dir: str) -> AsyncIterator[ParameterService]:
    """The service on a loopback port; its address is ``service.address``."""
    service = ParameterService(store, ServiceConfig(shm_dir=shm_dir))
    server = rpc.new_server()
    server.add_generic_rpc_handlers([rpc.generic_handler(service)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        await server.stop(None)


def shm_step(address: str, request: ps_pb2.ShmStepRequest) -> ps_pb2.PullHeader:
    """A raw, blocking ShmStep call (run it on a thread: the server is on this loop)."""
    with grpc.insecure_channel(address) as channel:
        return rpc.calls(channel).shm_step(request, timeout=20)


async def refusal(address: str, request: ps_pb2.ShmStepRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(shm_step, address, request)
    return info.value


def sync_store() -> ParameterStore:
    store = ParameterStore()
    job = make_job("sync", workers=["a", "b"])
    assert store.initialise(job, chunks_for(job, initial_values()))
    return store


def push(worker: str, clock: int = 1, pulled: int = 0) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(job_id="job", worker_id=worker, clock=clock, pulled_version=pulled)


def test_segments_the_server_cannot_use_are_refused_with_a_typed_reason(tmp_path: Path):
    async def main() -> None:
        store = sync_store()
        assert store.job is not None
        _, size = segment_slots(store.job.layout, 0)
        small = Segment.create(str(tmp_path), 8)
        try:
            async with serving(store, str(tmp_path)) as service:
                for name, says in [
                    ("gradstore-nothere", "shm step: cannot open segment 'gradstore-nothere'"),
                    ("../secret", "bad segment name"),
                    (small.name, f"at least {size} bytes"),
                ]:
                    request = ps_pb2.ShmStepRequest(segment=name, push=push("x"))
                    error = await refusal(service.address, request)
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert says in error.details()
                    assert reason_of(error) == SHM_SEGMENT_UNAVAILABLE
                error = await refusal(service.address, ps_pb2.ShmStepRequest(segment=small.name))
                assert "neither push nor pull" in error.details()
                assert reason_of(error) is None  # a bad request, not a refused segment
            async with serving(store, "") as service:
                request = ps_pb2.ShmStepRequest(segment=small.name, pull=ps_pb2.PullRequest())
                error = await refusal(service.address, request)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert reason_of(error) == SHM_UNSUPPORTED
        finally:
            small.unlink()
            small.close()
        assert store.view().counters.pushes_received == 0

    asyncio.run(main())


def test_a_segment_dropped_while_its_pull_waited_is_refused_with_the_reason(tmp_path: Path):
    async def main() -> None:
        store = sync_store()
        assert store.job is not None
        _, size = segment_slots(store.job.layout, 0)
        registered = asyncio.Event()
        add_waiter = store.add_waiter

        def spy(waiter):  # the real registration, and a signal that the pull now waits
            token = add_waiter(waiter)
            registered.set()
            return token

        store.add_waiter = spy  # type: ignore[method-assign]
        mine, theirs, again = (Segment.create(str(tmp_path), size) for _ in range(3))
        pull = ps_pb2.PullRequest(job_id="job", worker_id="a", clock=1, min_version=1)
        try:
            async with serving(store, str(tmp_path)) as service:
                step = ps_pb2.ShmStepRequest(segment=mine.name, push=push("a"), pull=pull)
                waiting = asyncio.create_task(refusal(service.address, step))
                await registered.wait()  # a's gradient is in; its pull waits for b's
                mine.unlink()  # as the client does once the server mapped it
                assert service.segments is not None
                service.segments.close()  # the server drops its mapping meanwhile
                done = await asyncio.to_thread(
                    shm_step,
                    service.address,
                    ps_pb2.ShmStepRequest(segment=theirs.name, push=push("b")),
                )
                assert done.push.applied and done.version == 1
                error = await waiting
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "shm step: cannot open segment" in error.details()
                assert reason_of(error) == SHM_SEGMENT_UNAVAILABLE
                # the client makes a new segment and retries: its push is a duplicate
                retry = ps_pb2.ShmStepRequest(segment=again.name, push=push("a"), pull=pull)
                header = await asyncio.to_thread(shm_step, service.address, retry)
                assert header.push.duplicate and header.version == 1
        finally:
            for segment in (mine, theirs, again):
                segment.unlink()
                segment.close()
        assert not os.listdir(tmp_path)

    asyncio.run(main())


def test_a_step_from_another_live_client_is_refused_before_anything_is_applied(tmp_path: Path):
    """Step and ShmStep check the pull's client before applying the push: a refused step
    changes nothing, and the refusal carries WORKER_ID_IN_USE."""
    store = sync_store()
    job = store.job
    assert job is not None
    _, size = segment_slots(job.layout, 0)
    gradient = {k: to_raw(v) for k, v in grads(1.0).items()}
    pieces = server_pieces(job.layout, 0, gradient)
    mine = ps_pb2.PushHeader(job_id="job", worker_id="a", clock=1, session="mine")
    theirs = push("b")  # b is free, but the step's pull names a's id from another client
    pull = ps_pb2.PullRequest(job_id="job", worker_id="a", clock=1, min_version=1, session="x")
    (step,) = encode_frames(ps_pb2.StepHeader(push=theirs, pull=pull).SerializeToString(), pieces)

    async def main(segment: Segment) -> None:
        async with serving(store, str(tmp_path)) as service:
            with grpc.insecure_channel(service.address) as channel:
                calls = rpc.calls(channel)
                await asyncio.to_thread(calls.push, iter(frames(mine, job, grads(1.0))), timeout=20)
                shm = ps_pb2.ShmStepRequest(segment=segment.name, push=theirs, pull=pull)
                for send in (
                    lambda: calls.step(step, timeout=20),
                    lambda: calls.shm_step(shm, timeout=20),
                ):
                    with pytest.raises(grpc.RpcError) as info:
                        await asyncio.to_thread(send)
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert reason_of(info.value) == WORKER_ID_IN_USE
                    assert "'a' is already used by another live client" in info.value.details()

    segment = Segment.create(str(tmp_path), size)
    try:
        asyncio.run(main(segment))
    finally:
        segment.unlink()
        segment.close()
    view = store.view()
    assert view.counters.pushes_received == 1 and view.contributors == ("a",)
