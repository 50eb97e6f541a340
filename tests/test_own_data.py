"""docs/data.md's example runs as written: a data set of one's own, trained, saved, scored.

It is also the whole model-out path of ps-cluster: the saved model, loaded into a fresh
module, scores exactly the accuracy of the job's last evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ps_worker.daemon import score
from ps_worker.data import load, read_manifest
from ps_worker.models import build_model
from scheduler.launch import BIN

DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def run_line(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """One shell line of the doc: leading NAME=value words set the environment, and
    .venv/bin/ means this venv's."""
    words = shlex.split(line)
    env = dict(os.environ)
    while "=" in words[0] and not words[0].startswith("."):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    words[0] = str(BIN / Path(words[0]).name)
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=150)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_own_data_example_trains_saves_and_scores_the_last_evaluation(tmp_path, monkeypatch):
    files = {}
    for block in blocks("python"):
        first = block.splitlines()[0]
        name = re.match(r"# (blobs/\w+\.py):", first)
        assert name, f"a python block of docs/data.md names no file: {first!r}"
        files[name.group(1)] = block
    assert sorted(files) == ["blobs/blobs_model.py", "blobs/evaluate.py", "blobs/make_blobs.py"]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (commands,) = [b for b in blocks("sh") if "ps-cluster up" in b]
    outputs = []
    for line in commands.strip().splitlines():
        result = run_line(line, tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)

    printed = re.search(r"test accuracy ([\d.]+); the job's last evaluation ([\d.]+)", outputs[-1])
    assert printed and printed.group(1) == printed.group(2), outputs[-1]
    summary = json.loads((tmp_path / "blobs" / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.9  # three well-separated blobs
    # The same check with the workers' own code: the model as they build it, scored as they do.
    monkeypatch.syspath_prepend(str(tmp_path / "blobs"))
    model = build_model(summary["model"], seed=1)  # any seed: every weight comes from the file
    model.load_state_dict(load_file(str(tmp_path / "blobs" / "model.safetensors")))
    data = tmp_path / "blobs" / "data"
    _, accuracy = score(model, *load(data, read_manifest(data).test), torch.device("cpu"))
    assert accuracy == summary["final_accuracy"]
