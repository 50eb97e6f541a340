"""The benchmarks run and write well-formed output (their speeds are not asserted)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transport_quick_writes_json(tmp_path):
    out = tmp_path / "transport.json"
    table = tmp_path / "transport.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.transport",
            "--quick",
            "--json",
            str(out),
            "--markdown",
            str(table),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["model_bytes"] >= 64 << 20
    assert data["raw_tcp"]["gbps"] > 0
    assert [(r["servers"], r["path"]) for r in data["results"]] == [
        (1, "tcp"),
        (1, "unix"),
        (2, "tcp"),
        (2, "unix"),
    ]
    assert data["torch_rpc"]["push_pull_gbps"] > 0
    assert data["gloo_allreduce"]["processes"] == 2 and data["gloo_allreduce"]["allreduce_s"] > 0
    for row in data["results"]:
        assert row["push_gbps"] > 0 and row["pull_gbps"] > 0
        assert row["ratio_vs_tcp"] == pytest.approx(row["push_pull_gbps"] / data["raw_tcp"]["gbps"])
        assert row["ratio_vs_torch_rpc"] > 0 and row["step_vs_gloo_allreduce"] > 0
    for path in ("tcp", "unix"):
        latency = data["latency"][path]
        assert latency["tiny_push_s"] > 0 and latency["grpc_round_trip_s"] > 0
    assert table.read_text().count("\n|") == 10  # two tables: 4 + 2 rows, headers and rules


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sync_vs_async_quick_writes_results_and_plots(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sync_vs_async",
            "--quick",
            "--out",
            str(tmp_path),
            "--straggler",
            "0:2.0",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
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
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
