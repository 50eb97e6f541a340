"""The client's transports without sockets: streams, the unary step and shared memory
move the same pushes and pulls through a fake server in this process (segments are real
files in a temporary directory); a push is encoded once; pulled chunks are checked."""

from __future__ import annotations

import threading

import pytest
import torch

from protos.codec import Piece, encode_frames, to_raw
from ps_worker.errors import PSError
from ps_worker.payload import Plan
from ps_worker.protocol import ProtocolState
from ps_worker.transport import SharedMemory, Streams, UnaryStep
from tests.clientkit import FakeLink, FakeServer, empty_dest, expected, full_grads, plan_of

pytestmark = pytest.mark.timeout(60)

# ---------------------------------------------------------------- transports


@pytest.fixture(params=["streams", "step", "shm"])
def transport_of(request, tmp_path):
    def make(plan: Plan, server: FakeServer):
        link = FakeLink(server)
        if request.param == "shm":
            server.shm_dir = str(tmp_path)
            shm = SharedMemory(link, server.server, str(tmp_path), 10.0, 10.0)
            shm.use(plan)
            return shm
        kind = Streams if request.param == "streams" else UnaryStep
        return kind(link, server.server, 64, 10.0, 10.0)

    return make


@pytest.mark.parametrize("server", [0, 1])
def test_every_transport_pushes_pulls_and_steps_the_same(transport_of, server, tmp_path):
    plan = plan_of()
    fake = FakeServer(plan, server)
    transport = transport_of(plan, fake)
    state = ProtocolState("job", "w", 2, session="s1")
    replies = transport.push(state.push_header(server, 1), full_grads(plan, 2.0))
    assert replies.applied and replies.version == 1
    dest = empty_dest()
    header = transport.pull(state.pull_request(server), plan.sink(server, dest, "fake"))
    assert header.version == 1
    expected(plan, server, dest, 2.0)
    dest = empty_dest()
    step = state.step_header(server, 2)
    pushed, pulled = transport.step(step, full_grads(plan, 1.0), plan.sink(server, dest, "f"))
    assert (pushed.version, pulled.version, pulled.worker_clock) == (2, 2, 2)
    expected(plan, server, dest, 3.0)
    calls = {
        "streams": ["push", "pull", "push", "pull"],  # a step is a push and a pull
        "step": ["push", "pull", "step"],  # one round trip
        "shm": ["shm"] * 3,
    }
    assert fake.calls == calls[transport.name]
    assert list(tmp_path.iterdir()) == []  # segments are unlinked once the server mapped them
    assert fake.sessions == ["s1"] * 4  # push, pull, and both halves of the step


def test_an_observing_pull_carries_no_session_on_any_transport(transport_of):
    """It never joins, so no server may take it for a client of the worker id."""
    plan = plan_of()
    fake = FakeServer(plan, 0)
    state = ProtocolState("job", "w", 2, session="s1")
    sink = plan.sink(0, empty_dest(), "f")
    transport_of(plan, fake).pull(state.pull_request(0, observe=True), sink)
    assert fake.sessions == [""] and not state.member


def test_a_push_is_encoded_once_however_many_servers_ask():
    plan = plan_of(compression="topk:0.1")
    grads = full_grads(plan, 1.0)
    calls = []
    encode = plan.encoder.encode
    plan.encoder.encode = lambda flat: calls.append(1) or encode(flat)
    threads = [threading.Thread(target=grads.pieces, args=(i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert grads.pieces(0) is grads.pieces(0)


def test_a_sink_checks_chunks_against_the_layout_and_widens_weights():
    plan = plan_of(1, compression="bf16")
    dest = empty_dest()
    sink = plan.sink(0, dest, "fake:0")
    values = to_raw(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    piece = Piece("w", 0, 0, values, plan.weight_wire)
    (message,) = encode_frames(b"\x08\x07", [piece])
    assert sink.frame(message) == b"\x08\x07"
    assert dest["w"][:3].tolist() == [1.5, -2.0, -1.0]
    (message,) = encode_frames(None, [Piece("w", 99, 0, values, plan.weight_wire)])
    with pytest.raises(PSError, match="tensor 'w' part 99, which the layout does not give it"):
        sink.frame(message)
