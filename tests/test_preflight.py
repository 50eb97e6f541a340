"""Jobs that cannot run are refused before any process starts, each with one line and exit
code 2; a job that fails anyway says its worker's own error and keeps the logs."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch

from protos.jobspec import JobSpec, SpecError, add_job_arguments, spec_from_args
from ps_worker.data import prepare
from scheduler.launch import BIN
from scheduler.preflight import PreflightError, check_model_fits
from tests.failing_model import MESSAGE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, shards=2, samples=200)
    return out


REFUSED = {
    "misspelt model": (["ps-cluster", "up", "--model", "mnist1d-cn"], "unknown model"),
    # The default model is MNIST-1D's CNN: it does not take digits' 64 features.
    "model and data": (["ps-cluster", "up", "--dataset", "digits"], "does not fit the data"),
    "no epochs": (["ps-cluster", "up", "--epochs", "0"], "epochs must be at least 1"),
    "straggler": (
        ["ps-cluster", "up", "--model", "digits-mlp", "--straggler", "9:2", "--workers", "4"],
        "--straggler 9:2: there are 4 workers",
    ),
    "timeout": (
        ["ps-cluster", "up", "--model", "digits-mlp", "--timeout-s", "-1"],
        "--timeout-s -1: must be positive",
    ),
    "scheduler model": (
        ["ps-scheduler", "--model", "nosuch-model", "--servers", "127.0.0.1:1"],
        "unknown model 'nosuch-model'",
    ),
    "scheduler model and data": (
        ["ps-scheduler", "--servers", "127.0.0.1:1"],
        "model mnist1d-cnn does not fit the data",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_job_that_cannot_run_is_refused_before_anything_starts(tmp_path, digits, case):
    (command, *args), message = REFUSED[case]
    work = tmp_path / "work"
    where = ["--work-dir", str(work)] if command == "ps-cluster" else ["--state", str(work)]
    argv = [str(BIN / command), *args, "--data-dir", str(digits), *where]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=100)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if message in x]
    assert line.startswith(command), line
    assert not work.exists()  # no work dir, no state file: nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.timeout(60)
def test_device_cuda_without_a_gpu_is_refused_before_anything_starts(tmp_path, digits):
    argv = [str(BIN / "ps-cluster"), "up", "--device", "cuda", "--data-dir", str(digits)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=50)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ps-cluster: --device cuda: no CUDA device is available here (use cpu or auto)"
    )


def test_the_model_check_says_what_does_not_fit(digits):
    spec = JobSpec.from_dict({"data_dir": str(digits), "model": "mnist1d-mlp"})
    with pytest.raises(PreflightError) as info:
        check_model_fits(spec)
    assert "model mnist1d-mlp does not fit the data in" in str(info.value)
    assert "inputs of shape (64,), 10 classes" in str(info.value)
    check_model_fits(JobSpec.from_dict({"data_dir": str(digits), "model": "digits-mlp"}))


def test_a_lease_timeout_must_be_finite():
    with pytest.raises(SpecError, match="lease_timeout_s must be a positive number, got inf"):
        JobSpec.from_dict({"data_dir": "d", "lease_timeout_s": "inf"})


def test_mode_and_optimizer_variables_are_taken_in_any_case(monkeypatch):
    """Trap: PS_MODE=SSP was refused."""

    def spec(*flags: str) -> JobSpec:
        parser = argparse.ArgumentParser()
        add_job_arguments(parser, env=True)  # reads the variables
        return spec_from_args(parser.parse_args(["--data-dir", "d", *flags]))

    monkeypatch.setenv("PS_MODE", "SSP")
    monkeypatch.setenv("PS_OPTIMIZER", "Adam")
    assert (spec().mode, spec().optimizer) == ("ssp", "adam")
    assert spec("--mode", "Sync").mode == "sync"
    monkeypatch.setenv("PS_MODE", "fast")  # still one of the modes, or refused
    with pytest.raises(SpecError, match="mode 'fast' is not one of sync, async, ssp"):
        spec()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_worker_that_fails_anyway_is_reported_with_its_error_and_the_logs_kept(tmp_path, digits):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    argv = [
        str(BIN / "ps-cluster"),
        "up",
        *("--data-dir", str(digits), "--model", "tests.failing_model:build"),
        *("--servers", "1", "--workers", "1", "--epochs", "1", "--batch-size", "16"),
        *("--timeout-s", "120", "--quiet"),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=170, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"worker0.log: RuntimeError: {MESSAGE}" in result.stderr
    (kept,) = temp.glob("ps-cluster-*")  # the temporary work dir stays, with the logs
    assert f"the logs are in {kept}" in result.stderr
    assert MESSAGE in (kept / "worker0.log").read_text()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(180)
def test_device_cuda_from_the_launcher_trains_on_the_gpu(tmp_path, digits):
    work = tmp_path / "work"
    argv = [
        str(BIN / "ps-cluster"),
        "up",
        *("--data-dir", str(digits), "--model", "digits-mlp", "--device", "cuda"),
        *("--servers", "1", "--workers", "1", "--epochs", "1", "--batch-size", "16"),
        *("--work-dir", str(work), "--quiet", "--timeout-s", "150"),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(digits-mlp) on cuda" in (work / "worker0.log").read_text()
