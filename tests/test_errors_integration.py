"""Every bad request gets its own status from a real server, changes nothing, and the
server keeps serving."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from protos import ps_pb2, ps_pb2_grpc
from protos.codec import to_raw
from protos.layout import server_pieces
from ps_worker import Client, ClientConfig
from scheduler.launch import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INIT = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with servers(1, tmp_path_factory.mktemp("errors")) as (daemon,):
        yield daemon.address


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield ps_pb2_grpc.ParameterServerStub(channel)


@pytest.fixture(scope="module")
def client(server, stub):
    """The module's client, its job initialised; a push before that is checked first (the
    fixture runs once per test process, whichever of the module's tests it runs first)."""
    chunk = ps_pb2.TensorChunk(tensor="w", dtype=ps_pb2.FLOAT32, data=bytes(48))
    with pytest.raises(grpc.RpcError) as e:
        stub.Push(iter([push_request([chunk])]), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not initialised" in e.value.details()
    with Client(
        [server],
        job_id="errors",
        worker_id="good",
        config=ClientConfig(timeout_s=10, pull_timeout_s=10),
    ) as c:
        assert c.init(INIT, mode="async", optimizer="sgd", lr=1.0)
        yield c


def grad_chunks(client, value=1.0):
    """A gradient as protobuf chunks, one a part, for a raw client to spoil."""
    flat = {k: to_raw(torch.full_like(v, value)) for k, v in INIT.items()}
    return [
        ps_pb2.TensorChunk(
            tensor=p.tensor, part=p.part, dtype=p.dtype.proto, data=p.values.tobytes()
        )
        for p in server_pieces(client.layout, 0, flat)
    ]


def push_request(chunks, job="errors", worker="bad", clock=1, pulled=0):
    header = ps_pb2.PushHeader(job_id=job, worker_id=worker, clock=clock, pulled_version=pulled)
    return ps_pb2.PushRequest(header=header, chunks=chunks)


def mutate(field, value, index=0):
    def apply(chunks):
        setattr(chunks[index], field, value(chunks[index]) if callable(value) else value)
        return chunks

    return apply


CASES = [
    (
        "unknown tensor",
        mutate("tensor", "nope"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown tensor 'nope'",
    ),
    (
        "wrong dtype",
        mutate("dtype", ps_pb2.FLOAT64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype float64, expected float32",
    ),
    ("unsupported dtype", mutate("dtype", 99), grpc.StatusCode.INVALID_ARGUMENT, "dtype 99"),
    (
        "odd byte length",
        mutate("data", lambda c: c.data[:-1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a whole number of float32",
    ),
    (
        "wrong shape",
        mutate("data", lambda c: c.data[:-8]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"of \d+ values sent",
    ),
    (
        "too long",
        mutate("data", lambda c: c.data + bytes(8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceed",
    ),
    ("missing tensor", lambda c: c[1:], grpc.StatusCode.INVALID_ARGUMENT, "0 of"),
    (
        "duplicated chunk",
        lambda c: [*c, c[0]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "sent twice|exceed",
    ),
    (
        "NaN",
        mutate("data", lambda c: b"\x00\x00\xc0\x7f" * (len(c.data) // 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN or Inf",
    ),
    (
        "Inf",
        mutate("data", lambda c: b"\x00\x00\x80\xff" * (len(c.data) // 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN or Inf",
    ),
]


@pytest.mark.parametrize(("what", "corrupt", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_push_gets_its_status_and_changes_nothing(stub, client, what, corrupt, code, message):
    before = client.pull()
    version = client.versions[0]
    with pytest.raises(grpc.RpcError) as e:
        stub.Push(iter([push_request(corrupt(grad_chunks(client)), pulled=version)]), timeout=10)
    assert e.value.code() == code
    assert re.search(message, e.value.details()), e.value.details()
    assert_unchanged(client, before, version)


def assert_unchanged(client, before, version):
    after = client.pull()
    assert client.versions == [version]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...and the server still serves a good push.
    assert client.push({k: torch.zeros_like(v) for k, v in INIT.items()}).applied


def raw_call(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_stream_and_state_errors(stub, client):
    before = client.pull()
    version = client.versions[0]
    chunks = grad_chunks(client)
    cases = [
        (
            lambda: stub.Push(iter([push_request(chunks, job="other")]), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            "unknown job 'other'",
        ),
        (
            lambda: stub.Push(iter([ps_pb2.PushRequest(chunks=chunks)]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "first message must carry the header",
        ),
        (
            lambda: stub.Push(iter([push_request(chunks), push_request([])]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header repeated",
        ),
        (lambda: stub.Push(iter([]), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "empty stream"),
        (
            lambda: stub.Push(iter([push_request(chunks, clock=0)]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad clock 0",
        ),
        (
            lambda: stub.Push(iter([push_request(chunks, pulled=version + 5)]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ahead of this server's version",
        ),
        (
            lambda: stub.Pull(ps_pb2.PullRequest(job_id="other", worker_id="x"), timeout=10).next(),
            grpc.StatusCode.NOT_FOUND,
            "unknown job",
        ),
    ]
    for call, code, message in cases:
        error = raw_call(call)
        assert error.code() == code, (message, error.details())
        assert message in error.details()
    assert_unchanged(client, before, version)


def test_oversize_message_is_refused(stub, client):
    before = client.pull()
    version = client.versions[0]
    huge = ps_pb2.TensorChunk(tensor="w", dtype=ps_pb2.FLOAT32, data=bytes(65 << 20))
    error = raw_call(lambda: stub.Push(iter([push_request([huge], pulled=version)]), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unchanged(client, before, version)


def test_conflicting_init_is_refused(stub, client):
    before = client.pull()
    version = client.versions[0]
    config = client.job().to_proto()
    config.mode = ps_pb2.SYNC
    error = raw_call(
        lambda: stub.Init(
            iter([ps_pb2.InitRequest(header=ps_pb2.InitHeader(config=config))]), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "differs in: mode" in error.details()
    config.mode = ps_pb2.ASYNC
    config.num_servers = 0
    error = raw_call(
        lambda: stub.Init(
            iter([ps_pb2.InitRequest(header=ps_pb2.InitHeader(config=config))]), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.init(INIT, mode="async", optimizer="sgd", lr=1.0) is False  # identical: no-op
    assert_unchanged(client, before, version)


def test_departed_worker_is_refused(stub, client):
    client.set_membership(["good", "gone"])
    client.set_membership(["good"])
    before = client.pull()
    version = client.versions[0]
    error = raw_call(
        lambda: stub.Push(
            iter([push_request(grad_chunks(client), worker="gone", pulled=version)]), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'gone' has left the job" in error.details()
    assert_unchanged(client, before, version)
