"""The bulk data plane (protos/bulk.py) against real servers: the same bytes and errors as
gRPC streams, the token proved without sending it, and hostile connections refused
without harm to the server or its other clients."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
import time
from dataclasses import replace

import grpc
import pytest
import torch

from protos import bulk, ps_pb2
from ps_server.bulk import BulkConfig, BulkPlane
from ps_worker import Client, ClientConfig
from ps_worker.bulk import MAX_RETRY_S
from ps_worker.errors import PSError
from ps_worker.payload import SlotBuffers
from ps_worker.protocol import ProtocolState
from scheduler.launch import BIN, Daemon, servers
from tests.serverkit import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# A client that treats same-host servers as remote ones, as on another host.
BULK = ClientConfig(same_host_unix_socket=False, same_host_shared_memory=False, timeout_s=20)
STREAMS = replace(BULK, bulk_data_plane=False)
TOKEN = "bulk-s3cret"


def model() -> dict[str, torch.Tensor]:
    """Two servers' worth of parts, a few hundred KiB: several slots, and padding."""
    g = torch.Generator().manual_seed(0)
    return {
        "embedding": torch.randn(40_000, generator=g),
        "w": torch.randn(33, 17, generator=g),
        "b": torch.randn(5, generator=g),
        "steps": torch.zeros(3, dtype=torch.float64),
    }


def grads(scale: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, scale) for k, v in model().items()}


@pytest.mark.parametrize("copied", [False, True], ids=["in-place", "copied"])
def test_bulk_moves_the_same_bytes_as_grpc_streams(shared_servers, monkeypatch, copied):
    if copied:  # as for tensors on a GPU: through the connection's buffer
        monkeypatch.setattr(SlotBuffers, "gradients", lambda self, grads: None)
        monkeypatch.setattr(SlotBuffers, "destinations", lambda self, sink: None)
    with (
        Client(shared_servers, job_id="bulk", worker_id="a", config=BULK) as a,
        Client(shared_servers, job_id="bulk", worker_id="b", config=STREAMS) as b,
    ):
        assert a.transports == ["bulk", "bulk"] and b.transports == ["tcp", "tcp"]
        a.init(model(), mode="async", optimizer="sgd", lr=0.5)
        a.push(grads(1.0))
        b.push(grads(2.0))
        over_bulk, over_streams = a.pull(), b.pull()
        expected = {k: v - 0.5 * 3.0 for k, v in model().items()}
        for name, value in expected.items():
            assert torch.equal(over_bulk[name], over_streams[name]), name
            torch.testing.assert_close(over_bulk[name], value)
        assert a.transports == ["bulk", "bulk"]  # no call fell back


def module_of(grad: float) -> torch.nn.Module:
    """The model as a module whose gradients are all ``grad``."""
    module = torch.nn.Module()
    for name, value in model().items():
        module.register_parameter(name, torch.nn.Parameter(value))
        module.get_parameter(name).grad = torch.full_like(value, grad)
    return module


def test_a_sync_step_over_bulk_waits_for_the_barrier_and_applies_the_mean(shared_servers):
    modules = {"a": module_of(1.0), "b": module_of(3.0)}
    with (
        Client(shared_servers, job_id="sync", worker_id="a", config=BULK) as a,
        Client(shared_servers, job_id="sync", worker_id="b", config=BULK) as b,
    ):
        for c in (a, b):
            c.init(model(), mode="sync", optimizer="sgd", lr=1.0, workers=("a", "b"))
        first = threading.Thread(target=a.push_pull_into, args=(modules["a"],))
        first.start()  # waits at the barrier for b
        b.push_pull_into(modules["b"])
        first.join(30)
        assert not first.is_alive()
        assert a.transports == b.transports == ["bulk", "bulk"]
        assert [s.version for s in a.status()] == [1, 1]  # one update: the mean
    for name, value in model().items():
        torch.testing.assert_close(modules["a"].get_parameter(name).detach(), value - 2.0)
        assert torch.equal(modules["a"].get_parameter(name), modules["b"].get_parameter(name))


@pytest.mark.parametrize("then", ["ended", "a bigger job"])
def test_a_refused_bulk_call_raises_what_the_grpc_call_raises(shared_servers, then):
    errors = []
    for config in (BULK, STREAMS):
        with (
            Client(shared_servers, job_id="refused", worker_id="owner", config=BULK) as owner,
            Client(shared_servers, job_id="refused", worker_id="x", config=config) as c,
        ):
            owner.init(model(), mode="async", optimizer="sgd", lr=0.5)
            c.init(model(), mode="async", optimizer="sgd", lr=0.5)  # the same job: joins it
            assert c.transports == (["bulk", "bulk"] if config is BULK else ["tcp", "tcp"])
            c.push(grads(1.0))  # this client takes part
            owner.end_job()
            if then == "a bigger job":  # the same id, another model with a bigger share
                with Client(shared_servers, job_id="refused", worker_id="n") as new:
                    new.init({"x": torch.zeros(60_000)}, optimizer="sgd", lr=0.5)
            with pytest.raises(PSError) as info:
                c.push(grads(1.0))  # this client's job was ended
            errors.append((type(info.value), info.value.code, info.value.reason))
        with Client(shared_servers, job_id="refused", worker_id="ender") as ender:
            ender.end_job()
    assert errors[0] == errors[1] and errors[0][1] == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------- the wire


def bulk_port(address: str, config: ClientConfig = BULK) -> int:
    with Client([address], config=config) as c:
        return c.status()[0].bulk_port


def connect(port: int, token: str | None = None) -> socket.socket:
    """A raw connection through the handshake, proving ``token``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    bulk.recv_magic(sock)
    hello = bulk.recv_frame(sock, ps_pb2.BulkHello)
    bulk.send_magic(sock)
    bulk.send_frame(sock, ps_pb2.BulkAuth(mac=bulk.mac(token, hello.nonce)))
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (reads to the end)."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


def test_the_token_is_proved_not_sent_and_a_wrong_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PS_TOKEN", TOKEN)
    with servers(1, tmp_path) as (daemon,):
        port = bulk_port(daemon.address)
        for token, why in ((None, "no token"), ("guess", "a wrong token")):
            with connect(port, token) as sock:
                answer = bulk.recv_frame(sock, ps_pb2.BulkReply)
                assert answer.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
                assert answer.message == f"bulk: {why}" and closed(sock)
        with connect(port, TOKEN) as sock:
            assert bulk.recv_frame(sock, ps_pb2.BulkReply).code == 0
        with Client([daemon.address], job_id="t", config=BULK) as c:  # the token from $PS_TOKEN
            c.init(model(), optimizer="sgd", lr=1.0)
            c.push(grads(1.0))
            assert c.transports == ["bulk"]
            torch.testing.assert_close(c.pull()["b"], model()["b"] - 1.0)


def hostile(sock: socket.socket, what: str) -> None:
    """Send one kind of garbage on a connection that passed the handshake."""
    assert bulk.recv_frame(sock, ps_pb2.BulkReply).code == 0
    if what == "a huge frame":
        sock.sendall(struct.pack("<I", bulk.MAX_FRAME_BYTES + 1))
    elif what == "a malformed frame":
        sock.sendall(struct.pack("<I", 8) + b"\xff" * 8)
    elif what == "more data than the share":
        request = ps_pb2.BulkRequest(push=ps_pb2.PushHeader(job_id="h"), data_bytes=1 << 40)
        bulk.send_frame(sock, request)
        reply = bulk.recv_frame(sock, ps_pb2.BulkReply)
        assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
    elif what == "half a request":
        request = ps_pb2.BulkRequest(push=ps_pb2.PushHeader(job_id="h"), data_bytes=64)
        bulk.send_frame(sock, request)
        sock.sendall(b"\0" * 10)
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(
    "what", ["a huge frame", "a malformed frame", "more data than the share", "half a request"]
)
def test_a_hostile_connection_is_closed_and_changes_nothing(shared_servers, what):
    with Client(shared_servers[:1], job_id="h", worker_id="good", config=BULK) as good:
        good.init(model(), mode="async", optimizer="sgd", lr=1.0)
        version = good.status()[0].version
        port = good.status()[0].bulk_port
        with connect(port) as sock:
            hostile(sock, what)
            assert closed(sock)
        assert good.status()[0].version == version  # nothing applied
        good.push(grads(1.0))  # the server and its other clients go on
        assert good.transports == ["bulk"] and good.status()[0].version == version + 1


def test_a_wrong_size_is_refused_and_the_connection_goes_on(shared_servers):
    with Client(shared_servers[:1], job_id="size", worker_id="good", config=BULK) as good:
        good.init(model(), mode="async", optimizer="sgd", lr=1.0)
        port = good.status()[0].bulk_port
        with connect(port) as sock:
            assert bulk.recv_frame(sock, ps_pb2.BulkReply).code == 0
            header = ps_pb2.PushHeader(job_id="size", worker_id="bad", clock=1)
            for _ in range(2):  # refused, and the connection still in step
                bulk.send_frame(sock, ps_pb2.BulkRequest(push=header, data_bytes=64))
                sock.sendall(b"\0" * 64)
                reply = bulk.recv_frame(sock, ps_pb2.BulkReply)
                assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert "bytes of data for a push" in reply.message
        assert good.status()[0].version == 0


def test_a_server_without_bulk_is_reached_over_streams(tmp_path):
    with (
        servers(1, tmp_path, "--bulk-port", "none") as (daemon,),
        Client([daemon.address], job_id="x", config=BULK) as c,
    ):
        assert c.status()[0].bulk_port == 0
        assert c.transports == ["tcp"]


def test_a_port_that_refuses_falls_back_to_streams_then_learns_the_new_one(shared_servers):
    with Client(shared_servers[:1], job_id="fallback", worker_id="w", config=BULK) as c:
        c.init(model(), mode="async", optimizer="sgd", lr=1.0)
        bulk = c._router.routes[0].bulk
        assert bulk is not None
        real = bulk.where
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead = replace(real, port=s.getsockname()[1])
        bulk.where = dead
        bulk._where_now = lambda: dead  # as if the server said so (restarted, not back)
        c.push(grads(1.0))  # over streams, not lost
        assert c.status()[0].version == 1 and not bulk.usable  # streams for a while,
        assert c.transports == ["tcp"]  # and said so
        del bulk._where_now
        bulk.retry_at = 0.0
        c.push(grads(1.0))  # refused again: the port is asked of the server, then used
        assert c.status()[0].version == 2 and c.transports == ["bulk"]
        assert bulk.where == real and bulk._idle  # a connection, kept for reuse


def test_a_server_back_without_bulk_is_left_to_streams_for_minutes(shared_servers):
    with Client(shared_servers[:1], job_id="off", worker_id="w", config=BULK) as c:
        c.init(model(), mode="async", optimizer="sgd", lr=1.0)
        bulk = c._router.routes[0].bulk
        with socket.socket() as s:  # its old port: nothing listens there now
            s.bind(("127.0.0.1", 0))
            bulk.where = replace(bulk.where, port=s.getsockname()[1])
        bulk._where_now = lambda: replace(bulk.where, port=0)  # restarted, --bulk-port none
        c.push(grads(1.0))  # over streams
        assert c.status()[0].version == 1 and c.transports == ["tcp"]
        assert bulk.retry_at - time.monotonic() > MAX_RETRY_S / 2  # not asked again soon


def test_a_port_that_greets_as_another_server_is_not_used(shared_servers):
    """Server 0's bulk port taken by server 1 (say server 0 restarted on a new port): the
    client must not send server 0's share there."""
    with (
        Client(shared_servers, job_id="wrong", worker_id="w", config=BULK) as c,
        Client(shared_servers, job_id="wrong", worker_id="r", config=STREAMS) as reader,
    ):
        c.init(model(), mode="async", optimizer="sgd", lr=1.0)
        first, second = (r.bulk for r in c._router.routes)
        first.drop()
        first.where = replace(first.where, port=second.where.port)  # another server's port
        c.push(grads(1.0))
        assert first.where.port == c.status()[0].bulk_port  # learned anew from Status
        assert [s.version for s in c.status()] == [1, 1]
        weights = reader.pull()
    for name, value in model().items():
        torch.testing.assert_close(weights[name], value - 1.0)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_server_on_ipv6_serves_bulk_there(tmp_path):
    argv = [str(BIN / "ps-server"), "--host", "[::1]", "--port", "0"]
    daemon = Daemon(argv, tmp_path / "server.log")
    try:
        with Client([daemon.address], job_id="v6", config=BULK) as c:
            c.init(model(), mode="async", optimizer="sgd", lr=1.0)
            c.push(grads(1.0))
            assert c.transports == ["bulk"] and c.status()[0].version == 1
    finally:
        daemon.stop()


def test_a_client_gone_while_its_pull_waits_stops_waiting(shared_servers):
    """A sync pull waiting at the barrier, its connection closed (a killed worker): the
    server stops waiting for it at once, as gRPC cancels a call, so it holds nothing."""
    with Client(shared_servers[:1], job_id="gone", worker_id="b", config=BULK) as c:
        c.init(model(), mode="sync", optimizer="sgd", lr=1.0, workers=("a", "b"))
        state = ProtocolState("gone", "a", 1, session="killed")
        with connect(c.status()[0].bulk_port) as sock:
            assert bulk.recv_frame(sock, ps_pb2.BulkReply).code == 0
            request = ps_pb2.BulkRequest(pull=state.pull_request(0), timeout_s=60)
            request.pull.min_version = 1  # the step after this one: it waits
            bulk.send_frame(sock, request)
            wait_until(lambda: c.status()[0].waiting, "the pull to wait")
        wait_until(lambda: not c.status()[0].waiting, "the closed pull to stop waiting", 10)


# ------------------------------------------------------------------ deadlines


def test_a_slow_sender_gets_the_whole_deadline_not_one_per_read():
    here, there = socket.socketpair()
    with here, there:

        def trickle() -> None:
            for _ in range(8):
                with contextlib.suppress(OSError):
                    there.send(b"x")
                time.sleep(0.1)  # a byte every 0.1 s: each read is quick, the whole is not

        sender = threading.Thread(target=trickle)
        sender.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            bulk.recv_exact(here, memoryview(bytearray(8)), started + 0.35)
        sender.join()


@pytest.fixture
def plane():
    """A bulk data plane in this process, with no service (for the handshake)."""
    served = BulkPlane(BulkConfig("127.0.0.1"), TOKEN, None)
    loop = asyncio.new_event_loop()
    served.serve(None, loop)
    yield served
    served.close()
    loop.close()


def test_a_handshake_too_slow_is_closed_at_its_deadline(monkeypatch, plane):
    monkeypatch.setattr(bulk, "HANDSHAKE_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", plane.port), timeout=10) as sock:
        bulk.recv_magic(sock)  # the server's hello; then nothing from this client
        assert closed(sock)


def test_a_proof_of_the_token_too_big_is_closed_at_once(plane):
    with socket.create_connection(("127.0.0.1", plane.port), timeout=5) as sock:
        bulk.recv_magic(sock)
        bulk.recv_frame(sock, ps_pb2.BulkHello)
        bulk.send_magic(sock)
        sock.sendall(struct.pack("<I", bulk.MAX_AUTH_BYTES + 1))  # nothing read beyond this
        assert closed(sock)  # (well before the handshake's 10 s)


def test_accepting_goes_on_after_running_out_of_file_descriptors():
    plane = BulkPlane(BulkConfig("127.0.0.1"), None, None)
    real = plane.listener
    failures = [OSError(errno.EMFILE, "Too many open files")]

    class Listener:  # the real one, whose first accept fails
        def accept(self):
            if failures:
                raise failures.pop()
            return real.accept()

        def __getattr__(self, name):
            return getattr(real, name)

    plane.listener = Listener()
    loop = asyncio.new_event_loop()
    try:
        plane.serve(None, loop)
        with socket.create_connection(("127.0.0.1", plane.port), timeout=10) as sock:
            bulk.recv_magic(sock)
            assert bulk.recv_frame(sock, ps_pb2.BulkHello).nonce
        assert not failures
    finally:
        plane.close()
        loop.close()
