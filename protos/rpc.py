"""How the ParameterServer service is called: method paths, serializers, channel options.

Status, SetMembership, Leave and EndJob use the generated protobuf classes. Init, Push,
Pull and Step carry tensor data: their stream messages travel as raw bytes, written
and read by :func:`protos.codec.encode_frames` / :func:`protos.codec.decode_frame`
(still valid protobuf for the same .proto, so any protobuf client can talk
to the server), which saves the copies protobuf's ``bytes`` fields make.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from protos import ps_pb2

SERVICE = "ps.ParameterServer"
MAX_MESSAGE_BYTES = 64 << 20  # chunks are ~1 MiB; headroom for odd clients, never unbounded

M = TypeVar("M", bound=Message)
R = TypeVar("R")


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


RECONNECT_BACKOFF_MS = (100, 1000)  # a lost server is tried again this often: first, at most


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options shared by servers and clients: explicit message limits; and, for clients, a
    reconnect backoff of at most a second (gRPC's own grows to two minutes, so a server
    back from a restart could go untried for longer than a client's retries last)."""
    first, most = RECONNECT_BACKOFF_MS
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", first),
        ("grpc.min_reconnect_backoff_ms", first),
        ("grpc.max_reconnect_backoff_ms", most),
    ]


@dataclass(frozen=True)
class Calls:
    """The client side of every method of the service on one channel."""

    init: grpc.StreamUnaryMultiCallable
    push: grpc.StreamUnaryMultiCallable
    pull: grpc.UnaryStreamMultiCallable
    step: grpc.UnaryUnaryMultiCallable
    shm_step: grpc.UnaryUnaryMultiCallable
    set_membership: grpc.UnaryUnaryMultiCallable
    status: grpc.UnaryUnaryMultiCallable
    leave: grpc.UnaryUnaryMultiCallable
    end_job: grpc.UnaryUnaryMultiCallable


def calls(channel: grpc.Channel) -> Calls:
    return Calls(
        init=channel.stream_unary(
            method("Init"),
            request_serializer=None,
            response_deserializer=ps_pb2.InitResponse.FromString,
        ),
        push=channel.stream_unary(
            method("Push"),
            request_serializer=None,
            response_deserializer=ps_pb2.PushResponse.FromString,
        ),
        pull=channel.unary_stream(
            method("Pull"),
            request_serializer=ps_pb2.PullRequest.SerializeToString,
            response_deserializer=None,
        ),
        step=channel.unary_unary(
            method("Step"),
            request_serializer=None,
            response_deserializer=None,
        ),
        shm_step=channel.unary_unary(
            method("ShmStep"),
            request_serializer=ps_pb2.ShmStepRequest.SerializeToString,
            response_deserializer=ps_pb2.PullHeader.FromString,
        ),
        set_membership=channel.unary_unary(
            method("SetMembership"),
            request_serializer=ps_pb2.MembershipRequest.SerializeToString,
            response_deserializer=ps_pb2.MembershipResponse.FromString,
        ),
        status=channel.unary_unary(
            method("Status"),
            request_serializer=ps_pb2.StatusRequest.SerializeToString,
            response_deserializer=ps_pb2.StatusResponse.FromString,
        ),
        leave=channel.unary_unary(
            method("Leave"),
            request_serializer=ps_pb2.LeaveRequest.SerializeToString,
            response_deserializer=ps_pb2.LeaveResponse.FromString,
        ),
        end_job=channel.unary_unary(
            method("EndJob"),
            request_serializer=ps_pb2.EndJobRequest.SerializeToString,
            response_deserializer=ps_pb2.EndJobResponse.FromString,
        ),
    )


def generic_handler(servicer: object) -> grpc.GenericRpcHandler:
    """Server-side handlers for a servicer with every method of the service.

    Every request arrives as bytes and is parsed here or by the handler itself: a
    message that does not parse is INVALID_ARGUMENT ("cannot parse PullRequest: ..."),
    not the UNKNOWN gRPC's own deserializer failure gives.
    """
    s = servicer

    def unary(handler, request_type, response_type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            parsed(handler, request_type),
            request_deserializer=None,
            response_serializer=response_type.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Init": grpc.stream_unary_rpc_method_handler(
                s.Init,
                request_deserializer=None,
                response_serializer=ps_pb2.InitResponse.SerializeToString,
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                s.Push,
                request_deserializer=None,
                response_serializer=ps_pb2.PushResponse.SerializeToString,
            ),
            "Pull": grpc.unary_stream_rpc_method_handler(
                parsed_stream(s.Pull, ps_pb2.PullRequest),
                request_deserializer=None,
                response_serializer=None,
            ),
            "Step": grpc.unary_unary_rpc_method_handler(
                s.Step, request_deserializer=None, response_serializer=None
            ),
            "ShmStep": unary(s.ShmStep, ps_pb2.ShmStepRequest, ps_pb2.PullHeader),
            "SetMembership": unary(
                s.SetMembership, ps_pb2.MembershipRequest, ps_pb2.MembershipResponse
            ),
            "Status": unary(s.Status, ps_pb2.StatusRequest, ps_pb2.StatusResponse),
            "Leave": unary(s.Leave, ps_pb2.LeaveRequest, ps_pb2.LeaveResponse),
            "EndJob": unary(s.EndJob, ps_pb2.EndJobRequest, ps_pb2.EndJobResponse),
        },
    )


async def parse(request: bytes, request_type: type[M], context: grpc.aio.ServicerContext) -> M:
    """The request as a ``request_type``; INVALID_ARGUMENT if it does not parse."""
    try:
        return request_type.FromString(request)
    except DecodeError as e:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse {request_type.__name__}: {e}"
        )
        raise AssertionError("unreachable") from None  # context.abort always raises


def parsed(
    handler: Callable[[M, grpc.aio.ServicerContext], Awaitable[R]], request_type: type[M]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[R]]:
    """A unary handler of ``request_type`` as a handler of the raw request bytes."""

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> R:
        return await handler(await parse(request, request_type, context), context)

    return handle


def parsed_stream(
    handler: Callable[[M, grpc.aio.ServicerContext], AsyncIterator[R]], request_type: type[M]
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[R]]:
    """A response-streaming handler of ``request_type`` as one of the raw request bytes."""

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[R]:
        async for reply in handler(await parse(request, request_type, context), context):
            yield reply

    return handle


def new_server(
    max_message_bytes: int = MAX_MESSAGE_BYTES, interceptors: Sequence = ()
) -> grpc.aio.Server:
    """An asyncio server with explicit message limits and no SO_REUSEPORT.

    Without SO_REUSEPORT a second daemon on a taken port fails instead of
    silently sharing it.
    """
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )


async def start_with_health(
    server: grpc.aio.Server,
    address: str,
    service_name: str,
    extra: list[str] | None = None,
    credentials: grpc.ServerCredentials | None = None,
):
    """Bind (port 0 picks one; TLS with ``credentials``) and any ``extra`` Unix socket
    addresses (plain, readable by this user only), serve the health service, start.

    Returns (port, health servicer): the servicer reports SERVING for "" and
    ``service_name`` until ``enter_graceful_shutdown()``.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    for other in extra or []:
        server.add_insecure_port(other)
        path = other.removeprefix("unix:")
        if os.path.exists(path):
            os.chmod(path, 0o600)
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer
