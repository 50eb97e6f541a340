"""Who may talk to the daemons: a shared token on every call, and TLS.

The token travels as ``authorization: Bearer <token>`` metadata, added by a
client interceptor and checked by a server interceptor in constant time; a
call without it, or with another, gets UNAUTHENTICATED before any handler
runs, so it changes nothing. The gRPC health service is left open so that
orchestrators can probe liveness without credentials (it reveals nothing).

TLS: a daemon given a certificate and key serves TCP over TLS; given a CA
as well, it also demands a client certificate signed by it (mutual TLS).
A same-host Unix socket stays plain (the file is readable by the daemon's
user only) but the token is still checked on it.
"""

from __future__ import annotations

import collections
import hmac
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "PS_TOKEN"
HEADER = "authorization"
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class SecurityError(ValueError):
    """Credentials that cannot be read."""


def read_token(token_file: Path | str | None = None) -> str | None:
    """The job's token: from the file if given, else $PS_TOKEN, else None (no token).

    Either is stripped of surrounding whitespace (a secret's file often ends in a newline);
    a token holding a space, a control or a non-ASCII character is refused (SecurityError),
    since it could not travel as gRPC metadata."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise SecurityError(f"cannot read the token file {token_file}: {e.strerror}") from None
        if not token:
            raise SecurityError(f"the token file {token_file} is empty")
        return _checked(token, f"the token file {token_file}")
    token = os.environ.get(TOKEN_ENV, "").strip()
    return _checked(token, f"${TOKEN_ENV}") if token else None


def _checked(token: str, where: str) -> str:
    """``token`` if every character is printable ASCII other than a space."""
    for i, ch in enumerate(token):
        if not "!" <= ch <= "~":
            raise SecurityError(
                f"{where} holds {ch!r} at character {i + 1}: a token is printable ASCII "
                f"without spaces or control characters"
            )
    return token


def _read(path: Path | str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read the {what} {path}: {e.strerror}") from None


def _load(load, what: str, *paths: Path | None) -> None:
    """``load(*paths)`` (an SSLContext loader), its errors as SecurityError."""
    try:
        load(*(str(p) for p in paths))
    except (OSError, ssl.SSLError) as e:
        raise SecurityError(f"cannot load the {what} {paths[0]}: {e}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """A daemon's side: the token it demands and its TLS material (paths)."""

    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # demand client certificates signed by this CA

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("TLS needs both a certificate and its key")
        if self.tls_client_ca and not self.tls_cert:
            raise SecurityError("a client CA needs the server's own certificate and key too")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS for the bulk data plane's connections (None: plain TCP)."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _load(context.load_cert_chain, "TLS certificate", self.tls_cert, self.tls_key)
        if self.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            _load(context.load_verify_locations, "client CA", self.tls_client_ca)
        return context

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.token)] if self.token else []

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for TCP ports, or None for plain TCP."""
        if not self.tls_cert:
            return None
        ca = _read(self.tls_client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ClientSecurity:
    """A client's side: the token it sends and the TLS material it uses (paths)."""

    token: str | None = None
    tls_ca: Path | None = None  # verify servers against this CA (TLS on)
    tls_cert: Path | None = None  # present this certificate (mutual TLS)
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("a client certificate needs its key too")
        if self.tls_cert and not self.tls_ca:
            raise SecurityError("a client certificate is only sent over TLS: give --tls-ca")

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _read(self.tls_ca, "TLS CA"),
            _read(self.tls_key, "TLS key"),
            _read(self.tls_cert, "TLS certificate"),
        )

    def channel(self, address: str, options: list) -> grpc.Channel:
        """A channel to address with this security: TLS for TCP when configured, the token
        on every call."""
        if self.tls_ca and not address.startswith("unix:"):
            channel = grpc.secure_channel(address, self._credentials(), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, TokenClientInterceptor(self.token))
        return channel

    def aio_channel(self, address: str, options: list) -> grpc.aio.Channel:
        """The same for asyncio callers, which pass :meth:`metadata` on each call."""
        if self.tls_ca and not address.startswith("unix:"):
            return grpc.aio.secure_channel(address, self._credentials(), options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS for the bulk data plane's connections (None: plain TCP)."""
        if not self.tls_ca:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        _load(context.load_verify_locations, "TLS CA", self.tls_ca)
        if self.tls_cert:
            _load(context.load_cert_chain, "TLS certificate", self.tls_cert, self.tls_key)
        return context

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((HEADER, f"Bearer {self.token}"),) if self.token else ()


def add_arguments(parser, serves: bool, connects: bool) -> None:
    """The token and TLS flags of a daemon that serves and/or connects to others."""
    env = os.environ.get
    parser.add_argument(
        "--token-file",
        type=Path,
        default=env("PS_TOKEN_FILE") or None,
        help=f"file holding the job's shared token (or set ${TOKEN_ENV})",
    )
    if serves or connects:
        parser.add_argument(
            "--tls-cert",
            type=Path,
            default=env("PS_TLS_CERT") or None,
            help="certificate (PEM): served over TLS"
            + (", and shown to servers that demand one" if serves and connects else "")
            if serves
            else "client certificate (PEM) for servers that demand one",
        )
        parser.add_argument(
            "--tls-key", type=Path, default=env("PS_TLS_KEY") or None, help="its key (PEM)"
        )
    if serves:
        parser.add_argument(
            "--tls-client-ca",
            type=Path,
            default=env("PS_TLS_CLIENT_CA") or None,
            help="demand client certificates signed by this CA (mutual TLS)",
        )
    if connects:
        parser.add_argument(
            "--tls-ca",
            type=Path,
            default=env("PS_TLS_CA") or None,
            help="CA to verify the daemons this one connects to (turns TLS on for them)",
        )


def server_security(args) -> ServerSecurity:
    """ServerSecurity from parsed flags (files are read here, so bad paths fail early)."""
    security = ServerSecurity(
        read_token(args.token_file), args.tls_cert, args.tls_key, args.tls_client_ca
    )
    security.credentials()
    return security


def client_security(args) -> ClientSecurity:
    """ClientSecurity from parsed flags; a daemon's own certificate goes with it under TLS."""
    ca = getattr(args, "tls_ca", None)
    cert, key = (args.tls_cert, args.tls_key) if ca else (None, None)
    return ClientSecurity(read_token(args.token_file), ca, cert, key)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that does not carry the token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        sent = next((v for k, v in details.invocation_metadata or () if k == HEADER), None)
        if sent is not None and hmac.compare_digest(_bytes(sent), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        why = "no token" if sent is None else "a wrong token"
        return None if handler is None else _refusal(handler, f"the call carries {why}")


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that reads nothing and answers UNAUTHENTICATED."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield b""  # never reached: makes this an async generator

    if handler.response_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(refuse_stream)
    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(refuse)


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = (HEADER, f"Bearer {token}")

    def _with_token(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _Details(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)
