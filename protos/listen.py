"""Where a daemon listens: its ``--host`` and ``--port``, and a failed bind said in words.

ps-server and ps-scheduler take the same two flags (and ``PS_HOST``/``PS_PORT``);
gRPC's own bind error does not say "in use", so the daemons check first.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket

HOST_ENV, PORT_ENV = "PS_HOST", "PS_PORT"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--host`` and ``--port``, defaulting to ``$PS_HOST`` and ``$PS_PORT``."""
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV) or "127.0.0.1",
        help=f"address to listen on (default 127.0.0.1; 0.0.0.0 for every interface) "
        f"[env {HOST_ENV}]",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=os.environ.get(PORT_ENV) or "0",
        help=f"port to listen on (default 0: a free one, printed) [env {PORT_ENV}]",
    )


def address_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port already (gRPC's bind would fail on it, with a
    message that does not say so). Port 0 is never in use."""
    if port == 0:
        return False
    try:
        found = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False  # gRPC says what is wrong with the address
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(where)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def cannot_listen(daemon: str, host: str, port: int, error: object = None) -> str | None:
    """The one line a daemon prints when it cannot listen on host:port; None before a bind
    (``error`` None) when nothing is in the way."""
    if address_in_use(host, port):
        return f"{daemon}: cannot listen on {host}:{port}: address in use"
    return None if error is None else f"{daemon}: cannot listen on {host}:{port}: {error}"
