"""Output files never replace what is not a regular file: a FIFO, a symbolic link, a
directory (a device too, which no test touches). Refused in one line, before any work,
by --save's pre-flight check, by the writer at save time, and by ps-export --out."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from protos import outfile
from protos.jobspec import JobSpec
from ps_server import export
from scheduler import finish
from scheduler.launch import BIN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nodes(tmp_path) -> dict[str, Path]:
    """A FIFO, a symbolic link to a file of the person's, and a directory."""
    fifo, target, link = tmp_path / "fifo", tmp_path / "mine.txt", tmp_path / "link"
    os.mkfifo(fifo)
    target.write_text("the person's")
    link.symlink_to(target)
    (tmp_path / "dir").mkdir()
    return {"a FIFO": fifo, "a symbolic link": link, "a directory": tmp_path / "dir"}


def unchanged(tmp_path: Path, nodes: dict[str, Path]) -> None:
    assert stat.S_ISFIFO(os.lstat(nodes["a FIFO"]).st_mode)
    assert nodes["a symbolic link"].is_symlink()
    assert (tmp_path / "mine.txt").read_text() == "the person's"
    assert nodes["a directory"].is_dir()
    assert not list(tmp_path.glob(".*.partial"))


def test_the_writer_refuses_what_is_not_a_regular_file_before_writing(tmp_path, nodes):
    for kind, path in nodes.items():
        wrote = []
        with pytest.raises(outfile.OutFileError) as info:
            outfile.write(path, "--save", wrote.append)
        assert str(info.value) == (
            f"--save {path}: is {kind}; give the path of a regular file or of none yet"
        )
        assert wrote == []
    unchanged(tmp_path, nodes)
    fresh, old = tmp_path / "new/model.safetensors", tmp_path / "old.safetensors"
    old.write_text("stale")
    for path in (fresh, old):
        outfile.write(path, "--save", lambda tmp: save_file({"w": torch.ones(2)}, tmp))
        assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    assert not list(tmp_path.glob("**/.*.partial"))


def test_a_path_that_becomes_a_fifo_while_writing_is_not_replaced(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(outfile.OutFileError, match="is a FIFO"):
        outfile.write(path, "--out", lambda tmp: os.mkfifo(path))
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and not list(tmp_path.glob(".*.partial"))


def test_save_model_refuses_before_it_fetches_the_weights(tmp_path, nodes, monkeypatch):
    def fetch(*_):
        raise AssertionError("fetched the weights for a path it cannot write")

    monkeypatch.setattr(finish, "final_state_dict", fetch)
    spec = JobSpec.from_dict({"data_dir": "d", "model": "digits-mlp", "servers": "127.0.0.1:1"})
    for path in nodes.values():
        with pytest.raises(OSError, match="give the path of a regular file"):
            finish.save_model(spec, None, path)
    unchanged(tmp_path, nodes)


def test_ps_export_out_is_refused_before_any_work(tmp_path, nodes, capsys):
    for kind, path in nodes.items():
        # No checkpoints there: a refusal after reading them would say so instead.
        assert export.main(["--checkpoints", str(tmp_path / "none"), "--out", str(path)]) == 2
        assert capsys.readouterr().err == (
            f"ps-export: --out {path}: is {kind}; give the path of a regular file or of none yet\n"
        )
    unchanged(tmp_path, nodes)


def test_ps_cluster_save_is_refused_in_preflight(tmp_path, nodes):
    for kind, path in [*nodes.items()][:2]:
        argv = [str(BIN / "ps-cluster"), "up", "--model", "digits-mlp", "--save", str(path)]
        argv += ["--work-dir", str(tmp_path / "work")]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=50)
        assert result.returncode == 2
        assert result.stderr == (
            f"ps-cluster: --save {path}: is {kind}; give the path of a regular file or of "
            "none yet\n"
        )
    assert not (tmp_path / "work").exists()
    unchanged(tmp_path, nodes)
