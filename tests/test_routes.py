"""Which transport serves each server, and the fallback from shared memory, without
sockets: decided once, and by the typed reason of a refusal, never by its message."""

from __future__ import annotations

import socket
from dataclasses import replace

import grpc
import pytest
import torch

from protos import ps_pb2, rpc, status
from protos.security import ClientSecurity
from ps_worker.config import ClientConfig
from ps_worker.errors import (
    InvalidRequestError,
    PSError,
    StateError,
    WorkerIdInUseError,
    from_rpc_error,
)
from ps_worker.link import Link
from ps_worker.payload import Plan
from ps_worker.protocol import ProtocolState
from ps_worker.retry import RetryPolicy, call_with_retry
from ps_worker.routes import RENEW, STREAMS, Route, Router, after_refusal
from ps_worker.transport import SharedMemory, Streams, UnaryStep
from tests.clientkit import (
    FakeLink,
    FakeServer,
    empty_dest,
    expected,
    full_grads,
    plan_of,
    refusal,
    refused,
    rpc_error,
)

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------ fallback


def test_what_a_refused_shared_memory_step_means():
    assert after_refusal(status.SHM_UNSUPPORTED, False) == STREAMS
    assert after_refusal(status.SHM_UNSUPPORTED, True) == STREAMS
    assert after_refusal(status.SHM_SEGMENT_UNAVAILABLE, False) == STREAMS
    assert after_refusal(status.SHM_SEGMENT_UNAVAILABLE, True) == RENEW
    assert after_refusal(None, True) is None
    assert after_refusal("SOMETHING_ELSE", False) is None


def test_the_typed_reason_reaches_the_clients_error_and_the_message_does_not_count():
    error = from_rpc_error(refusal(status.SHM_SEGMENT_UNAVAILABLE), "s:1", "shm step")
    assert isinstance(error, InvalidRequestError)
    assert error.reason == status.SHM_SEGMENT_UNAVAILABLE
    assert "cannot open segment" in str(error)
    assert from_rpc_error(refusal(None), "s:1", "shm step").reason is None


def router_with(plan: Plan, fake: FakeServer, tmp_path) -> tuple[Router, Route]:
    router = Router(["fake:0"], ClientConfig())
    router.close()  # its real channel is never used
    fake.shm_dir = str(tmp_path)
    link = FakeLink(fake)
    route = Route(link, shm=SharedMemory(link, 0, str(tmp_path), 10.0, 10.0))
    router.routes = [route]
    router._chosen = True
    router.use(plan)
    return router, route


def pull_via(router: Router, plan: Plan) -> tuple[ps_pb2.PullHeader, dict[str, torch.Tensor]]:
    dest = empty_dest()
    request = ProtocolState("job", "w", 1).pull_request(0)
    return router.run(0, lambda t: t.pull(request, plan.sink(0, dest, "fake:0"))), dest


def test_a_server_that_never_opened_a_segment_gets_streams_for_good(tmp_path):
    plan = plan_of(1)
    fake = FakeServer(plan, 0)
    router, route = router_with(plan, fake, tmp_path)
    fake.refuse = [refusal(status.SHM_SEGMENT_UNAVAILABLE)]
    _, dest = pull_via(router, plan)
    expected(plan, 0, dest, 0.0)
    assert route.shm is None and router.names() == ["tcp"]
    pull_via(router, plan)
    assert fake.calls == ["shm", "pull", "pull"]
    assert list(tmp_path.iterdir()) == []


def test_a_segment_dropped_after_the_server_opened_one_is_made_anew_once(tmp_path):
    plan = plan_of(1)
    fake = FakeServer(plan, 0)
    router, route = router_with(plan, fake, tmp_path)
    pull_via(router, plan)  # the server opens this client's segment
    first = route.shm.buffers.segment.name
    fake.refuse = [refusal(status.SHM_SEGMENT_UNAVAILABLE)]
    grads = full_grads(plan, 1.0)
    header = ProtocolState("job", "w", 1).push_header(0, 1)
    assert router.run(0, lambda t: t.push(header, grads)).version == 1
    assert route.shm.buffers.segment.name != first and router.names() == ["shm"]
    assert fake.calls == ["shm", "shm", "shm"] and len(fake.opened) == 2
    fake.refuse = [refusal(status.SHM_SEGMENT_UNAVAILABLE)] * 2
    with pytest.raises(PSError, match="cannot open this client's shared-memory segment"):
        pull_via(router, plan)
    assert route.shm is not None  # and the next call makes another segment
    _, dest = pull_via(router, plan)
    expected(plan, 0, dest, 1.0)


def test_a_server_without_shared_memory_gets_streams_even_after_using_it(tmp_path):
    plan = plan_of(1)
    fake = FakeServer(plan, 0)
    router, route = router_with(plan, fake, tmp_path)
    pull_via(router, plan)
    fake.refuse = [refusal(status.SHM_UNSUPPORTED)]
    pull_via(router, plan)
    assert route.shm is None and fake.calls == ["shm", "shm", "pull"]


def test_a_refusal_without_a_reason_is_an_error_whatever_its_message(tmp_path):
    plan = plan_of(1)
    fake = FakeServer(plan, 0)
    router, route = router_with(plan, fake, tmp_path)
    fake.refuse = [refusal(None)]
    with pytest.raises(InvalidRequestError, match="cannot open segment") as info:
        pull_via(router, plan)
    assert info.value.reason is None
    assert route.shm is not None and fake.calls == ["shm"]


# -------------------------------------------------------------------- choice


SAME_HOST_OFF = ClientConfig(same_host_unix_socket=False, same_host_shared_memory=False)


def chooser(tmp_path, config: ClientConfig, **reply) -> tuple[Router, FakeLink]:
    plan = plan_of(1)
    router = Router(["fake:0"], config)
    router.close()
    link = FakeLink(FakeServer(plan, 0))
    sock = tmp_path / "ps.sock"
    sock.touch()
    (tmp_path / "shm").mkdir()
    fields = {
        "hostname": socket.gethostname(),
        "unix_socket": f"unix:{sock}",
        "shm_dir": str(tmp_path / "shm"),
    }
    fields.update(reply)
    status_reply = ps_pb2.StatusResponse(**fields)

    def status_call(request, timeout):
        link.statuses += 1
        return status_reply

    link.calls.status = status_call
    router.routes = [Route(link)]
    return router, link


def test_a_same_host_server_gets_its_unix_socket_and_shared_memory(tmp_path):
    router, link = chooser(tmp_path, ClientConfig())
    assert router.names() == ["shm"] and router.names() == ["shm"]  # chosen once
    assert link.connected == [(f"unix:{tmp_path / 'ps.sock'}", "unix")] and link.statuses == 1
    router.use(plan_of(1, compression="fp16"))  # compression is for the wire
    assert router.names() == ["unix"]


@pytest.mark.parametrize(
    ("config", "reply", "names", "unix"),
    [
        (ClientConfig(same_host_shared_memory=False), {}, ["unix"], True),
        (ClientConfig(same_host_unix_socket=False), {}, ["shm"], False),
        (ClientConfig(), {"hostname": "elsewhere"}, ["tcp"], False),
        (ClientConfig(), {"shm_dir": ""}, ["unix"], True),
        (ClientConfig(), {"unix_socket": ""}, ["shm"], False),
        (ClientConfig(), {"unix_socket": "unix:/nonexistent/ps.sock"}, ["shm"], False),
        (ClientConfig(), {"hostname": "elsewhere", "bulk_port": 7009}, ["bulk"], False),
        (ClientConfig(), {"bulk_port": 7009}, ["shm"], True),  # same host: shared memory
        (SAME_HOST_OFF, {"bulk_port": 7009}, ["bulk"], False),
        (
            ClientConfig(bulk_data_plane=False),
            {"hostname": "elsewhere", "bulk_port": 7009},
            ["tcp"],
            False,
        ),
    ],
)
def test_the_choice_follows_the_config_and_what_the_server_offers(
    tmp_path, config, reply, names, unix
):
    router, link = chooser(tmp_path, config, **reply)
    assert router.names() == names
    assert [kind for _, kind in link.connected] == (["unix"] if unix else [])


@pytest.mark.parametrize(("chunk_bytes", "kind"), [(1 << 20, UnaryStep), (64, Streams)])
def test_a_fused_step_is_one_message_where_the_share_fits_one(tmp_path, chunk_bytes, kind):
    router, _ = chooser(tmp_path, ClientConfig(chunk_bytes=chunk_bytes))
    router.use(plan_of(1))
    assert type(router.routes[0].streams) is kind


def test_a_compressing_job_never_takes_shared_memory(tmp_path):
    router, _ = chooser(tmp_path, ClientConfig())
    router.use(plan_of(1, compression="bf16"))
    assert router.names() == ["unix"]


def test_nothing_is_asked_when_same_host_paths_and_bulk_are_off(tmp_path):
    config = replace(SAME_HOST_OFF, bulk_data_plane=False)
    router, link = chooser(tmp_path, config)
    assert router.names() == ["tcp"] and link.statuses == 0


def test_a_compressing_job_never_takes_the_bulk_data_plane(tmp_path):
    router, _ = chooser(tmp_path, ClientConfig(), hostname="elsewhere", bulk_port=7009)
    assert router.names() == ["bulk"]
    router.use(plan_of(1, compression="bf16"))
    assert router.names() == ["tcp"]


def test_an_unreachable_server_stays_on_tcp(tmp_path):
    router, link = chooser(tmp_path, ClientConfig())

    def down(request, timeout):
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "down")

    link.calls.status = down
    assert router.names() == ["tcp"]


def test_a_lost_unix_socket_goes_back_to_tcp_and_chooses_again(tmp_path):
    router, link = chooser(tmp_path, ClientConfig())
    assert router.names() == ["shm"]
    shm = router.routes[0].shm
    shm.verified = True
    router._reconnect(link)
    unix = f"unix:{tmp_path / 'ps.sock'}"
    assert link.connected == [(unix, "unix"), ("fake:0", "tcp"), (unix, "unix")]
    assert router.routes[0].shm is shm and shm.verified  # the same segments, still trusted


def test_a_link_reconnects_once_when_its_unix_socket_fails():
    lost = []
    link = Link("127.0.0.1:1", ClientSecurity(), RetryPolicy(retries=0), lost.append)
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "gone")
    try:
        outcomes = [down, "ok"]

        def call(calls, timeout):
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        with pytest.raises(PSError, match="UNAVAILABLE"):
            link.call("pull", call, 5.0)  # over TCP: no reconnecting
        assert lost == []
        outcomes = [down, "ok"]
        link.kind = "unix"
        assert link.call("pull", call, 5.0) == "ok"
        assert lost == [link]
    finally:
        link.close()


def test_a_worker_id_in_use_is_its_own_error_never_retried_nor_a_fallback(tmp_path):
    """A second live client with the same worker id: the server's refusal (with its
    message) surfaces at once as WorkerIdInUseError, over shared memory as over streams."""
    message = "worker id 'w' is in use by another live client"
    in_use = refused(grpc.StatusCode.FAILED_PRECONDITION, message, status.WORKER_ID_IN_USE)
    attempts = []

    def call(timeout):
        attempts.append(timeout)
        raise in_use

    with pytest.raises(WorkerIdInUseError, match=message) as info:
        call_with_retry(call, 5.0, RetryPolicy(), "s:1", "push")
    assert isinstance(info.value, StateError) and info.value.reason == status.WORKER_ID_IN_USE
    assert len(attempts) == 1
    plan = plan_of(1)
    fake = FakeServer(plan, 0)
    router, route = router_with(plan, fake, tmp_path)
    fake.refuse = [in_use]
    with pytest.raises(WorkerIdInUseError, match=message):
        pull_via(router, plan)
    assert route.shm is not None and fake.calls == ["shm"]  # no fallback to streams


def test_a_lost_server_is_tried_again_as_often_as_a_client_retries():
    """gRPC's own reconnect backoff grows to two minutes: a server back from a restart
    would go untried while a client's retries (at most max_backoff_s apart) ran out."""
    options = dict(rpc.channel_options())
    assert options["grpc.max_reconnect_backoff_ms"] / 1000 <= RetryPolicy().max_backoff_s
    assert options["grpc.initial_reconnect_backoff_ms"] / 1000 <= RetryPolicy().max_backoff_s
