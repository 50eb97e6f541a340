"""The same-host shared-memory data path: segment rules, and a client and server using it."""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from protos import ps_pb2, rpc
from protos.layout import TensorSpec, plan_layout
from protos.shm import ALIGN, Segment, SegmentCache, SegmentError, SegmentFile, segment_slots
from ps_worker import Client, ClientConfig
from ps_worker.payload import SharedBuffers
from ps_worker.transport import SharedMemory
from scheduler.launch import servers

# ------------------------------------------------------------------ segments


def test_slots_are_aligned_and_cover_each_part_once():
    layout = plan_layout(
        [TensorSpec("a", "float32", (1000,)), TensorSpec("b", "bfloat16", (7,))], 2, 1024
    )
    for server in range(2):
        slots, size = segment_slots(layout, server)
        assert [s.part for s in slots] == layout.parts_on(server)
        end = 0
        for slot in slots:
            assert slot.offset % ALIGN == 0 and slot.offset >= end
            end = slot.offset + slot.part.nbytes
        assert size >= end and size % ALIGN == 0


def test_open_accepts_only_our_regular_files_of_the_size_needed(tmp_path):
    made = Segment.create(str(tmp_path), 256)
    try:
        opened = SegmentFile.open(str(tmp_path), made.name, 256)
        made.buffer[:4] = b"abcd"
        seen = bytearray(256)
        opened.read_into(memoryview(seen))  # the server copies through the file
        assert seen[:4] == b"abcd"
        opened.write(4, memoryview(b"efgh"))
        assert bytes(made.buffer[:8]) == b"abcdefgh"
        opened.close()
        with pytest.raises(SegmentError, match="at least 512"):
            SegmentFile.open(str(tmp_path), made.name, 512)
        (tmp_path / "other").write_bytes(b"x" * 512)
        os.symlink(tmp_path / "other", tmp_path / "gradstore-link")
        (tmp_path / "gradstore-dir").mkdir()
        os.link(tmp_path / "other", tmp_path / "gradstore-hard")  # another file's second name
        for name, error in [
            ("gradstore-hard", "with one name"),
            (f"{made.name}\n", "bad segment name"),
            ("../other", "bad segment name"),
            ("other", "bad segment name"),
            ("gradstore-a/b", "bad segment name"),
            ("gradstore-link", "cannot open"),
            ("gradstore-dir", "cannot open|not a regular file"),
            ("gradstore-missing", "cannot open"),
        ]:
            with pytest.raises(SegmentError, match=error):
                SegmentFile.open(str(tmp_path), name, 1)
    finally:
        made.unlink()
        made.close()
    assert not (tmp_path / made.name).exists()


def test_cache_drops_idle_segments_and_keeps_a_bound(tmp_path):
    made = [Segment.create(str(tmp_path), 64) for _ in range(3)]
    cache = SegmentCache(str(tmp_path), limit=2, idle_s=10.0)
    first = cache.get(made[0].name, 64, now=0.0)
    assert cache.get(made[0].name, 64, now=5.0) is first  # mapped once
    cache.get(made[1].name, 64, now=6.0)
    cache.get(made[2].name, 64, now=7.0)
    assert len(cache) == 2  # the least recently used went over the limit
    cache.get(made[0].name, 64, now=30.0)  # the others have idled past 10 s
    assert len(cache) == 1
    made[0].unlink()  # a client unlinks once mapped: the mapping still works
    assert cache.get(made[0].name, 64, now=31.0).size == 64
    cache.close()
    for segment in made:
        segment.unlink()
        segment.close()


# ------------------------------------------------------------- with servers


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3))


@pytest.fixture
def shm_servers(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    with servers(2, tmp_path, "--shm-dir", str(shm)) as daemons:
        yield [d.address for d in daemons], shm


def ones_step(client: Client, m: torch.nn.Module) -> None:
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    client.push_pull_into(m)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_shared_memory_leaves_no_files_and_matches_the_stream_path(shm_servers):
    addresses, shm = shm_servers
    m = model()
    with Client(addresses, job_id="shm", worker_id="w") as c:
        assert c.transports == ["shm", "shm"]
        c.init(m, optimizer="sgd", lr=0.5)
        ones_step(c, m)
        c.push_from(m)
        assert list(shm.iterdir()) == []  # unlinked once the server mapped them
        observed = c.pull(observe=True)
    config = ClientConfig(same_host_shared_memory=False)
    with Client(addresses, job_id="shm", worker_id="r", config=config) as streams:
        assert streams.transports == ["unix", "unix"]
        weights = streams.pull(observe=True)
    start = model()
    for name, p in start.named_parameters():  # two pushes of ones at lr 0.5
        torch.testing.assert_close(weights[name], p.detach() - 1.0)
        assert torch.equal(observed[name], weights[name])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_server_that_cannot_see_the_segment_gets_the_stream_path(shm_servers, tmp_path):
    addresses, _ = shm_servers
    elsewhere = tmp_path / "elsewhere"  # as if the server's /dev/shm were another machine's
    elsewhere.mkdir()
    m = model()
    with Client(addresses, job_id="shm", worker_id="w") as c:
        assert c.transports == ["shm", "shm"]
        for route in c._router.routes:
            route.shm.directory = str(elsewhere)
        c.init(m, optimizer="sgd", lr=0.5)
        ones_step(c, m)
        assert c.transports == ["unix", "unix"]
        assert list(elsewhere.iterdir()) == []
        weights = c.pull(observe=True)
    for name, p in model().named_parameters():
        torch.testing.assert_close(weights[name], p.detach() - 0.5)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_segment_the_server_dropped_is_made_anew(shm_servers):
    addresses, shm = shm_servers
    m = model()
    with Client(addresses, job_id="shm", worker_id="w") as c:
        c.init(m, optimizer="sgd", lr=0.5)
        ones_step(c, m)  # both servers have opened a segment of this client
        for i, route in enumerate(c._router.routes):  # a segment the server never saw
            route.shm.drop()
            route.shm.buffers = SharedBuffers.create(str(shm), c._plan, i)
            route.shm.buffers.segment.unlink()  # so it cannot open it
        ones_step(c, m)
        assert c.transports == ["shm", "shm"]
    for (name, p), q in zip(m.named_parameters(), model().parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - 1.0, msg=name)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_segments_are_refused_and_change_nothing(shm_servers, tmp_path):
    addresses, shm = shm_servers
    m = model()
    with Client(addresses[:1], job_id="bad", worker_id="w") as c:
        c.init(m, optimizer="sgd", lr=0.5)
        before = c.pull(observe=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * (1 << 20))
    small = Segment.create(str(shm), 64)
    channel = grpc.insecure_channel(addresses[0])
    calls = rpc.calls(channel)
    push = ps_pb2.PushHeader(job_id="bad", worker_id="x", clock=1)
    try:
        for segment, error in [
            (str(secret), "bad segment name"),
            ("../secret", "bad segment name"),
            ("gradstore-nothere", "cannot open"),
            (small.name, "at least"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                calls.shm_step(ps_pb2.ShmStepRequest(segment=segment, push=push), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            calls.shm_step(ps_pb2.ShmStepRequest(segment=small.name), timeout=10)
        assert "neither push nor pull" in info.value.details()
    finally:
        channel.close()
        small.unlink()
        small.close()
    with Client(addresses[:1], job_id="bad", worker_id="r") as c:
        after = c.pull(observe=True)
        assert c.status()[0].pushes_received == 0
    for name in before:
        assert torch.equal(before[name], after[name])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_server_without_shared_memory_says_so(tmp_path):
    with servers(1, tmp_path, "--shm-dir", "none") as (daemon,):
        with Client([daemon.address], job_id="x") as c:
            assert c.transports == ["unix"]
        channel = grpc.insecure_channel(daemon.address)
        try:
            with pytest.raises(grpc.RpcError) as info:
                rpc.calls(channel).shm_step(
                    ps_pb2.ShmStepRequest(segment="gradstore-x", pull=ps_pb2.PullRequest()),
                    timeout=10,
                )
        finally:
            channel.close()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_client_refused_shared_memory_with_its_reason_uses_streams(tmp_path):
    """A server without shared memory refuses a ShmStep with SHM_UNSUPPORTED (as if its
    directory had gone since it said otherwise): the client uses streams from then on."""
    with servers(1, tmp_path, "--shm-dir", "none") as (daemon,):
        with Client([daemon.address], job_id="x", worker_id="w") as c:
            c.init({"w": torch.ones(3)}, optimizer="sgd", lr=1.0)
            route = c._router.routes[0]
            route.shm = SharedMemory(route.link, 0, str(tmp_path), 10.0, 10.0)
            route.shm.use(c._plan)
            assert c.transports == ["shm"]
            assert c.push({"w": torch.ones(3)}).applied
            assert torch.equal(c.pull()["w"], torch.zeros(3))
            assert c.transports == ["unix"]
            assert c.status()[0].pushes_received == 1
        assert not list(tmp_path.glob("gradstore-*"))
