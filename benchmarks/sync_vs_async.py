"""Sync vs async vs ssp (and sync with backup workers) on a local cluster, with stragglers.

    python -m benchmarks.sync_vs_async --out bench-out/modes --straggler 0:3.0
    python -m benchmarks.sync_vs_async --quick --out bench-out/modes-quick

Runs the same job once per mode (and per repeat) on real processes and reports, per
mode: time to the target test accuracy, final accuracy, samples/s, updates applied/s,
the staleness distribution (versions applied between a worker's pull and the push
that used it: ssp's bound counts clocks, not versions) and stale gradients dropped.
Writes results.json, results.md, accuracy.png (test accuracy against the training
samples processed, so that start-up is not in the picture) and staleness.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import command_line, machine
from protos.jobspec import JobSpec
from ps_worker.data import MANIFEST, prepare, read_manifest
from scheduler.cluster import LocalCluster, parse_straggler, summarise


@dataclass(frozen=True)
class Variant:
    """One way to run the job: a mode and what it changes in the spec."""

    label: str
    overrides: dict

    @classmethod
    def parse(cls, text: str, async_lr: float) -> Variant:
        """sync | async | ssp:S | backup:B | async-slr | ssp:S-slr (slr: lr / staleness)."""
        name, _, arg = text.partition(":")
        aware = arg.endswith("-slr") or name.endswith("-slr")
        arg, name = arg.removesuffix("-slr"), name.removesuffix("-slr")
        stale = {"lr": async_lr, "beta1": 0.0, "staleness_aware_lr": aware}
        if name == "sync":
            return cls(text, {"mode": "sync"})
        if name == "backup":
            return cls(text, {"mode": "sync", "backup_workers": int(arg or 1)})
        if name == "async":
            return cls(text, {"mode": "async", **stale})
        if name == "ssp":
            return cls(text, {"mode": "ssp", "staleness": int(arg or 1), **stale})
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}")


def run_variant(
    base: JobSpec,
    variant: Variant,
    workers: int,
    servers: int,
    slowdown: dict[int, float],
    work: Path,
) -> dict:
    spec = JobSpec.from_dict(
        {**json.loads(base.to_json()), **variant.overrides, "expected_workers": workers}
    )
    started, started_at = time.monotonic(), time.time()
    with LocalCluster(spec, work, workers, slowdown, servers).start() as cluster:
        progress = cluster.wait(3600)
        statuses = cluster.server_status()
        wall = time.monotonic() - started
    summary = summarise(cluster.spec, progress, statuses, wall, started_at)
    summary["label"] = variant.label
    summary["samples_per_s"] = sum(s.samples for s in _completions(work)) / wall
    summary["updates_per_s"] = max(summary["updates_applied"]) / wall
    return summary


def _completions(work: Path):
    from scheduler.state import SchedulerState

    state = SchedulerState(str(work / "scheduler.db"))
    try:
        return state.completions()
    finally:
        state.close()


def aggregate(label: str, runs: list[dict], target: float) -> dict:
    """Medians over repeats; the staleness histogram summed over servers and repeats."""

    def to_target(run: dict) -> float | None:
        return next((e["wall_s"] for e in run["accuracy_curve"] if e["accuracy"] >= target), None)

    times = [to_target(r) for r in runs]
    reached = [t for t in times if t is not None]
    staleness: Counter[int] = Counter()
    for run in runs:
        for server in run["staleness_histogram"][:1]:  # every server sees every push
            staleness.update({int(k): v for k, v in server.items()})
    return {
        "label": label,
        "mode": runs[0]["mode"],
        "repeats": len(runs),
        "time_to_target_s": statistics.median(reached) if len(reached) == len(runs) else None,
        "final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
        "updates_per_s": statistics.median(r["updates_per_s"] for r in runs),
        "stale_dropped": statistics.median(max(r["stale_dropped"]) for r in runs),
        "staleness_histogram": dict(sorted(staleness.items())),
        "curves": [r["accuracy_curve"] for r in runs],
    }


def markdown(result: dict) -> str:
    target = result["target_accuracy"]
    lines = [
        f"{result['model']} on {result['dataset']}, {result['workers']} workers, "
        f"{result['servers']} servers, {result['epochs']} epochs, straggler "
        f"{result['straggler'] or 'none'}; medians of {result['repeats']} run(s).",
        "",
        f"| mode | time to {target:.0%} (s) | vs sync | final accuracy | samples/s | updates/s | "
        "median staleness (versions) | stale dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sync = next((m["time_to_target_s"] for m in result["modes"] if m["label"] == "sync"), None)
    for r in result["modes"]:
        hist = r["staleness_histogram"]
        expanded = sorted(int(k) for k, n in hist.items() for _ in range(n))
        median = expanded[len(expanded) // 2] if expanded else 0
        t = r["time_to_target_s"]
        lines.append(
            f"| {r['label']} | {'not reached' if t is None else f'{t:.1f}'} | "
            f"{f'{t / sync:.2f}' if t is not None and sync else '-'} | "
            f"{r['final_accuracy']:.3f} | {r['samples_per_s']:.0f} | {r['updates_per_s']:.1f} | "
            f"{median} | {r['stale_dropped']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(
    runs: list[tuple[str, list[dict], dict]],
    train_samples: int,
    target: float,
    title: str,
    path: Path,
) -> None:
    """Test accuracy against the training samples processed (epochs done x the training
    split), so that start-up, which differs between runs, is not on the axis: one line
    per (label, curve, line style) run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve, style in runs:
        ax.plot(
            [e["epoch"] * train_samples for e in curve],
            [e["accuracy"] for e in curve],
            marker="o",
            label=label,
            **style,
        )
    ax.axhline(target, color="grey", linestyle=":", label="target")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"training samples processed (epochs x {train_samples:,})")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    accuracy = out / "accuracy.png"
    plot_accuracy(
        [(r["label"], r["curves"][0], {}) for r in result["modes"]],
        result["train_samples"],
        result["target_accuracy"],
        f"{result['model']}: test accuracy after each epoch",
        accuracy,
    )

    modes = result["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(3 * len(modes), 3), squeeze=False)
    for ax, r in zip(axes[0], modes, strict=True):
        hist = r["staleness_histogram"]
        ax.bar([int(k) for k in hist], list(hist.values()))
        ax.set_title(r["label"])
        ax.set_xlabel("staleness (versions)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, max([1, *map(int, hist)]) + 0.6)  # one bar (sync) stays a bar
    axes[0][0].set_ylabel("pushes")
    fig.suptitle(
        "staleness of each push: versions applied between its pull and its arrival "
        "(ssp's bound counts clocks)",
        fontsize="medium",
    )
    fig.tight_layout()
    staleness = out / "staleness.png"
    fig.savefig(staleness, dpi=120)
    plt.close(fig)
    return [accuracy, staleness]


def base_spec(args: argparse.Namespace, tmp: Path) -> JobSpec:
    """The job every run shares (Adam at args.lr), on args.data_dir or data prepared in tmp."""
    data = args.data_dir or tmp / "data"
    if not (data / MANIFEST).exists():
        print(f"preparing {args.dataset} ...", flush=True)
        prepare(args.dataset, data, shards=16)
    return JobSpec(
        data_dir=str(data),
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        lease_timeout_s=30.0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the outputs go")
    parser.add_argument(
        "--quick", action="store_true", help="digits MLP, 2 epochs, 3 modes: under a minute"
    )
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="mnist1d-cnn")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--modes", nargs="+", default=["sync", "backup:1", "async", "ssp:1", "ssp:3"]
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01, help="sync's learning rate")
    parser.add_argument(
        "--async-lr", type=float, default=0.003, help="async and ssp learning rate (Adam, beta1 0)"
    )
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--straggler", type=parse_straggler, action="append", default=[])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.model, args.epochs, args.batch_size = "digits", "digits-mlp", 2, 32
        args.modes, args.async_lr, args.lr = ["sync", "async", "ssp:1"], 0.003, 0.003
        args.target = 0.8
    variants = [Variant.parse(m, args.async_lr) for m in args.modes]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modes-") as tmp:
        base = base_spec(args, Path(tmp))
        data = Path(base.data_dir)
        slowdown = {i: f - 1.0 for i, f in args.straggler}
        modes = []
        for variant in variants:
            runs = []
            for repeat in range(args.repeats):
                work = Path(tmp) / f"{variant.label.replace(':', '-')}-{repeat}"
                runs.append(run_variant(base, variant, args.workers, args.servers, slowdown, work))
                print(
                    f"{variant.label} run {repeat + 1}: final accuracy "
                    f"{runs[-1]['final_accuracy']:.3f} in {runs[-1]['wall_s']:.1f}s",
                    flush=True,
                )
            modes.append(aggregate(variant.label, runs, args.target))
        result = {
            "benchmark": "sync_vs_async",
            "command": command_line("benchmarks.sync_vs_async", argv),
            "machine": machine(),
            "dataset": args.dataset,
            "model": args.model,
            "workers": args.workers,
            "servers": args.servers,
            "epochs": args.epochs,
            "target_accuracy": args.target,
            "repeats": args.repeats,
            "straggler": ", ".join(f"worker {i} x{f}" for i, f in args.straggler),
            "train_samples": read_manifest(data).train_samples,
            "modes": modes,
        }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    written = [args.out / "results.json", args.out / "results.md", *plot(result, args.out)]
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
