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
    assert [r["servers"] for r in data["results"]] == [1, 2]
    for row in data["results"]:
        assert row["push_gbps"] > 0 and row["pull_gbps"] > 0
        assert row["ratio_vs_tcp"] == pytest.approx(row["push_pull_gbps"] / data["raw_tcp"]["gbps"])
    assert table.read_text().count("\n|") == 4  # header, rule, two rows
