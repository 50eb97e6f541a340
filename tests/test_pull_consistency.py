"""A streamed pull is one version of the weights, however slowly its client reads it."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from protos import ps_pb2
from protos.codec import decode_frame
from protos.job import Job, Mode, Settings
from protos.layout import TensorSpec, plan_layout
from protos.optimizers import SGD
from ps_server import pullroom
from ps_server.store import ParameterStore
from tests.serverkit import status
from tests.storekit import frames as stream_frames
from tests.test_hostile_limits import serving

VALUES = 4 << 20  # 16 MiB of float32: many frames, more than the transport buffers ahead


@pytest.mark.timeout(60)
def test_a_push_while_a_pull_streams_does_not_tear_it():
    """Trap: the frames were encoded as they were sent, from live views of the weights, so
    a push applied between two frames gave one pull the weights of two versions."""
    settings = Settings(optimizer=SGD(), lr=1.0)
    specs = [TensorSpec("w", "float32", (VALUES,))]
    job = Job("job", settings, plan_layout(specs, 1, settings.part_bytes))
    with serving(ParameterStore(), chunk_bytes=1 << 20) as s:
        config = ps_pb2.InitHeader(config=job.to_proto())
        s.calls.init(iter(stream_frames(config, job, {"w": torch.zeros(VALUES)})), timeout=30)
        request = ps_pb2.PullRequest(job_id="job", worker_id="reader", observe=True)
        stream = s.calls.pull(request, timeout=30)
        first = next(stream)  # the pull has begun: its version is chosen
        gradient = ps_pb2.PushHeader(job_id="job", worker_id="writer", clock=1, session="s")
        reply = s.calls.push(iter(stream_frames(gradient, job, {"w": -torch.ones(VALUES)})))
        assert reply.applied  # SGD, lr 1: the weights are 1 from now on
        frames = [decode_frame(m) for m in [first, *stream]]
    header = ps_pb2.PullHeader.FromString(bytes(frames[0].header))
    values = np.concatenate([np.frombuffer(c.data, np.float32) for f in frames for c in f.chunks])
    assert values.size == VALUES
    assert header.version == 0 and np.all(values == 0.0), np.unique(values)


@pytest.mark.timeout(60)
def test_slow_readers_hold_at_most_the_servers_room_for_pulls(monkeypatch):
    """Each streamed pull holds its encoded weights until read: a storm of slow readers
    held 60 times the model. Beyond the room a pull waits for room, up to its deadline,
    then gets UNAVAILABLE (clients retry it); once read, the room is free again."""
    monkeypatch.setattr(pullroom, "PULL_ROOM_BYTES", VALUES * 4)  # room for one pull here
    settings = Settings(optimizer=SGD(), lr=1.0)
    specs = [TensorSpec("w", "float32", (VALUES,))]
    job = Job("job", settings, plan_layout(specs, 1, settings.part_bytes))
    store = ParameterStore()
    with serving(store, chunk_bytes=1 << 20) as s:
        config = ps_pb2.InitHeader(config=job.to_proto())
        s.calls.init(iter(stream_frames(config, job, {"w": torch.zeros(VALUES)})), timeout=30)
        request = ps_pb2.PullRequest(job_id="job", worker_id="reader", observe=True)
        slow = s.calls.pull(request, timeout=30)
        next(slow)  # it holds its frames, unread
        with pytest.raises(grpc.RpcError) as refused:
            list(s.calls.pull(request, timeout=2))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "busy" in refused.value.details()
        assert len(list(slow)) > 1  # read to the end: its room is free
        assert len(list(s.calls.pull(request, timeout=30))) > 1


@pytest.mark.timeout(60)
def test_a_pull_that_waits_holds_no_room(monkeypatch):
    """Trap: a pull waiting for the ssp bound held room for its weights, so the pull of the
    slowest worker, the one it waited for, was refused as busy."""
    monkeypatch.setattr(pullroom, "PULL_ROOM_BYTES", VALUES * 4)  # room for one pull here
    settings = Settings(mode=Mode.SSP, staleness=0, optimizer=SGD(), lr=1.0)
    specs = [TensorSpec("w", "float32", (VALUES,))]
    job = Job("job", settings, plan_layout(specs, 1, settings.part_bytes), workers=("a", "b"))
    with serving(ParameterStore(), chunk_bytes=1 << 20) as s:
        config = ps_pb2.InitHeader(config=job.to_proto())
        s.calls.init(iter(stream_frames(config, job, {"w": torch.zeros(VALUES)})), timeout=30)
        gradient = ps_pb2.PushHeader(job_id="job", worker_id="a", clock=1, session="sa")
        s.calls.push(iter(stream_frames(gradient, job, {"w": torch.zeros(VALUES)})), timeout=30)
        ahead = ps_pb2.PullRequest(job_id="job", worker_id="a", clock=1, session="sa")
        waiting = s.calls.pull(ahead, timeout=30)  # waits for b to reach clock 1
        deadline = time.monotonic() + 30
        while not status(s.calls).waiting:
            assert time.monotonic() < deadline, "a's pull never waited"
            time.sleep(0.02)  # polling the server's state, with a deadline
        slowest = ps_pb2.PullRequest(job_id="job", worker_id="b", clock=0, session="sb")
        assert len(list(s.calls.pull(slowest, timeout=10))) > 1  # served, not busy
        gradient = ps_pb2.PushHeader(job_id="job", worker_id="b", clock=1, session="sb")
        s.calls.push(iter(stream_frames(gradient, job, {"w": torch.zeros(VALUES)})), timeout=30)
        assert len(list(waiting)) > 1  # released by b's push
