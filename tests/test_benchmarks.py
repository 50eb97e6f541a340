"""The benchmarks run and write well-formed output (their speeds are not asserted).

Each runs as the README's Benchmarks block writes it, with ``--out`` pointed
at a temporary directory.
"""

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks.chaos
from benchmarks import report, study, sync_vs_async
from benchmarks.hosts import unavailable
from benchmarks.sync_vs_async import Variant
from protos.jobspec import SpecError

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
    # CI time: one server count (the netns test below runs one, benchmarks.load many)
    result = readme_run("benchmarks.transport", tmp_path, "--repeats", "1", "--servers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "transport.json").read_text())
    sizes, counts = data["sizes"], data["servers"]
    assert sizes == [64 << 10, 16 << 20] and counts == [1]
    assert [(r["bytes"], r["servers"], r["path"]) for r in data["results"]] == [
        (n, c, p) for n in sizes for c in counts for p in ("tcp", "bulk", "unix", "shm")
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
    for path in ("tcp", "bulk", "unix", "shm"):
        latency = data["latency"][path]
        assert latency["tiny_push_s"] > 0 and latency["grpc_round_trip_s"] > 0
    assert set(data["targets"]) == {
        "bulk_vs_raw_tcp",
        "tiny_push_vs_grpc",
        "shm_vs_torch_rpc",
        "same_host_vs_raw_tcp",
        "step_vs_gloo_allreduce",
    }
    assert data["machine"]["cpus"] >= 1 and data["hosts"] == "loopback"
    assert_bytes_halved(data["compression"], 16 << 20)
    # four tables: 8 + 2 + 5 + 4 rows, each with a header and a rule
    assert (tmp_path / "transport.md").read_text().count("\n|") + 1 == 8 + 2 + 5 + 4 + 8
    assert (tmp_path / "transport.png").read_bytes()[:8] == PNG
    section = "\n".join(report.transport(data, tmp_path))
    assert "| push+pull over bulk / raw TCP | >= 0.7 |" in section


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transport_across_hosts_measures_the_cross_host_paths(tmp_path):
    if why := unavailable():
        pytest.skip(why)
    result = readme_run("benchmarks.transport", tmp_path, flag="--hosts")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "transport.json").read_text())
    assert data["hosts"] == "netns" and data["paths"] == ["tcp", "bulk"]
    assert data["sizes"] == [16 << 20]
    assert [(r["servers"], r["path"]) for r in data["results"]] == [(1, "tcp"), (1, "bulk")]
    assert all(r["push_pull_gbps"] > 0 for r in data["results"])
    assert set(data["latency"]) == {"tcp", "bulk"} and data["compression"] == []
    assert set(data["targets"]) == {
        "bulk_vs_raw_tcp",
        "bulk_vs_torch_rpc",
        "tiny_push_vs_grpc",
        "step_vs_gloo_allreduce",
    }
    section = "\n".join(report.transport(data, tmp_path))
    assert section.startswith("### Transport across hosts (network namespaces)")
    assert "| push+pull over bulk / torch rpc (across hosts) | >= 1.0 |" in section
    assert (tmp_path / "transport.png").read_bytes()[:8] == PNG


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_across_hosts_quick_runs_the_job_on_one_host_and_across_hosts(tmp_path):
    if why := unavailable():
        pytest.skip(why)
    result = readme_run("benchmarks.across_hosts", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "across_hosts.json").read_text())
    (seed,) = data["seeds"]
    assert seed["one host"]["reached_over"] == ["shm"]  # same host: shared memory
    assert seed["across hosts"]["reached_over"] == ["bulk"]  # elsewhere: the bulk data plane
    for where in ("one host", "across hosts"):
        assert seed[where]["final_accuracy"] >= data["target_accuracy"], seed[where]
    assert data["summary"]["reached"] == 1 and data["summary"]["measured"] > 0
    assert (
        "| time to 30% across hosts / on one host (mean over seeds) | <= 1.2 |"
        in (tmp_path / "across_hosts.md").read_text()
    )


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
def test_sync_vs_async_quick_writes_every_run_and_the_report_reads_it(tmp_path):
    """The README's --quick command, one epoch, over 2 seeds: every run kept, a buffer of 2
    averaging two pushes per update, Local SGD pushing less, the tables and figures."""
    out = tmp_path / "study-4"
    modes = ("--modes", "async+buf2", "local:4")
    small = ("--epochs", "1", "--workers", "2", "--servers", "1")  # CI time
    extra = ("--straggler", "0:2.0", "--seeds", "2", *modes, *small)
    result = readme_run("benchmarks.sync_vs_async", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == 2 and data["seeds"] == [0, 1]
    assert [v["label"] for v in data["variants"]] == ["async+buf2", "local:4"]
    assert data["variants"][1]["overrides"] == {"mode": "local", "local_steps": 4}
    for variant in data["variants"]:
        assert [r["seed"] for r in variant["runs"]] == [0, 1]
        for run in variant["runs"]:
            assert 0.0 <= run["final_accuracy"] <= 1.0
            assert run["samples_per_s"] > 0 and run["updates_per_s"] > 0
            assert sum(run["pushes_received"]) > 0 and sum(run["staleness_histogram"].values())
            assert [e["epoch"] for e in run["curve"]] == list(range(1, data["epochs"] + 1))
            for e in run["curve"]:  # an epoch is evaluated once all of its shards are done
                assert e["wall_s"] > 0 and e["samples"] >= e["epoch"] * data["train_samples"]
    buffered, local = data["variants"]
    for run in buffered["runs"]:  # two pushes an update (an odd last one may be pending)
        pushes, updates = run["pushes_received"][0], run["updates_applied"][0]
        assert "(buffer 2)" in run["settings"] and abs(2 * updates - pushes) <= 1
    assert all(set(r["staleness_histogram"]) == {"0"} for r in local["runs"])
    assert all("4 local steps" in r["settings"] for r in local["runs"])
    # a push per 4 batches, or per task (shard) when that ends first: 3 batches of 32 here
    for a, b in zip(buffered["runs"], local["runs"], strict=True):
        assert sum(b["pushes_received"]) * 2.5 < sum(a["pushes_received"])
    assert data["straggler"] == "worker 0 x2.0"
    assert (out / "results.md").read_text().count("\n| ") == 1 + 2  # the header, 2 variants
    for png in ("accuracy_time.png", "accuracy_samples.png", "staleness.png"):
        assert (out / png).read_bytes()[:8] == PNG
    section = report.section(tmp_path)
    assert "### Modes and rules: 2 workers, 1 server, straggler worker 0 x2.0" in section
    assert "### Which mode and rule, when" in section
    assert report.redraw(tmp_path) == [out]


def test_variants_spell_every_mode_and_rule():
    """Each mode and modifier, composed, becomes the job fields it names; old spellings stay."""
    cases = {
        "sync": {"mode": "sync"},
        "backup:2": {"mode": "sync", "backup_workers": 2},
        "backup": {"mode": "sync", "backup_workers": 1},
        "async": {"mode": "async"},
        "ssp:3": {"mode": "ssp", "staleness": 3},
        "local:8": {"mode": "local", "local_steps": 8},
        "local-async:4": {"mode": "local-async", "local_steps": 4},
        "async+buf4": {"mode": "async", "buffer": 4},
        "ssp:3+slr": {"mode": "ssp", "staleness": 3, "staleness_aware_lr": True},
        "ssp:3-slr": {"mode": "ssp", "staleness": 3, "staleness_aware_lr": True},
        "async-slr": {"mode": "async", "staleness_aware_lr": True},
        "async+noslr": {"mode": "async", "staleness_aware_lr": False},
        "async+dc0.04": {"mode": "async", "delay_compensation": 0.04},
        "async+warm100": {"mode": "async", "lr_warmup": 100},
        "local:8+nest0.9+olr0.7": {
            "mode": "local", "local_steps": 8, "outer_momentum": 0.9, "outer_lr": 0.7,
        },
        "async+lr0.003+b1_0": {"mode": "async", "lr": 0.003, "beta1": 0.0},
        "async+buf2+lr_schedule=constant": {
            "mode": "async", "buffer": 2, "lr_schedule": "constant",
        },
    }  # fmt: skip
    base = {"data_dir": "data", "model": "mnist1d-cnn"}
    for text, overrides in cases.items():
        variant = Variant.parse(text)
        assert (variant.label, variant.overrides) == (text, overrides)
        spec = variant.spec(base, workers=4, seed=2)
        assert (spec.mode, spec.seed, spec.expected_workers) == (overrides["mode"], 2, 4)
    spec = Variant.parse("local:8+nest0.9+olr0.7").spec(base, 4)
    assert (spec.local_steps, spec.outer_momentum, spec.outer_lr) == (8, 0.9, 0.7)
    # the earlier benchmark's async lr (benchmarks.vs_ddp): lr, beta1 0, slr only if asked
    assert Variant.parse("async", 0.003).overrides == {
        "mode": "async", "lr": 0.003, "beta1": 0.0, "staleness_aware_lr": False,
    }  # fmt: skip
    assert Variant.parse("ssp:1-slr+lr0.01", 0.003).overrides["lr"] == 0.01
    for bad in ("foo", "async+zzz", "ssp:x", "async:3", "local:8+nest"):
        with pytest.raises(argparse.ArgumentTypeError):
            Variant.parse(bad)
    for refused in ("sync+buf4", "local:0", "async+dc-1", "local:8+nest1.5"):
        with pytest.raises((SpecError, argparse.ArgumentTypeError)):
            Variant.parse(refused).spec(base, 4)


def _run(seed: int, curve: list[tuple[float, float]], staleness: dict, pushes: int) -> dict:
    """A run as results.json keeps it: curve is (seconds, accuracy) after each epoch."""
    return {
        "seed": seed, "mode": "async", "settings": "s", "wall_s": curve[-1][0],
        "final_accuracy": curve[-1][1], "samples_per_s": 100.0, "updates_per_s": 10.0,
        "pushes_received": [pushes, pushes], "stale_dropped": [0, 0], "compensated": 0,
        "staleness_histogram": {str(k): n for k, n in staleness.items()},
        "curve": [
            {"epoch": i + 1, "wall_s": t, "accuracy": a, "samples": 1000 * (i + 1)}
            for i, (t, a) in enumerate(curve)
        ],
    }  # fmt: skip


def test_the_study_tables_are_computed_from_the_runs():
    """Mean +- std over seeds, targets missed by some seeds, the median staleness, and the
    rule chosen: the fastest to the target of those within 1 point of the best accuracy."""
    slow = [_run(s, [(10, 0.90), (20, 0.95 + s / 100)], {0: 3, 1: 1}, 80) for s in (0, 1)]
    fast = [_run(s, [(5 + s, 0.94), (10, 0.948)], {2: 1, 5: 3}, 10) for s in (0, 1)]
    flaky = [_run(0, [(4, 0.97), (8, 0.97)], {}, 80), _run(1, [(4, 0.5), (8, 0.5)], {}, 80)]
    result = {
        "target_accuracy": 0.93, "workers": 4, "servers": 2, "straggler": "", "seeds": [0, 1],
        "model": "m", "dataset": "d", "epochs": 2, "batch_size": 10,
        "variants": [
            {"label": "sync", "runs": slow}, {"label": "local:8", "runs": fast},
            {"label": "async", "runs": flaky},
        ],
    }  # fmt: skip
    sync, local, flaky_row = study.summaries(result)
    assert sync["final_accuracy"]["mean"] == pytest.approx(0.955)
    assert sync["final_accuracy"]["std"] == pytest.approx(0.00707, abs=1e-4)
    assert sync["time_to_target_s"] == {"mean": 20.0, "std": 0.0, "n": 2}
    assert local["samples_to_target"]["mean"] == 1000 and local["pushes"]["mean"] == 20
    assert (sync["median_staleness"], local["median_staleness"]) == (0, 5)
    assert flaky_row["time_to_target_s"]["n"] == 1  # one seed of two reached it
    chosen, close = study.best(result)
    assert chosen["label"] == "local:8" and [r["label"] for r in close] == ["sync", "local:8"]
    table = study.which_rule_when([result])
    assert "| local:8 | 0.948 ± 0.000 | 5.5 ± 0.7 | 0.28 | sync |" in table
    flaky[1].update(compensated=3, uncompensated=1)
    assert study.summaries(result)[2]["compensated_share"] == 0.75
    table = study.markdown(result)
    assert "| async | 0.735 ± 0.332 | 4.0 (1/2) | 0.20 |" in table
    assert "- async: s; 75% of the pushes compensated" in table and "- sync: s\n" in table


def _variant(label: str, mode: str, runs: list[dict]) -> dict:
    return {"label": label, "runs": [{**r, "mode": mode} for r in runs]}


def test_the_targets_are_measured_from_the_runs():
    """With a straggler: the fastest asynchronous variant within 1 point of sync, its time
    over sync's; without: the best asynchronous accuracy against sync's; Local SGD's pushes."""
    sync = [_run(s, [(10, 0.90), (20, 0.95)], {0: 4}, 800) for s in (0, 1)]
    fast = [_run(s, [(4, 0.94), (8, 0.945)], {3: 4}, 900) for s in (0, 1)]
    faster_but_worse = [_run(s, [(2, 0.93), (4, 0.931)], {3: 4}, 900) for s in (0, 1)]
    local = [_run(s, [(12, 0.93), (20, 0.951)], {0: 4}, 100) for s in (0, 1)]
    result = {
        "target_accuracy": 0.93, "workers": 4, "servers": 2, "straggler": "worker 0 x3.0",
        "seeds": [0, 1], "model": "m", "dataset": "d", "epochs": 2, "batch_size": 10,
        "variants": [
            _variant("sync", "sync", sync), _variant("async", "async", fast),
            _variant("ssp", "ssp", faster_but_worse), _variant("local:8", "local", local),
        ],
    }  # fmt: skip
    table = study.targets([result])
    assert "| <= 0.6 | 0.20 (async) | met |" in table  # ssp is faster but 2 points worse
    assert "| >= 4, >= +0.000 | 8.0, +0.001 (local:8) | met |" in table
    result["straggler"] = ""
    table = study.targets([result])
    assert "best asynchronous final accuracy - sync's (0.950)" in table
    assert "| -0.005 (async) | met |" in table
    for run in result["variants"][3]["runs"]:
        run["final_accuracy"] = 0.94
    assert "8.0, -0.010 (local:8) | **missed** |" in study.targets([result])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_vs_ddp_quick_writes_ratios_and_the_report_reads_them(tmp_path):
    out = tmp_path / "vs-ddp"
    result = readme_run("benchmarks.vs_ddp", out, "--workers", "2", "--servers", "1")  # CI time
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


@pytest.mark.timeout(60)
def test_sync_vs_async_checks_every_variant_before_running_any(tmp_path, capsys):
    """A variant the job refuses stops the study at once with JobSpec's error; --dry-run
    prints each variant's job (its overrides and what the model's recipe filled)."""
    argv = ["--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    assert sync_vs_async.main([*argv, "--dry-run", "--modes", "sync", "local:4+olr0.5"]) == 0
    printed = capsys.readouterr().out
    assert "local:4+olr0.5: mode=local, local_steps=4, outer_lr=0.5" in printed
    with pytest.raises(SystemExit, match=r"variant local:4\+buf2: buffer applies to modes"):
        sync_vs_async.main([*argv, "--modes", "sync", "local:4+buf2"])
    assert not (tmp_path / "results.json").exists()
