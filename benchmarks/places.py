"""Where each process of a benchmark runs: all on loopback, or each on a host of its own
(:mod:`benchmarks.hosts`), the first (the client, rank 0) in this namespace and the others
in hosts 0, 1, ...: so every byte between two of them crosses the bridge."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.hosts import Hosts, enter

KINDS = ("loopback", "netns")  # --hosts


@dataclass(frozen=True)
class Place:
    """A process's namespace (None: this one), the address it listens on, and its network
    interface (for gloo and TensorPipe, which pick one by name)."""

    netns: str | None = None
    address: str = "127.0.0.1"
    ifname: str = "lo"

    def enter(self) -> None:
        """Move this process there (a spawned child's first act)."""
        if self.netns is not None:
            enter(self.netns)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as run there (the same process id)."""
        if self.netns is None:
            return argv
        return ["ip", "netns", "exec", self.netns, *argv]


def loopback(n: int) -> list[Place]:
    return [Place()] * n


def across(hosts: Hosts) -> list[Place]:
    """This namespace (over the launcher's link), then one place per host."""
    here = Place(None, hosts.launcher_address, hosts.launcher_link)
    return [here, *(Place(h.netns, h.address, h.ifname) for h in hosts.hosts)]
