"""A ps-cluster work dir holds the person's files too: a run clears only what a previous run
wrote there (by the names a cluster gives, where its marker says one ran), never the
person's --config, and two runs never share one work dir."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ps_worker.data import prepare
from scheduler.launch import BIN
from scheduler.lifecycle import MARKER, claim, clear_previous_run

pytestmark = pytest.mark.integration
USER_CONFIG = "epochs: 1\nbatch_size: 32\n"  # YAML, not JSON


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    prepare("digits", out, shards=2, samples=200)
    return out


def up(tiny: Path, work: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [
        str(BIN / "ps-cluster"),
        "up",
        *("--data-dir", str(tiny), "--model", "digits-mlp", "--servers", "1", "--workers", "1"),
        *("--device", "cpu", "--work-dir", str(work), "--timeout-s", "90", "--quiet", *extra),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def persons_files(work: Path) -> dict[Path, bytes]:
    """A work dir with the person's own files in it, some named much like a cluster's."""
    files = {
        work / "checkpoints/my_experiment/model.pt": b"weights",
        work / "worker_notes.log": b"notes",
        work / "server-setup.log": b"setup",
        work / "job.json": USER_CONFIG.encode(),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.timeout(60)
def test_clearing_takes_only_the_names_a_cluster_gives_where_its_marker_is(tmp_path):
    work = tmp_path / "w"
    mine = persons_files(work)
    ours = ["scheduler.db", "scheduler0.log", "server0.log", "server1-2.log", "worker3.log"]
    ours += ["cluster.json", "cluster-job.json"]
    for name in ours:
        (work / name).write_text("x")
    (work / "checkpoints/server0").mkdir()
    assert clear_previous_run(work) == []  # no marker: nothing is a cluster's
    (work / MARKER).write_text("")
    removed = clear_previous_run(work)
    assert sorted(removed) == sorted([*ours, "checkpoints/server0"])
    assert all(path.read_bytes() == data for path, data in mine.items())


@pytest.mark.timeout(60)
def test_a_dir_without_the_marker_holding_a_clusters_name_is_refused(tmp_path, tiny):
    work = tmp_path / "w"
    work.mkdir()
    (work / "worker0.log").write_text("the person's")
    with pytest.raises(OSError, match="which no ps-cluster run recorded writing there"):
        claim(work)
    assert not (work / MARKER).exists()
    run = up(tiny, work, "--epochs", "1")
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "worker0.log" in run.stderr, run.stderr
    assert (work / "worker0.log").read_text() == "the person's"
    assert sorted(p.name for p in work.iterdir()) == ["worker0.log"]


@pytest.mark.timeout(240)
def test_a_run_keeps_the_persons_files_and_config_first_time_and_after(tmp_path, tiny):
    """The trap: a first run deleted checkpoints/ and every *.log it matched, and wrote its
    job over the --config it was given."""
    work = tmp_path / "w"
    mine = persons_files(work)
    for attempt in range(2):
        run = up(tiny, work, "--config", str(work / "job.json"))
        assert run.returncode == 0, run.stdout + run.stderr
        assert all(path.read_bytes() == data for path, data in mine.items()), attempt
        assert (work / "server0.log").exists() and (work / "worker0.log").exists()
        assert ("cleared the previous run's" in run.stdout) == (attempt == 1), run.stdout


@pytest.mark.timeout(60)
def test_the_clusters_own_job_file_is_not_a_config(tmp_path, tiny):
    work = tmp_path / "w"
    claim(work)
    (work / "cluster-job.json").write_text(USER_CONFIG)
    run = up(tiny, work, "--config", str(work / "cluster-job.json"))
    assert run.returncode == 2 and "the cluster writes its job file there" in run.stderr
    assert (work / "cluster-job.json").read_text() == USER_CONFIG


def wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a condition, with a deadline
