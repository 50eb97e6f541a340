"""Across hosts: jobs whose scheduler, servers and workers each run on a host of their own
(a network namespace with its own host name and address: benchmarks.hosts), in every mode,
and the faults of a host: all of its processes killed, its link cut and restored.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.hosts import PREFIX, Hosts, LinkModel, remove, spread, sweep, unavailable
from scheduler.local import LocalCluster
from tests.test_cluster import assert_every_shard_once, digits, small_job  # noqa: F401

REASON = unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

SERVERS, WORKERS = 2, 3  # and the scheduler: 6 hosts
MODES = ["sync", "async", "ssp", "local", "local-async"]


@pytest.fixture(scope="module")
def six_hosts():
    with Hosts(1 + SERVERS + WORKERS) as hosts:
        yield hosts
    assert not [n for n in _names() if n.startswith(hosts.tag)], "the harness left names"


def _names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()] + re.findall(
        r"^\d+: ([^:@]+)", links, re.M
    )


def run_across(hosts: Hosts, spec, work: Path, on_progress=None) -> dict:
    """The job on the hosts, to its end: its last progress."""
    assert not any(h.pids() for h in hosts.hosts), "a process of an earlier test is running"
    cluster = LocalCluster(spec, work, WORKERS, placement=spread(hosts, SERVERS))
    with cluster.start():
        assert [d.address.rsplit(":", 1)[0] for d in cluster.server_daemons] == [
            hosts[1].address,
            hosts[2].address,
        ]
        progress = cluster.wait(150, on_progress)
        assert progress["finished"]
        statuses = cluster.server_status()
        for worker in cluster.worker_daemons:  # each ends by itself once the job has
            worker.proc.wait(timeout=30)
    assert [s.hostname for s in statuses] == [hosts[1].name, hosts[2].name]
    return progress


def transports(work: Path) -> list[str]:
    """What each worker process said it reached the servers over."""
    said = [
        re.search(r"servers reached over: (.+)$", log.read_text(), re.M)
        for log in sorted(work.glob("worker*.log"))
    ]
    return [m.group(1) for m in said if m]


def test_hosts_have_their_own_names_and_addresses_and_leave_nothing(tmp_path):
    with Hosts(2, LinkModel(rate_gbit=10)) as hosts:
        names = {
            subprocess.run(h.wrap(["hostname"]), capture_output=True, text=True).stdout.strip()
            for h in hosts.hosts
        }
        assert names == {"host0", "host1"}
        assert len({h.address for h in hosts.hosts} | {hosts.launcher_address}) == 3
        qdisc = subprocess.run(
            ["ip", "netns", "exec", hosts[0].netns, "tc", "qdisc", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
        ).stdout
        assert "tbf" in qdisc and "10Gbit" in qdisc
        tag = hosts.tag
    assert not [n for n in _names() if n.startswith(tag)]


def test_what_a_killed_run_left_is_swept_by_the_next():
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"{PREFIX}{dead.pid}"
    subprocess.run(["ip", "netns", "add", f"{tag}-h0"], check=True)
    try:
        assert tag in sweep()
        assert not [n for n in _names() if n.startswith(tag)]
    finally:
        remove(tag)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", MODES)
def test_a_job_runs_across_six_hosts(tmp_path, digits, six_hosts, mode):  # noqa: F811
    spec = small_job(digits, mode, epochs=1, expected_workers=WORKERS)  # (CI time)
    progress = run_across(six_hosts, spec, tmp_path)
    assert sorted(w["host"] for w in progress["workers"]) == ["host3", "host4", "host5"]
    # no same-host path across hosts: the bulk data plane
    assert transports(tmp_path) == ["bulk, bulk"] * WORKERS
    assert_every_shard_once(tmp_path, spec, 8)
    assert len(progress["evaluations"]) == 1  # evaluated (training: tests/test_cluster.py)


class Faults:
    """Faults of hosts, each at its count of completed shards, in order: every process of a
    host killed, or its link cut and restored after some seconds, or once the scheduler has
    declared the host's worker dead."""

    def __init__(self, hosts: Hosts, work: Path, plan: list[tuple[int, str, int, float | str]]):
        self.hosts, self.work, self.plan, self.cut = hosts, work, list(plan), None
        self.done: list[str] = []

    def __call__(self, progress: dict) -> None:
        if self.cut is not None:
            host, since, until = self.cut
            if until == "dead":
                over = any(
                    w["host"] == host.name and w["state"] == "dead" for w in progress["workers"]
                )
            else:  # (the length of a fault, not a wait for something to happen)
                over = time.monotonic() - since >= until
            if over:
                host.restore()
                self.cut = None
                self.done.append(f"restored {host.name}")
            return
        if self.plan and progress["done"] >= self.plan[0][0]:
            _, what, index, until = self.plan.pop(0)
            host = self.hosts[index]
            if what == "kill":
                assert host.kill(), f"nothing ran on {host.name}"
            else:
                host.cut()
                self.cut = (host, time.monotonic(), until)
            self.done.append(f"{what} {host.name}")


@pytest.mark.timeout(240)
def test_a_job_survives_its_hosts_killed_and_cut_off(tmp_path, digits, six_hosts):  # noqa: F811
    """A worker's host killed (ps-cluster starts a new worker there), a server's host killed
    (restarted there on its checkpoint), a server's and a worker's links cut for 2 s, under
    the lease timeout (their calls wait and go on), and a worker's host cut off until the
    scheduler declares its worker dead (sync: the others wait for it until then; its shard
    goes to another; back, the worker is refused and exits): the job finishes on the rest,
    every shard once."""
    spec = small_job(digits, "sync", epochs=4, expected_workers=WORKERS, lease_timeout_s=5.0)
    plan = [(2, "kill", 3, 0), (6, "kill", 1, 0), (10, "cut", 2, 2.0), (14, "cut", 4, 2.0)]
    faults = Faults(six_hosts, tmp_path, [*plan, (18, "cut", 5, "dead")])
    progress = run_across(six_hosts, spec, tmp_path, faults)
    assert faults.done == [
        "kill host3",
        "kill host1",
        "cut host2",
        "restored host2",
        "cut host4",
        "restored host4",
        "cut host5",
        "restored host5",
    ], faults.done
    states = {w["host"]: w["state"] for w in progress["workers"] if w["host"] != "host3"}
    assert states["host5"] == "dead" and states["host4"] in ("idle", "left"), states
    said = (tmp_path / "worker2.log").read_text()  # refused by the first it reaches again:
    refusals = (  # a server, or the scheduler (its lease, or its heartbeat)
        "has left the job",
        "the scheduler dropped this worker",
        "is dead (missed heartbeats",
    )
    assert any(refusal in said for refusal in refusals), said
    assert_every_shard_once(tmp_path, spec, 8)
    assert progress["evaluations"][-1]["accuracy"] >= 0.8
