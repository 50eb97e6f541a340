"""The benchmarks run and write well-formed output (their speeds are not asserted)."""

import json
import subprocess
import sys

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transport_quick_writes_json_markdown_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.transport", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )
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
    # three tables: 12 + 2 + 3 rows, each with a header and a rule
    assert (tmp_path / "transport.md").read_text().count("\n|") + 1 == 12 + 2 + 3 + 6
    assert (tmp_path / "transport.png").read_bytes()[:8] == PNG


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
        assert (tmp_path / png).read_bytes()[:8] == PNG
