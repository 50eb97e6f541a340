"""One server's connection: its channel, and calls with deadlines and retries."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from protos import rpc
from protos.codec import CodecError
from protos.security import ClientSecurity
from ps_worker.errors import PSError
from ps_worker.retry import RETRYABLE, RetryPolicy, call_with_retry

T = TypeVar("T")


class Link:
    """The channel to one server: its TCP address, or its Unix socket on this host.

    ``on_lost`` is called when calls over the Unix socket keep failing (a restarted
    server listens on a new one): it reconnects, and the call is tried once more.
    """

    def __init__(
        self,
        address: str,
        security: ClientSecurity,
        policy: RetryPolicy,
        on_lost: Callable[[Link], None],
    ) -> None:
        self.address = address
        self.kind = "tcp"  # or "unix"
        self._security = security
        self._policy = policy
        self._on_lost = on_lost
        self.channel = self._open(address)
        self.calls = rpc.calls(self.channel)

    def connect(self, target: str, kind: str) -> None:
        """Use a new channel to ``target`` from now on (``kind``: "tcp" or "unix")."""
        old = self.channel
        self.channel = self._open(target)
        self.calls, self.kind = rpc.calls(self.channel), kind
        old.close()

    def call(self, what: str, call: Callable[[rpc.Calls, float], T], timeout_s: float) -> T:
        """``call(calls, timeout)`` with retries; the typed PSError if it fails for good."""

        def attempt() -> T:
            return call_with_retry(
                lambda t: call(self.calls, t),
                timeout_s,
                self._policy,
                f"server {self.address}",
                what,
                decode_errors=(CodecError,),
            )

        try:
            return attempt()
        except PSError as e:
            if self.kind != "unix" or e.code not in RETRYABLE:
                raise
        self._on_lost(self)
        return attempt()

    def close(self) -> None:
        """Cancels calls in flight."""
        self.channel.close()

    def _open(self, target: str) -> grpc.Channel:
        return self._security.channel(target, rpc.channel_options())
