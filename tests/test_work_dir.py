"""A ps-cluster work dir holds the person's files too: a run clears only what a previous run
wrote there (by the names a cluster gives, where its marker says one ran), never the
person's --config, and two runs never share one work dir."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from ps_worker.data import prepare
from scheduler.launch import BIN
from scheduler.lifecycle import MARKER, Claim, clear_previous_run

pytestmark = pytest.mark.integration
USER_CONFIG = "epochs: 1\nbatch_size: 32\n"  # YAML, not JSON


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    prepare("digits", out, shards=2, samples=200)
    return out


def up_argv(tiny: Path, work: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "ps-cluster"),
        "up",
        *("--data-dir", str(tiny), "--model", "digits-mlp", "--servers", "1", "--workers", "1"),
        *("--device", "cpu", "--work-dir", str(work), "--timeout-s", "90", "--quiet", *extra),
    ]


def up(tiny: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = up_argv(tiny, work, *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


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
        Claim(work).release()
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
@pytest.mark.parametrize("name", ["cluster-job.json", "cluster.json", "scheduler.db"])
def test_a_file_the_cluster_writes_is_not_a_config(tmp_path, tiny, name):
    work = tmp_path / "w"
    Claim(work).release()
    (work / name).write_text(USER_CONFIG)
    run = up(tiny, work, "--config", str(work / name))
    assert run.returncode == 2 and "a cluster writes (and clears) that file" in run.stderr
    assert (work / name).read_text() == USER_CONFIG


@pytest.mark.timeout(60)
def test_a_symlinked_checkpoints_dir_or_summary_is_refused_before_anything(tmp_path, tiny):
    """A linked checkpoints/ was never cleared: the next job restored the old weights."""
    work, elsewhere = tmp_path / "w", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "checkpoints").symlink_to(elsewhere)
    run = up(tiny, work)
    assert run.returncode == 2 and "checkpoints is a symbolic link" in run.stderr, run.stderr
    (work / "checkpoints").unlink()
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (tmp_path / "summary.json").symlink_to(precious)
    run = up(tiny, work, "--summary-json", str(tmp_path / "summary.json"))
    assert run.returncode == 2 and "--summary-json" in run.stderr, run.stderr
    assert precious.read_text() == "mine" and not list(work.iterdir())


def wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a condition, with a deadline


@pytest.mark.timeout(240)
def test_a_second_run_in_a_work_dir_in_use_is_refused_touching_nothing(tmp_path, tiny):
    """The trap: run B cleared run A's state, B's server restored A's live checkpoints and
    B reported a wrong accuracy."""
    work, summary = tmp_path / "w", tmp_path / "a.json"
    a = subprocess.Popen(
        up_argv(tiny, work, "--epochs", "40", "--summary-json", str(summary)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        marker = work / MARKER
        wait_for(
            lambda: marker.exists() and marker.read_text().strip() == str(a.pid),
            "run A to hold its work dir",
        )
        b = up(tiny, work, "--epochs", "1")
        assert b.returncode == 2, b.stdout + b.stderr
        assert (
            b.stderr
            == f"ps-cluster: work dir {work} is in use by another ps-cluster (pid {a.pid})\n"
        )
        assert b.stdout == ""
        assert a.poll() is None, "run A ended before run B was refused: make A longer"
        out, _ = a.communicate(timeout=180)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0, out
    assert len(json.loads(summary.read_text())["accuracy_curve"]) == 40
    assert marker.read_text().strip() == str(a.pid)  # B wrote nothing there
