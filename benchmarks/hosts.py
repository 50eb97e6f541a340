"""Many hosts on one machine: each a Linux network namespace with its own host name and its
own address on a bridge, for the tests and benchmarks that need several hosts.

``Hosts(n)`` makes, all named after this process (``gs<pid>``):

- a switch namespace holding a bridge; per host a namespace with a veth pair, one end on the
  bridge, the other its ``eth0`` with 10.213.<net>.<i + 2>/24, and its loopback up;
- a launcher link: a veth pair from this (the root) namespace to the bridge, with .1, so the
  process that starts the daemons reaches them, as ps-cluster's launcher does. Traffic goes
  only to addresses inside the namespaces made here;
- optionally a link model on each host's ``eth0``: a token-bucket rate (``tc tbf``) and, where
  the kernel has ``sch_netem``, a delay.

A command runs on a host through :meth:`Host.wrap`: ``ip netns exec`` into its namespace and
``unshare --uts`` into a host name of its own, each ``exec`` keeping the process id, so the
launcher's child is the daemon itself. Same host name, same host: a client takes the Unix
socket and shared memory only to a server whose status names its own host name, so daemons
on different hosts here talk TCP across the bridge.

Everything is taken down on exit: each namespace's processes killed, the namespaces deleted
(their veths and the bridge with them), the launcher link deleted. What a killed run left
(names with a dead pid) goes when the next ``Hosts`` starts. Needs root and ``ip``; where
either is missing :func:`unavailable` says why, and tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.orphans import alive

PREFIX = "gs"  # gs<pid>-sw, gs<pid>-h<i>, and the launcher's link gs<pid>l
NETWORK = "10.213.{net}.0/24"
HOST_NAME = "host{index}"  # each host's UTS name
CLONE_NEWNET = 0x40000000  # setns(2): a network namespace
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:-sw|-h\d+|l)$")


class HostsError(RuntimeError):
    """A namespace, link or queueing discipline could not be made."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool!r} command"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def enter(netns: str) -> None:
    """Move the calling thread into a namespace (of a host made here): a process's first act,
    before it starts threads or opens sockets (``setns``; threads started after it follow)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise HostsError(f"cannot enter {netns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def netem_available() -> bool:
    """Whether this kernel has netem (a delay on a link); tbf (a rate) is checked on use."""
    probe = f"{PREFIX}{os.getpid()}-netem"
    _ip("netns", "add", probe)
    try:
        got = subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
            capture_output=True,
            timeout=30,
        )
        return got.returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


@dataclass(frozen=True)
class LinkModel:
    """Each host's link: a rate (``tc tbf``) and a one-way delay (``netem``), either unset."""

    rate_gbit: float | None = None
    delay_us: float | None = None

    def qdisc(self) -> list[str]:
        """The ``tc qdisc add ... root`` arguments after ``root``, or [] for none."""
        if self.delay_us is not None:
            rate = [] if self.rate_gbit is None else ["rate", f"{self.rate_gbit}gbit"]
            return ["netem", "delay", f"{self.delay_us:g}us", *rate]
        if self.rate_gbit is not None:
            # A bucket of 1 ms at the rate, at least 64 KiB; packets queue up to 10 ms.
            burst = max(64 << 10, int(self.rate_gbit * 1e9 / 8 / 1000))
            return ["tbf", "rate", f"{self.rate_gbit}gbit", "burst", str(burst), "latency", "10ms"]
        return []

    def __str__(self) -> str:
        parts = [f"{self.rate_gbit:g} Gbit/s"] if self.rate_gbit else []
        parts += [f"{self.delay_us:g} us"] if self.delay_us is not None else []
        return ", ".join(parts) or "unshaped"


@dataclass
class Host:
    """One host: a namespace, a host name and an address."""

    index: int
    netns: str
    name: str
    address: str
    ifname: str = "eth0"  # its link to the bridge

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host (the same process id: every step execs)."""
        enter = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--"]
        return [*enter, "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> list[int]:
        """SIGKILL every process on this host (a host that dies); the pids killed."""
        return _kill(self.pids())

    def cut(self) -> None:
        """Take this host's link down: a network partition of this host from the rest."""
        _ip("-n", self.netns, "link", "set", "eth0", "down")

    def restore(self) -> None:
        """Bring the link back (its address and routes come back with it)."""
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", self.netns, "route", "replace", self.network(), "dev", "eth0")

    def network(self) -> str:
        return str(ipaddress.ip_interface(self.address + "/24").network)


@dataclass
class Hosts:
    """``n`` hosts on a bridge, reachable from this process; a context manager."""

    n: int
    link: LinkModel = field(default_factory=LinkModel)
    hosts: list[Host] = field(default_factory=list)
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    launcher_address: str = ""

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    @property
    def launcher_link(self) -> str:
        """This (the root) namespace's link to the bridge, with :attr:`launcher_address`."""
        return f"{self.tag}l"

    def _make(self) -> None:
        sweep()
        net = ipaddress.ip_network(NETWORK.format(net=_free_net()))
        first, *_ = net.hosts()
        self.launcher_address = str(first)
        _ip("netns", "add", self.switch)
        self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "ip", "link", "set", "br0", "up")
        # The launcher's link: <tag>l here, "launcher" on the bridge.
        link = self.launcher_link
        _ip("link", "add", link, "type", "veth", "peer", "name", "launcher", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", "launcher", "master", "br0", "up")
        _ip("addr", "add", f"{first}/{net.prefixlen}", "dev", link)
        _ip("link", "set", link, "up")
        for i in range(self.n):
            address = str(net.network_address + i + 2)
            host = Host(i, f"{self.tag}-h{i}", HOST_NAME.format(index=i), address)
            _ip("netns", "add", host.netns)
            peer = f"h{i}"
            _ip(
                "link",
                "add",
                peer,
                "netns",
                self.switch,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            )
            _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            self._in(host.netns, "ip", "link", "set", "lo", "up")
            self._in(host.netns, "ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
            self._in(host.netns, "ip", "link", "set", "eth0", "up")
            if self.link.qdisc():
                self._in(
                    host.netns, "tc", "qdisc", "add", "dev", "eth0", "root", *self.link.qdisc()
                )
            self.hosts.append(host)

    @staticmethod
    def _in(netns: str, *argv: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise HostsError(f"{' '.join(argv)} in {netns}: {result.stderr.strip()}")

    def close(self) -> None:
        """Kill every process on every host, then delete the namespaces and the link."""
        remove(self.tag)
        self.hosts = []


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove(tag: str) -> None:
    """Everything named ``tag``: processes in its namespaces killed, namespaces and link gone."""
    for netns in [n for n in _namespaces() if n.startswith(f"{tag}-")]:
        _kill([int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()])
        _ip("netns", "del", netns, check=False)
    _ip("link", "del", f"{tag}l", check=False)


def _kill(pids: list[int]) -> list[int]:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def sweep() -> list[str]:
    """Remove what runs killed before they tore down left: names whose pid is dead."""
    tags = set()
    links = _ip("-o", "link", "show", check=False).stdout
    names = _namespaces() + [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", links, re.M)]
    for name in names:
        match = _NAME.match(name)
        if match and not alive(int(match.group(1))):
            tags.add(f"{PREFIX}{match.group(1)}")
    for tag in sorted(tags):
        remove(tag)
    return sorted(tags)


def _free_net() -> int:
    """A third octet for 10.213.X.0/24 that no route of this namespace covers."""
    routes = _ip("-4", "route", "show", "table", "all", check=False).stdout
    taken = [
        ipaddress.ip_network(word, strict=False)
        for word in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", routes)
    ]
    start = os.getpid() % 250
    for k in range(250):
        candidate = ipaddress.ip_network(NETWORK.format(net=(start + k) % 250))
        if not any(candidate.overlaps(t) for t in taken if t.prefixlen > 0):
            return (start + k) % 250
    raise HostsError("no free 10.213.X.0/24 network here")


def spread(hosts: Hosts, servers: int) -> Callable[[str, int], Host]:
    """A placement for scheduler.local.LocalCluster: the scheduler on host 0, server i on
    host 1 + i, the workers round robin over the hosts after them (a restarted or replacing
    process on the host of the one it replaces)."""
    rest = hosts.hosts[1 + servers :]
    if not rest:
        raise HostsError(f"{len(hosts)} hosts: none left for workers after {servers} servers")

    def place(role: str, index: int) -> Host:
        if role == "scheduler":
            return hosts[0]
        if role == "server":
            return hosts[1 + index]
        return rest[index % len(rest)]

    return place
