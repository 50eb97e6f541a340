"""Room for streamed pulls: the encoded weights they hold until their clients read them.

A streamed Pull encodes all its frames before it sends the first (so that a push applied
while the client reads cannot tear it), and holds them until the client has read them.
Many slow readers would hold a copy of the server's share each; the room bounds what they
hold together. A pull that does not fit waits for room (one pull always fits), up to its
deadline, and is then refused as UNAVAILABLE, which clients retry with backoff.
"""

from __future__ import annotations

import asyncio

PULL_ROOM_BYTES = 1 << 30  # encoded pulls a server holds at once


class PullRoom:
    """Bytes reserved by the streamed pulls in flight, within a budget."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = PULL_ROOM_BYTES if budget is None else budget
        self.held = 0
        self._freed = asyncio.Event()

    async def reserve(self, need: int, wait_s: float) -> bool:
        """Reserve ``need`` bytes, waiting up to ``wait_s`` for room; False if none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, 0.0)
        while self.held and self.held + need > self.budget:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), deadline - loop.time())
            except (TimeoutError, asyncio.TimeoutError):
                return False
        self.held += need
        return True

    def release(self, need: int) -> None:
        """Give back what :meth:`reserve` took (safe in a cancelled task: no await)."""
        self.held -= need
        self._freed.set()
