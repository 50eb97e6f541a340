"""The benchmarks run and write well-formed output (their speeds are not asserted).

Each runs as the README's Benchmarks block writes it, with ``--out`` pointed
at a temporary directory.
"""

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks.chaos
from benchmarks import report

PNG = b"\x89PNG\r\n\x1a\n"


def readme_run(module: str, out: Path, *extra: str, flag: str = "--quick"):
    """Run the README's command line for a module (the one with flag), writing to out."""
    text = (report.ROOT / "README.md").read_text()
    lines = [
        line.strip()
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if f" -m {module} " in f"{line} " and flag in line.split()
    ]
    assert lines, f"the README shows no {flag} command for {module}"
    argv = shlex.split(lines[0])
    assert argv[0] == ".venv/bin/python", argv
    argv[0] = sys.executable
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(out)
    return subprocess.run(
        [*argv, *extra], capture_output=True, text=True, timeout=280, cwd=report.ROOT
    )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transport_quick_writes_json_markdown_and_plot(tmp_path):
    result = readme_run("benchmarks.transport", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "transport.json").read_text())
    sizes, counts = data["sizes"], data["servers"]
    assert sizes == [64 << 10, 16 << 20] and counts == [1, 2]
    assert [(r["bytes"], r["servers"], r["path"]) for r in data["results"]] == [
        (n, c, p) for n in sizes for c in counts for p in ("tcp", "unix", "shm")
    ]
    for n in sizes:
        assert data["raw_tcp"][str(n)]["gbps"] > 0
        assert data["torch_rpc"][str(n)]["push_pull_gbps"] > 0
        for c in counts:  # the servers and the client: c + 1 processes
            assert data["gloo_allreduce"][str(c + 1)][str(n)]["processes"] == c + 1
    for row in data["results"]:
        assert row["push_gbps"] > 0 and row["pull_gbps"] > 0
        tcp = data["raw_tcp"][str(row["bytes"])]["gbps"]
        assert row["ratio_vs_tcp"] == pytest.approx(row["push_pull_gbps"] / tcp)
        assert row["ratio_vs_torch_rpc"] > 0 and row["step_vs_gloo_allreduce"] > 0
    for path in ("tcp", "unix", "shm"):
        latency = data["latency"][path]
        assert latency["tiny_push_s"] > 0 and latency["grpc_round_trip_s"] > 0
    assert set(data["targets"]) == {
        "tcp_vs_raw_tcp",
        "tcp_vs_torch_rpc",
        "same_host_vs_raw_tcp",
        "step_vs_gloo_allreduce",
    }
    assert data["machine"]["cpus"] >= 1
    assert_bytes_halved(data["compression"], 16 << 20)
    # four tables: 12 + 2 + 5 + 3 rows, each with a header and a rule
    assert (tmp_path / "transport.md").read_text().count("\n|") + 1 == 12 + 2 + 5 + 3 + 8
    assert (tmp_path / "transport.png").read_bytes()[:8] == PNG


def assert_bytes_halved(rows: list[dict], nbytes: int) -> None:
    """fp16 and bf16 move exactly half of float32's bytes; top-k 1% pushes about 2%."""
    by = {r["compression"]: r for r in rows}
    assert list(by) == ["none", "fp16", "bf16", "topk:0.01", "bf16,topk:0.01"]
    assert by["none"]["push_wire_bytes"] == by["none"]["pull_wire_bytes"] == nbytes
    for half in ("fp16", "bf16"):
        assert by[half]["push_wire_bytes"] == by[half]["pull_wire_bytes"] == nbytes // 2
        assert by[half]["wire_vs_none"] == 0.5
    sparse = by["topk:0.01"]["push_wire_bytes"]  # 4-byte index + 4-byte value per element kept
    assert 0.015 * nbytes <= sparse <= 0.025 * nbytes
    assert by["bf16,topk:0.01"]["push_wire_bytes"] < sparse


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transport_compression_only_shows_the_bytes_halved(tmp_path):
    result = readme_run("benchmarks.transport", tmp_path, flag="--compression-only")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "compression.json").read_text())
    assert_bytes_halved(data["compression"], 1 << 20)
    assert (tmp_path / "compression.md").read_text().count("\n|") == 5 + 2  # and header, rule


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sync_vs_async_quick_writes_results_and_plots(tmp_path):
    result = readme_run("benchmarks.sync_vs_async", tmp_path, "--straggler", "0:2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [m["label"] for m in data["modes"]] == ["sync", "async", "ssp:1"]
    for mode in data["modes"]:
        assert 0.0 <= mode["final_accuracy"] <= 1.0
        assert mode["samples_per_s"] > 0 and mode["updates_per_s"] > 0
        assert sum(mode["staleness_histogram"].values()) > 0
        assert all(e["wall_s"] > 0 for e in mode["curves"][0])
    assert data["straggler"] == "worker 0 x2.0"
    assert (tmp_path / "results.md").read_text().count("\n| ") == 4
    for png in ("accuracy.png", "staleness.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_vs_ddp_quick_writes_ratios_and_the_report_reads_them(tmp_path):
    out = tmp_path / "vs-ddp"
    result = readme_run("benchmarks.vs_ddp", out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "vs_ddp.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["ddp", "sync", "async"]
    ddp = data["runs"][0]
    assert [e["epoch"] for e in ddp["curve"]] == [1, 2, 3]  # DDP scored after every epoch
    for run in data["runs"]:
        assert 0.0 <= run["final_accuracy"] <= 1.0 and run["wall_s"] > 0
        if run["time_to_target_s"] is not None and ddp["time_to_target_s"]:
            assert run["ratio_vs_ddp"] == pytest.approx(
                run["time_to_target_s"] / ddp["time_to_target_s"]
            )
    assert data["command"].startswith("python -m benchmarks.vs_ddp --quick")
    assert (out / "vs_ddp.png").read_bytes()[:8] == PNG
    section = report.section(tmp_path)
    assert "### Against DistributedDataParallel" in section
    assert section.count("\n| ") == 1 + len(data["runs"])  # the header, one row per run


def test_readme_results_section_is_generated_from_the_committed_json(tmp_path):
    result = readme_run("benchmarks.report", tmp_path, flag="--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Results section is current" in result.stdout


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_load_quick_reports_an_exact_sum_and_memory(tmp_path):
    result = readme_run("benchmarks.load", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "load.json").read_text())["result"]
    assert data["exact"] and data["updates_applied"] == [8 * 50] * 2
    assert data["pushes_per_s"] > 0 and len(data["peak_rss_mib"]) == 2
    assert all(p >= r for p, r in zip(data["peak_rss_mib"], data["rss_end_mib"], strict=True))
    assert (tmp_path / "load.md").read_text().count("\n| ") == 3  # header and two servers
    timeline = data["timeline"]  # (seconds, pushes done), up to the last push
    assert timeline[-1][1] == 8 * 50 and 0 < data["half_s"] < timeline[-1][0]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(timeline))
    assert (tmp_path / "load.png").read_bytes()[:8] == PNG


def test_the_report_redraws_every_figure_the_readme_shows_from_the_json_alone(tmp_path):
    for path in report.RESULTS.rglob("*.json"):
        copy = tmp_path / path.relative_to(report.RESULTS)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    redrawn = report.redraw(tmp_path)
    shown = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", report.section(tmp_path))
    assert shown and sorted({Path(p).parent for p in shown}) == sorted(redrawn)
    for png in shown:
        assert Path(png).read_bytes()[:8] == PNG, png


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_chaos_runs_the_readmes_command_and_the_report_reads_its_json(tmp_path):
    """The README's chaos command, cut to one round of one mode (the last flags win)."""
    result = readme_run(
        "benchmarks.chaos", tmp_path, "--rounds", "1", "--reference", "0", "--modes", "async",
        flag="--rounds",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "chaos.json").read_text())
    assert data["seed"] == 7 and len(data["rounds"]) == 1
    (only,) = data["rounds"]
    assert only["mode"] == "async" and only["survived"] and only["killed_at_done"] >= 2
    table = benchmarks.chaos.markdown(data)
    assert "| all |" in table and "1/1" in table
