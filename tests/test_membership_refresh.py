"""The scheduler sends the servers' membership again while it stays the same: a server
restarted on a checkpoint taken before the last change comes back with the old membership.

Trap (found across hosts): a worker was declared dead and taken out of the membership just
after a server's checkpoint; the server, killed and restarted on it, had the dead worker
as a member again, and the sync barrier waited for it for ever, because the scheduler
sent a membership only when it changed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from protos.security import ClientSecurity
from ps_worker import Client
from scheduler.service import REFRESH_S, ServerMembership

pytestmark = pytest.mark.integration


def active(addresses: list[str]) -> set[str]:
    with Client(addresses, job_id="refresh") as observer:
        (status,) = observer.status()
    return {w.worker_id for w in status.workers if w.active}


@pytest.mark.timeout(60)
def test_a_server_that_came_back_with_an_old_membership_gets_the_current_one(shared_servers):
    addresses = shared_servers[:1]
    with Client(addresses, job_id="refresh", worker_id="w0") as client:
        client.init(torch.nn.Linear(2, 1), mode="sync")
    now = [0.0]

    async def scenario() -> list[set[str]]:
        membership = ServerMembership(tuple(addresses), "refresh", ClientSecurity(), lambda: now[0])
        seen = []
        try:
            assert await membership.sync(frozenset({"w0"}))
            seen.append(active(addresses))
            # The server as a restart on an older checkpoint leaves it: w1 a member again.
            stale = ServerMembership(tuple(addresses), "refresh", ClientSecurity())
            assert await stale.sync(frozenset({"w0", "w1"}))
            await stale.close()
            seen.append(active(addresses))
            assert await membership.sync(frozenset({"w0"}))  # within REFRESH_S: not sent
            seen.append(active(addresses))
            now[0] += REFRESH_S
            assert await membership.sync(frozenset({"w0"}))
            seen.append(active(addresses))
        finally:
            await membership.close()
        return seen

    assert asyncio.run(scenario()) == [{"w0"}, {"w0", "w1"}, {"w0", "w1"}, {"w0"}]
