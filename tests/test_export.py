"""ps-export: server checkpoints back into one model file, and every way they can not fit."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from ps_server import checkpoint
from ps_server.export import ExportError, ServerShare, main, read_shares, reassemble
from ps_server.store import ParameterStore
from ps_worker import Client
from ps_worker.daemon import score
from ps_worker.data import load, prepare, read_manifest
from ps_worker.models import build_model
from scheduler.launch import BIN, Daemon
from tests.storekit import chunks_for, grads, initial_values, make_job

SERVERS = 2


def checkpointed(directory, job_id: str = "job", server: int = 0, servers: int = SERVERS):
    """A store for one server of a job, one SGD step (gradient 1, lr 1) in, checkpointed."""
    job = make_job("async", server_index=server, num_servers=servers)
    job = dataclasses.replace(job, job_id=job_id)
    store = ParameterStore()
    assert store.initialise(job, chunks_for(job, initial_values()))
    store.push(job_id, "w", 1, 0, chunks_for(job, grads(1.0)))
    checkpoint.write(checkpoint.snapshot(store), directory)
    return directory


@pytest.fixture
def job_dirs(tmp_path):
    return [checkpointed(tmp_path / "checkpoints" / f"server{i}", server=i) for i in (1, 0)]


def test_the_shares_of_every_server_make_the_whole_model(job_dirs):
    model = reassemble(read_shares(job_dirs))
    expected = {name: value - 1 for name, value in initial_values().items()}  # one step
    assert list(model) == sorted(expected)
    for name, value in expected.items():
        assert model[name].dtype == value.dtype and model[name].shape == value.shape, name
        assert torch.equal(model[name], value), name


def test_a_folder_of_server_checkpoints_is_read_whole_and_written_as_one_file(
    tmp_path, job_dirs, capsys
):
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoints", str(tmp_path / "checkpoints"), "--out", str(out)]) == 0
    assert "2 server(s) at versions [1, 1]" in capsys.readouterr().out
    loaded = load_file(str(out))
    for name, value in initial_values().items():
        assert torch.equal(loaded[name], value - 1), name


def refused(tmp_path, capsys, *dirs) -> str:
    out = tmp_path / "refused.safetensors"
    assert main(["--checkpoints", *map(str, dirs), "--out", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
    err = capsys.readouterr().err
    assert err.startswith("ps-export: ") and err.count("\n") == 1, err
    return err


def test_a_missing_server_is_named(tmp_path, job_dirs, capsys):
    err = refused(tmp_path, capsys, job_dirs[0])
    assert "has 2 servers; no checkpoint of server 0 was given" in err


def test_a_server_given_twice_is_refused(tmp_path, job_dirs, capsys):
    err = refused(tmp_path, capsys, job_dirs[1], *job_dirs)
    assert "server 0 given twice" in err


def test_checkpoints_of_another_job_or_another_layout_are_refused(tmp_path, job_dirs, capsys):
    other = checkpointed(tmp_path / "other", job_id="other", server=1)
    assert "checkpoints of different jobs: 'job' in" in refused(
        tmp_path, capsys, job_dirs[1], other
    )
    three = checkpointed(tmp_path / "three", server=1, servers=3)
    assert "has two layouts" in refused(tmp_path, capsys, job_dirs[1], three)


def test_a_corrupt_or_absent_checkpoint_is_refused(tmp_path, job_dirs, capsys):
    tensors = job_dirs[1] / json.loads((job_dirs[1] / "manifest.json").read_text())["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    assert "does not match its checksum" in refused(tmp_path, capsys, *job_dirs)
    (tmp_path / "empty").mkdir()
    assert "no server checkpoint in" in refused(tmp_path, capsys, tmp_path / "empty")


def test_a_buffer_that_does_not_fit_its_layout_is_refused(job_dirs):
    shares = read_shares(job_dirs)
    short = {name: p[:-1] for name, p in shares[0].params.items()}
    bad = ServerShare(shares[0].source, shares[0].job, short, shares[0].version)
    with pytest.raises(ExportError, match="parameters do not fit server"):
        reassemble([bad, shares[1]])
    with pytest.raises(ExportError, match="no checkpoints given"):
        reassemble([])


def checkpointing_servers(checkpoints, logs) -> list[Daemon]:
    """ps-server processes, each writing checkpoints into its own folder of ``checkpoints``."""
    return [
        Daemon(
            [str(BIN / "ps-server"), "--port", "0", "--checkpoint-dir", str(checkpoints / f"s{i}")],
            logs / f"server{i}.log",
        )
        for i in range(SERVERS)
    ]


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(24, 3)
    )


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_trained_job_exports_the_weights_its_client_pulls(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    daemons = checkpointing_servers(checkpoints, tmp_path)
    try:
        addresses = [d.address for d in daemons]
        model = small_model(0)
        x, y = torch.randn(32, 1, 8), torch.randint(0, 3, (32,))
        with Client(addresses, job_id="export", worker_id="w0") as client:
            # parts of 64 bytes: the linear weight spans both servers
            client.init(model, mode="async", optimizer="adam", lr=0.01, part_bytes=64)
            for _ in range(5):
                client.pull_into(model)
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                client.push_from(model)
            pulled = client.pull(observe=True)
            assert all(v > 0 for v in client.versions)
    finally:
        codes = [d.stop() for d in daemons]  # SIGTERM: each writes its final checkpoint
    assert codes == [0] * SERVERS
    out = tmp_path / "model.safetensors"
    result = subprocess.run(  # the console script, as a user runs it
        [str(BIN / "ps-export"), "--checkpoints", str(checkpoints), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "4 tensors" in result.stdout and "job 'export' from 2 server(s)" in result.stdout
    fresh = small_model(1)  # other initial weights: everything must come from the file
    fresh.load_state_dict(load_file(str(out)))  # strict: every parameter, nothing else
    for name, value in fresh.named_parameters():
        assert torch.equal(value.detach(), pulled[name]), name


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_scheduled_job_exports_the_model_its_last_evaluation_scored(tmp_path):
    """Daemons by hand, the job kept on the servers (--no-end-job): the servers' final
    checkpoints, exported, score exactly the test accuracy of the job's last evaluation."""
    data = tmp_path / "data"
    prepare("digits", data, shards=4, samples=400)
    checkpoints = tmp_path / "checkpoints"
    daemons = checkpointing_servers(checkpoints, tmp_path)
    try:
        servers = ",".join(d.address for d in daemons)
        scheduler = Daemon(
            [str(BIN / "ps-scheduler"), "--port", "0", "--state", str(tmp_path / "job.db"),
             "--data-dir", str(data), "--servers", servers, "--model", "digits-mlp",
             "--epochs", "1", "--batch-size", "32", "--part-bytes", "1024",
             "--no-end-job"],
            tmp_path / "scheduler.log",
        )  # fmt: skip
        daemons.append(scheduler)
        worker = Daemon(
            [str(BIN / "ps-worker"), "--scheduler", scheduler.address, "--device", "cpu"],
            tmp_path / "worker.log",
        )
        daemons.append(worker)
        assert worker.proc.wait(150) == 0
        status = subprocess.run(
            [str(BIN / "ps-scheduler"), "status", "--scheduler", scheduler.address, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
    finally:
        codes = [d.stop() for d in reversed(daemons)]  # the servers last: final checkpoints
    assert codes[-SERVERS:] == [0] * SERVERS
    progress = json.loads(status.stdout)
    assert progress["finished"] and len(progress["evaluations"]) == 1
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoints", str(checkpoints), "--out", str(out)]) == 0
    model = build_model("digits-mlp", seed=1)  # any seed: every weight comes from the file
    model.load_state_dict(load_file(str(out)))
    test = load(data, read_manifest(data).test)
    _, accuracy = score(model, *test, torch.device("cpu"))
    assert accuracy == progress["evaluations"][-1]["accuracy"]
