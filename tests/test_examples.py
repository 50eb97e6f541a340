"""examples/: the distributed script differs from the plain one by a few lines, and trains
as well against real servers."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.launch import servers

ROOT = Path(__file__).resolve().parent.parent
PLAIN, DISTRIBUTED = (
    ROOT / "examples" / "train_plain.py",
    ROOT / "examples" / "train_distributed.py",
)


def diff() -> list[str]:
    return list(
        difflib.unified_diff(
            PLAIN.read_text().splitlines(),
            DISTRIBUTED.read_text().splitlines(),
            "examples/train_plain.py",
            "examples/train_distributed.py",
            n=0,
            lineterm="",
        )
    )


def test_the_distributed_script_changes_at_most_ten_lines_and_the_readme_shows_them():
    changed = [line for line in diff()[2:] if line[:1] in "+-"]
    assert 0 < len(changed) <= 10, changed
    readme = (ROOT / "README.md").read_text()
    (shown,) = re.findall(r"```diff\n(.*?)```", readme, flags=re.S)
    assert [
        line for line in shown.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ] == changed


def accuracy(output: str) -> float:
    match = re.search(r"test accuracy ([\d.]+)", output)
    assert match, output
    return float(match.group(1))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_distributed_workers_reach_the_plain_accuracy_within_a_point(tmp_path):
    plain = subprocess.run(
        [sys.executable, str(PLAIN)], capture_output=True, text=True, timeout=200, cwd=ROOT
    )
    assert plain.returncode == 0, plain.stderr
    with servers(2, tmp_path) as daemons:
        env = {**os.environ, "PS_SERVERS": ",".join(d.address for d in daemons), "WORLD_SIZE": "2"}
        workers = [
            subprocess.Popen(  # as torchrun starts them: servers, rank and world in variables
                [sys.executable, str(DISTRIBUTED)],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for rank in range(2)
        ]
        outputs = [w.communicate(timeout=250) for w in workers]
    for w, (out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
        assert abs(accuracy(out) - accuracy(plain.stdout)) <= 0.01, (out, plain.stdout)


def test_bad_rank_or_optimizer_is_refused_before_connecting():
    import torch

    from ps_worker import DistributedOptimizer

    model = torch.nn.Linear(2, 2)
    for kwargs, message in [
        ({"rank": 2, "world": 2}, "0 <= rank < world"),
        ({"rank": 0}, "give both"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistributedOptimizer(model, ["127.0.0.1:1"], "x", **kwargs)
