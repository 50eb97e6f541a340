"""The README's example runs as written (servers on free ports instead of 7001/7002)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.launch import BIN, Daemon

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_test_command():
    first = blocks("sh")[0].strip().splitlines()[0]
    assert first.startswith("make test")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_readme_training_example(tmp_path):
    server_lines = [
        line for block in blocks("sh") for line in block.splitlines() if "ps-server --port" in line
    ]
    assert len(server_lines) == 2
    daemons = []
    try:
        for i, line in enumerate(server_lines):
            argv = shlex.split(line.rstrip("&").strip())
            argv[0] = str(BIN / Path(argv[0]).name)
            argv[argv.index("--port") + 1] = "0"
            daemons.append(Daemon(argv, tmp_path / f"server{i}.log"))
        example = next(b for b in blocks("python") if "SERVERS = " in b)
        addresses = [d.address for d in daemons]
        example = re.sub(r"SERVERS = \[.*?\]", f"SERVERS = {addresses!r}", example)
        result = subprocess.run(
            [sys.executable, "-c", example], capture_output=True, text=True, timeout=150
        )
    finally:
        for d in daemons:
            d.stop()
    assert result.returncode == 0, result.stderr
    match = re.search(r"accuracy ([\d.]+), server versions \[(\d+), (\d+)\]", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= 0.9  # a separable toy problem
    assert match.group(2) == match.group(3) == "100"
