"""A newcomer's first runs, as they type them: the same ps-cluster command twice in one work
dir, the trained model out and loaded, a scheduler's state file of another job, and what
the README's commands leave behind in a checkout."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protos.jobspec import JobSpec
from ps_worker import Client, ClientConfig
from ps_worker.daemon import score
from ps_worker.data import load, prepare, read_manifest
from ps_worker.models import build_model
from scheduler.launch import BIN, Daemon, servers
from scheduler.state import SchedulerState

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Digits, 400 samples in 4 shards: a job of seconds."""
    out = tmp_path_factory.mktemp("tiny")
    prepare("digits", out, shards=4, samples=400)
    return out


def cluster_up(tiny: Path, work: Path, summary: Path, *extra: str) -> subprocess.CompletedProcess:
    """The person's command: a small job, the same every time."""
    argv = [
        str(BIN / "ps-cluster"),
        "up",
        *("--data-dir", str(tiny), "--model", "digits-mlp", "--batch-size", "32"),
        *("--epochs", str(EPOCHS), "--servers", "1", "--workers", "2", "--device", "cpu"),
        *("--work-dir", str(work), "--summary-json", str(summary), "--timeout-s", "120"),
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def saved_model_accuracy(model_path: Path, tiny: Path) -> float:
    """The saved model's accuracy on the test split, as the workers evaluate it."""
    model = build_model("digits-mlp", 0)
    model.load_state_dict(load_file(str(model_path)))
    x, y = load(tiny, read_manifest(tiny).test)
    return score(model, x, y, torch.device("cpu"))[1]


@pytest.mark.timeout(400)
def test_the_same_ps_cluster_command_twice_in_one_work_dir(tmp_path, tiny):
    """Trap: a second `make demo` failed (the state file held the previous run's job, whose
    servers' ports differ), and new servers would have restored the previous weights."""
    work, summary, saved = tmp_path / "run", tmp_path / "summary.json", tmp_path / "m.safetensors"
    first = cluster_up(tiny, work, summary, "--save", str(saved))
    assert first.returncode == 0, first.stdout + first.stderr
    curve = json.loads(summary.read_text())["accuracy_curve"]
    # Each epoch's line once, when its evaluation is in, with its own accuracy.
    lines = re.findall(r"^epoch (\d+)/(\d+): test accuracy ([\d.]+)", first.stdout, re.M)
    assert lines == [(str(e["epoch"]), str(EPOCHS), f"{e['accuracy']:.4f}") for e in curve]
    # The model out: loaded into a fresh module, it scores what the last evaluation said.
    assert saved_model_accuracy(saved, tiny) == curve[-1]["accuracy"]
    assert f"wrote the trained model to {saved}" in first.stdout

    second = cluster_up(tiny, work, summary)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "cleared the previous run's scheduler state, checkpoints and logs" in second.stdout
    again = json.loads(summary.read_text())
    assert len(again["accuracy_curve"]) == EPOCHS
    # The second job started from the model's initial weights, not from the first's.
    server_log = (work / "server0.log").read_text()
    assert "restor" not in server_log.lower(), server_log
    logs = "".join(p.read_text() for p in work.glob("*.log"))
    assert re.search(r"registered as \S+; job job \(digits-mlp\) on cpu", logs)
    # Epochs count from 1 in every log line a person reads.
    assert f"epoch {EPOCHS}: test loss" in logs and not re.search(r"\bepoch 0\b", logs)


@pytest.mark.timeout(240)
def test_a_state_file_of_another_job_is_refused_and_fresh_starts_it_afresh(tmp_path, tiny):
    state_file, saved = tmp_path / "job.db", tmp_path / "model.safetensors"
    old = JobSpec.from_dict(
        {"data_dir": str(tiny), "model": "digits-mlp", "servers": "127.0.0.1:1", "epochs": 3}
    )
    state = SchedulerState(str(state_file))
    state.create_or_resume(old, shards=4)
    state.close()
    with servers(1, tmp_path) as (server,):
        argv = [
            str(BIN / "ps-scheduler"),
            *("--state", str(state_file), "--data-dir", str(tiny), "--model", "digits-mlp"),
            *("--servers", server.address, "--epochs", "1", "--batch-size", "32"),
        ]
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        message = refused.stderr.strip()
        assert "\n" not in message and "Traceback" not in message, message
        assert "epochs (3, now 1)" in message and "servers (127.0.0.1:1, now" in message
        assert "use --fresh to start afresh, or the same job spec to resume" in message

        scheduler = Daemon([*argv, "--fresh", "--save", str(saved)], tmp_path / "sched.log")
        try:
            worker = Daemon(
                [str(BIN / "ps-worker"), "--scheduler", scheduler.address, "--no-progress"],
                tmp_path / "worker.log",
            )
            assert worker.proc.wait(120) == 0, worker.last_log_line()
            # Then the scheduler writes the model and ends the job on the servers.
            deadline = time.monotonic() + 60
            with Client([server.address], job_id="job", config=ClientConfig(timeout_s=10)) as c:
                while c.status()[0].initialised or not saved.exists():
                    assert time.monotonic() < deadline, scheduler.last_log_line()
                    time.sleep(0.1)  # polling the servers and the file, with a deadline
        finally:
            scheduler.stop()
    model = build_model("digits-mlp", 0)
    model.load_state_dict(load_file(str(saved)))
    assert "discarded the job" in (tmp_path / "sched.log").read_text()


def test_what_the_readme_commands_write_is_ignored_by_git():
    written = ["job.db", "job.db-wal", "scheduler.db", "demo/run/worker0.log", "data/x.npz"]
    written += ["model.safetensors"]  # ps-cluster up --save model.safetensors
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *written],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.split() == written, result.stdout + result.stderr
