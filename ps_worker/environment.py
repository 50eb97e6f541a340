"""What a worker process learns from its environment, as torchrun and Horovod set it.

The same script then runs under ``ps-cluster``, compose, Kubernetes or by hand:

- ``PS_SERVERS``: the parameter servers, ``HOST:PORT,HOST:PORT`` (the variable
  ``ps-scheduler`` reads for its ``--servers``: one spelling);
- ``RANK`` and ``WORLD_SIZE``: this process's index and the number of worker
  processes (torchrun's names); rank ``r`` works as worker ``worker<r>``;
- ``PS_TOKEN``: the job's token (:data:`protos.security.TOKEN_ENV`).

Values given in code win over the environment. Bad values are an
:class:`~ps_worker.errors.InvalidRequestError` (a ``ValueError``) naming the variable.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping, Sequence

from protos.jobspec import variable_of
from protos.security import ClientSecurity, read_token
from ps_worker.errors import InvalidRequestError

SERVERS_ENV = variable_of("servers")  # PS_SERVERS, as ps-scheduler reads it
RANK_ENV = "RANK"
WORLD_ENV = "WORLD_SIZE"

Environ = Mapping[str, str]


def worker_name(rank: int) -> str:
    """The worker id of rank ``rank``: ``worker0``, ``worker1``, ..."""
    return f"worker{rank}"


def unique_worker_id() -> str:
    """Unique per process incarnation: a restarted worker is a new worker."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def servers(given: str | Sequence[str] | None = None, env: Environ | None = None) -> list[str]:
    """The server addresses: ``given`` (a list, or one comma-separated string), else
    ``$PS_SERVERS``; an error if there are none or one is not ``HOST:PORT``."""
    env = os.environ if env is None else env
    source = "servers"
    if given is None:
        if SERVERS_ENV not in env:
            raise InvalidRequestError(
                f"no parameter servers: pass servers=[...] or set {SERVERS_ENV}=HOST:PORT,..."
            )
        given, source = env[SERVERS_ENV], SERVERS_ENV
    items = given.split(",") if isinstance(given, str) else list(given)
    if not all(isinstance(a, str) for a in items):
        raise InvalidRequestError(f"{source} must be HOST:PORT addresses, got {given!r}")
    addresses = [a.strip() for a in items]
    if not any(addresses):
        raise InvalidRequestError(f"{source} is empty: give at least one HOST:PORT")
    for a in addresses:
        if why := _bad_address(a):
            raise InvalidRequestError(f"{source} {given!r}: {a!r} {why}")
    return addresses


def _bad_address(address: str) -> str | None:
    """Why ``address`` is not ``HOST:PORT`` (an IPv6 host in brackets), or None."""
    host, colon, port = address.rpartition(":")
    if "://" in address:
        return "is not HOST:PORT (give no scheme such as http://)"
    if not colon or not host or not port or any(c.isspace() for c in address):
        return "is not HOST:PORT"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "is not HOST:PORT (an IPv6 host goes in brackets: [::1]:7001)"
    if not _ascii_digits(port) or not 1 <= int(port) <= 65535:
        return f"has port {port!r}: a port is a whole number from 1 to 65535"
    return None


def _ascii_digits(text: str) -> bool:
    """Only 0-9 (``int()`` also takes ``1_0`` and other scripts' digits)."""
    return bool(text) and all("0" <= c <= "9" for c in text)


def _whole(value: int | None, argument: str, variable: str, env: Environ) -> tuple[int | None, str]:
    """``value``, else ``$variable`` read as a whole number; and the name it came by."""
    if value is not None:
        return value, argument
    text = env.get(variable, "").strip()
    if not text:
        return None, variable
    if not _ascii_digits(text.removeprefix("-")):
        raise InvalidRequestError(f"{variable}={text} is not a whole number")
    return int(text), variable


def rank_and_world(
    rank: int | None = None, world: int | None = None, env: Environ | None = None
) -> tuple[int | None, int | None]:
    """This process's rank and the world size: given, else ``$RANK`` and ``$WORLD_SIZE``;
    (None, None) when neither is known. Both or neither, with ``0 <= rank < world``."""
    env = os.environ if env is None else env
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (rank, world) if v is not None):
        raise InvalidRequestError(f"rank {rank!r} and world {world!r} must be whole numbers")
    rank, rank_name = _whole(rank, "rank", RANK_ENV, env)
    world, world_name = _whole(world, "world", WORLD_ENV, env)
    if rank is None and world is None:
        return None, None
    rule = "give both, with 0 <= rank < world"
    if rank is None:
        raise InvalidRequestError(f"{world_name} {world} without a rank: {rule}")
    if world is None:
        raise InvalidRequestError(f"{rank_name} {rank} without a world size: {rule}")
    if world < 1:
        raise InvalidRequestError(f"{world_name} {world} < 1: {rule}")
    if rank < 0:
        raise InvalidRequestError(f"{rank_name} {rank} < 0: {rule}")
    if rank >= world:
        raise InvalidRequestError(f"{rank_name} {rank} >= {world_name} {world}: {rule}")
    return rank, world


def worker_id(given: str | None = None, env: Environ | None = None) -> str:
    """``given``, else ``worker<RANK>`` when ``$RANK`` is set (checked against
    ``$WORLD_SIZE`` when that is set too), else a unique id."""
    if given:
        return given
    env = os.environ if env is None else env
    rank, _ = _whole(None, "rank", RANK_ENV, env)
    world, _ = _whole(None, "world", WORLD_ENV, env)
    if rank is None:
        return unique_worker_id()
    if world is not None:
        rank_and_world(env=env)  # 0 <= RANK < WORLD_SIZE
    if rank < 0:
        raise InvalidRequestError(f"{RANK_ENV} {rank} < 0: a rank is a whole number >= 0")
    return worker_name(rank)


def security() -> ClientSecurity:
    """No TLS, and the token from ``$PS_TOKEN`` if set (what a client uses unless told)."""
    return ClientSecurity(token=read_token())
