"""Chaos: SIGKILL a worker, a server, the scheduler (or two at once) mid-job, in every mode.

Each round runs the chaos job (benchmarks/chaoskit.py: digits, 2 servers, 3
workers, 2 epochs) on a local cluster and kills its victims once the scheduler
has recorded a drawn number of completed shards; the job must finish within its
accuracy band, every shard of every epoch completed exactly once, and nothing
left behind (process, server socket, shared-memory segment). One round per
mode, each mode's victim of a different kind; who and when derive from the
seed, printed, and taken from $GRADSTORE_CHAOS_SEED when set (to replay a
failure). ``python -m benchmarks.chaos`` runs many rounds.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks import chaoskit
from protos.orphans import SOCKET_PREFIX, SOCKET_SUFFIX, creator
from protos.shm import SEGMENT_PREFIX, default_dir
from scheduler.local import WORKER_REPLACEMENTS, LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]

SEED = chaoskit.seed_from_env()
PLANS = chaoskit.round_per_mode(SEED)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return chaoskit.prepared_data(tmp_path_factory.mktemp("chaos-digits"))


@pytest.mark.parametrize("plan", PLANS, ids=[p.mode for p in PLANS])
def test_a_job_survives_a_sigkill(plan, data, tmp_path):
    print(f"chaos seed {SEED} ({chaoskit.SEED_ENV}={SEED} replays it): {plan.describe()}")
    outcome = chaoskit.run_round(plan, data, tmp_path / "work")
    print(chaoskit.summary_line(outcome))
    assert outcome.killed_at_done is not None and outcome.killed_at_done < (
        chaoskit.EPOCHS * chaoskit.SHARDS
    ), "the kill came after training"
    assert outcome.survived, (
        f"{plan.describe()} (rerun with {chaoskit.SEED_ENV}={SEED}): {outcome.failures}; "
        f"logs in {outcome.work_dir}"
    )


def test_plans_derive_from_the_seed_alone():
    assert chaoskit.round_per_mode(SEED) == PLANS
    kinds = {"+".join(role for role, _ in p.victims) for p in PLANS}
    assert len(kinds) == len(chaoskit.MODES)  # a different victim in each mode
    assert {"worker", "server", "scheduler"} < kinds  # every row of the README's Faults
    for p in PLANS:
        assert 2 <= p.after_shards < chaoskit.EPOCHS * chaoskit.SHARDS


def own_files(pids: set[int]) -> list[str]:
    """Sockets and segments named after one of these processes."""
    return [
        name
        for directory, prefix, suffix in (
            (tempfile.gettempdir(), SOCKET_PREFIX, SOCKET_SUFFIX),
            (default_dir(), SEGMENT_PREFIX, ""),
        )
        for name in os.listdir(directory)
        if creator(name, prefix, suffix) in pids
    ]


def test_the_launcher_sweeps_what_killed_children_left_while_the_job_runs(data, tmp_path):
    """A SIGKILLed server cannot remove its Unix socket: the launcher removes it once it
    sees the server dead (and restarts it), not only at exit; at exit, nothing of any
    process it started is left."""
    spec = chaoskit.chaos_spec(data, "async", epochs=8)  # still running after a checkpoint
    cluster = LocalCluster(spec, tmp_path, 3, checkpoint_every="1s")
    with cluster.start():
        server = cluster.server_daemons[0]
        manifest = tmp_path / "checkpoints" / "server0" / "manifest.json"
        deadline = time.monotonic() + 60
        while not (manifest.exists() and own_files({server.proc.pid})):
            assert time.monotonic() < deadline, "no checkpoint or socket"
            time.sleep(0.05)  # polling for the server's files, with a deadline
        for d in (server, cluster.worker_daemons[0]):
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
        assert own_files({server.proc.pid})  # what it left
        cluster.wait(120)  # which restarts the server, and sweeps
        assert cluster.restarts
        assert own_files({server.proc.pid}) == [], cluster.swept
        assert any(f"{SOCKET_PREFIX}{server.proc.pid}-" in path for path in cluster.swept)
    assert own_files({d.proc.pid for d in cluster.started}) == []


def test_a_failed_job_names_the_error_of_a_worker_that_failed_not_of_one_killed(
    data, tmp_path, monkeypatch
):
    """Worker 0 is SIGKILLed at once, worker 1 fails on its first batch: the launcher's
    message gives worker 1's error, not worker 0's last line (it named the killed one)."""
    from tests.failing_model import MESSAGE

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    spec = chaoskit.chaos_spec(data, "async", model="tests.failing_model:build", expected_workers=1)
    with LocalCluster(spec, tmp_path, 2).start() as cluster:
        cluster.worker_daemons[0].proc.send_signal(signal.SIGKILL)
        with pytest.raises(RuntimeError, match="every worker exited") as failed:
            cluster.wait(120)
    # worker 1's error, or that of worker 0's replacement (worker0-1.log): never the killed one's
    assert MESSAGE in str(failed.value)
    assert re.search(r"worker(1|0-1)\.log", str(failed.value)), failed.value


def test_a_worker_killed_before_it_registered_is_replaced_and_the_job_finishes(data, tmp_path):
    """Trap: leases wait until expected_workers have registered, so a worker killed before
    it registered (the launcher did not replace workers) left the job waiting for ever."""
    spec = chaoskit.chaos_spec(data, "async")
    with LocalCluster(spec, tmp_path, chaoskit.WORKERS).start() as cluster:
        cluster.worker_daemons[0].proc.send_signal(signal.SIGKILL)  # it is still starting
        assert cluster.wait(60)["finished"]
        assert cluster.restarts == ["worker 0 was killed (code -9); a new worker replaces it"]
    assert (tmp_path / "worker0-1.log").exists()


def test_a_worker_killed_again_and_again_with_no_progress_is_not_replaced_for_ever(
    data, tmp_path, monkeypatch
):
    """Trap: a worker dying of SIGABRT as it starts (a crash in native code) was replaced
    42 times in 45 s, until the launcher's timeout (an hour by default)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    spec = chaoskit.chaos_spec(data, "async", model="tests.failing_model:aborting")
    cluster = LocalCluster(spec, tmp_path, 1)
    with cluster.start(), pytest.raises(RuntimeError, match="every worker exited"):
        cluster.wait(120)
    replaced = [r for r in cluster.restarts if r.endswith("a new worker replaces it")]
    assert len(replaced) == WORKER_REPLACEMENTS
    assert cluster.restarts[-1] == (
        f"worker 0 was killed (code -6) {WORKER_REPLACEMENTS + 1} times with no shard done "
        "meanwhile: not replaced again"
    )


def test_a_restart_killed_before_it_listened_is_tried_again(data, tmp_path, monkeypatch):
    """Trap: the scheduler SIGKILLed, then its replacement SIGKILLed before it listened:
    the launcher's restart raised "did not start" and ended the job."""
    spec = chaoskit.chaos_spec(data, "async")
    cluster = LocalCluster(spec, tmp_path, chaoskit.WORKERS)
    with cluster.start():
        start, attempts = cluster.start_scheduler, []

        def killed_at_the_first_attempt():
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("ps-scheduler did not start: it exited with code -9")
            return start()

        monkeypatch.setattr(cluster, "start_scheduler", killed_at_the_first_attempt)
        assert cluster.scheduler is not None
        cluster.scheduler.proc.send_signal(signal.SIGKILL)
        assert cluster.wait(90)["finished"]
    assert len(attempts) == 2
    assert cluster.restarts == ["the scheduler exited with code -9; restarted on its state file"]
