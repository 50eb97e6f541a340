"""The README's commands run as written (fixed ports become free ones)."""

from __future__ import annotations

import os
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


def block_with(text: str) -> list[str]:
    (block,) = [b for b in blocks("sh") if text in b]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


class ShellBlock:
    """Runs README lines: `&` lines as daemons on free ports, the rest to completion."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.addresses: dict[str, str] = {}  # the README's address -> the real one
        self.daemons: list[Daemon] = []

    def argv(self, line: str) -> list[str]:
        for written, real in self.addresses.items():
            line = line.replace(written, real)
        argv = shlex.split(line.rstrip("&").strip())
        argv[0] = str(BIN / Path(argv[0]).name)
        return argv

    def run(self, line: str) -> subprocess.CompletedProcess | Daemon:
        argv = self.argv(line)
        if not line.endswith("&"):
            return subprocess.run(argv, cwd=self.cwd, capture_output=True, text=True, timeout=120)
        port = argv[argv.index("--port") + 1] if "--port" in argv else None
        if port:
            argv[argv.index("--port") + 1] = "0"
        daemon = Daemon(argv, self.cwd / f"daemon{len(self.daemons)}.log", cwd=self.cwd)
        self.daemons.append(daemon)
        if port:
            self.addresses[f"127.0.0.1:{port}"] = daemon.address
        return daemon

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


def test_readme_starts_with_the_two_commands():
    first = [line.split("#")[0].strip() for line in blocks("sh")[0].strip().splitlines()]
    assert first == ["make demo", "make test"]


def client_example(shell: ShellBlock, directory: Path) -> Path:
    """The Client example as train.py, against the servers the README started."""
    example = next(b for b in blocks("python") if "SERVERS = " in b)
    real = [shell.addresses["127.0.0.1:7011"], shell.addresses["127.0.0.1:7012"]]
    path = directory / "train.py"
    path.write_text(re.sub(r"SERVERS = \[.*?\]", f"SERVERS = {real!r}", example))
    return path


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables a worker reads."""
    from ps_worker.environment import RANK_ENV, SERVERS_ENV, WORLD_ENV

    return {k: v for k, v in os.environ.items() if k not in (RANK_ENV, SERVERS_ENV, WORLD_ENV)}


def trained(stdout: str) -> tuple[float, int, int]:
    """The accuracy and server versions an example run printed."""
    match = re.search(r"accuracy ([\d.]+), server versions \[(\d+), (\d+)\]", stdout)
    assert match, stdout
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_readme_training_example(tmp_path):
    shell = ShellBlock(tmp_path)
    try:
        for line in block_with("ps-server --port 7011"):
            shell.run(line)
        result = subprocess.run(
            [sys.executable, str(client_example(shell, tmp_path))],
            capture_output=True,
            text=True,
            timeout=150,
            env=clean_environment(),
        )
    finally:
        shell.stop()
    assert result.returncode == 0, result.stderr
    accuracy, *versions = trained(result.stdout)
    assert accuracy >= 0.9  # a separable toy problem
    assert versions == [100, 100]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_readme_training_example_in_two_processes_at_once(tmp_path):
    """The README's two copies, as its block starts them (RANK=0 and RANK=1, concurrently):
    every update of both reaches every server (with one worker id for all, as the README
    had it, 76 of 200 were dropped as duplicates of the other copy's)."""
    from ps_worker import Client

    copies = block_with("python train.py")
    assert [line.split()[0] for line in copies] == ["RANK=0", "RANK=1"]
    shell = ShellBlock(tmp_path)
    try:
        for line in block_with("ps-server --port 7011"):
            shell.run(line)
        script = client_example(shell, tmp_path)
        processes = []
        for line in copies:
            variable, python, _ = shlex.split(line.rstrip("&").strip())
            name, value = variable.split("=")
            assert Path(python).name == "python"
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script)],
                    env={**clean_environment(), name: value},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=tmp_path,
                )
            )
        outputs = [p.communicate(timeout=200) for p in processes]
        with Client(list(shell.addresses.values()), job_id="readme") as reader:
            status = reader.status()
    finally:
        shell.stop()
    for p, (out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert trained(out)[0] >= 0.9
    assert [s.updates_applied for s in status] == [200, 200]
    assert [s.duplicates for s in status] == [0, 0]
    assert sorted(w.worker_id for w in status[0].workers) == ["worker0", "worker1"]
    assert not any(w.active for w in status[0].workers)  # both left as they finished


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_readme_daemons_by_hand(tmp_path):
    shell = ShellBlock(tmp_path)
    try:
        *start, status = block_with("ps-worker --scheduler")
        for line in start:
            outcome = shell.run(line)
            if isinstance(outcome, subprocess.CompletedProcess):
                assert outcome.returncode == 0, outcome.stderr
        worker = shell.daemons[-1]
        assert worker.proc.wait(180) == 0, worker.log.name
        result = shell.run(status)
    finally:
        shell.stop()
    assert result.returncode == 0, result.stderr
    assert "job 40/40 done" in result.stdout and "finished" in result.stdout
    assert re.search(r"test accuracy by epoch: 1: 0\.\d+ .* 5: 0\.\d+", result.stdout)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_readme_local_cluster(tmp_path):
    (line,) = block_with("ps-cluster up --dataset digits")
    result = ShellBlock(tmp_path).run(line)
    assert result.returncode == 0, result.stderr
    assert re.search(r"final test accuracy 0\.9\d", result.stdout), result.stdout


def test_readme_names_every_job_setting():
    from protos.jobspec import flag_names

    text = README.read_text()
    missing = [name for name in flag_names() if f"`{name}`" not in text]
    assert not missing, f"the README's job settings omit {missing}"
