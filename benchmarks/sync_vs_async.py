"""The modes and rules of issue 16 side by side on a local cluster, over seeds, with stragglers.

    python -m benchmarks.sync_vs_async --out bench-out/study-4 --straggler 0:3.0 --seeds 3
    python -m benchmarks.sync_vs_async --quick --out bench-out/modes-quick

Runs the same job once per variant and per seed (0..N-1, the job's ``seed``: model
initialisation and data order) on real processes. A variant is a mode and the rules it
changes (``--modes``, see :meth:`Variant.parse`): ``sync``, ``backup:B``, ``async``,
``ssp:S``, ``local:H``, ``local-async:H``, with modifiers joined by ``+``:
``async+buf4``, ``ssp:3+slr``, ``async+dc0.04``, ``async+warm100``,
``local:8+nest0.9+olr0.7``, ``async+lr0.003``, ``async+b1_0``, or any job field as
``+key=value``. What a variant does not set is the job's default for its model and
mode (the model's recipe), or what ``--set KEY=VALUE`` / ``--lr`` give every variant.

Per variant it reports the mean +- std over seeds of the final accuracy, the time (from
before the cluster starts) and the training samples to ``--target`` accuracy, samples/s
and updates/s, the pushes the servers received (summed over servers: Local SGD pushes
every local_steps batches and at each shard's end) and the median staleness (versions
applied between a worker's pull and its push). ``--dry-run`` prints each variant's job. results.json
keeps every run (per seed: the accuracy after each epoch with the elapsed time and the
samples processed, the staleness histogram, the settings the servers ran), so
``python -m benchmarks.report`` redraws the tables and figures from it alone:
results.md, accuracy_time.png, accuracy_samples.png, staleness.png.

``--repeats N`` is kept as another name for ``--seeds N`` (repeats now differ by seed).
``--async-lr`` (the earlier benchmark's) sets lr and beta1 0 and the staleness-aware
flag (on only for ``-slr``/``+slr``) on the async and ssp variants, as it did then.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.machine import command_line, machine
from benchmarks.study import markdown, run_record, summarise_variant
from benchmarks.studyplots import plot, plot_accuracy
from protos.jobspec import JobSpec, SpecError
from ps_worker.data import MANIFEST, prepare, read_manifest
from scheduler.cluster import LocalCluster, parse_straggler, summarise
from scheduler.lifecycle import STATE_FILE
from scheduler.local import Placement

__all__ = ["Variant", "base_spec", "markdown", "plot", "plot_accuracy", "run_variant"]

TARGET = 0.93  # the study's target test accuracy
QUICK_MODES = ["sync", "async+buf2", "local:4"]

# A mode's name, the mode it runs, and the field its ":N" sets (with the value a bare name
# gives it: None leaves the job's default).
_MODES: dict[str, tuple[str, str | None, int | None]] = {
    "sync": ("sync", None, None),
    "backup": ("sync", "backup_workers", 1),
    "async": ("async", None, None),
    "ssp": ("ssp", "staleness", None),
    "local": ("local", "local_steps", None),
    "local-async": ("local-async", "local_steps", None),
}
_NUM = r"(\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+(?:e-?\d+)?)"
# A modifier (after "+") and the overrides it makes; the first that matches it whole wins.
_MODIFIERS: list[tuple[str, Any]] = [
    (r"slr", lambda m: {"staleness_aware_lr": True}),
    (r"noslr", lambda m: {"staleness_aware_lr": False}),
    (r"buf(\d+)", lambda m: {"buffer": int(m[1])}),
    (rf"dc{_NUM}", lambda m: {"delay_compensation": float(m[1])}),
    (r"warm(\d+)", lambda m: {"lr_warmup": int(m[1])}),
    (rf"nest{_NUM}", lambda m: {"outer_momentum": float(m[1])}),
    (rf"olr{_NUM}", lambda m: {"outer_lr": float(m[1])}),
    (rf"lr{_NUM}", lambda m: {"lr": float(m[1])}),
    (rf"b1_{_NUM}", lambda m: {"beta1": float(m[1])}),
    (r"([a-z][a-z0-9_]*)=(.+)", lambda m: {m[1]: m[2]}),
]


@dataclass(frozen=True)
class Variant:
    """One way to run the job: a label and the job fields it sets."""

    label: str
    overrides: dict

    @classmethod
    def parse(cls, text: str, async_lr: float | None = None) -> Variant:
        """``MODE[:N][+MODIFIER...]``: sync, backup:B, async, ssp:S, local:H,
        local-async:H; modifiers slr, noslr, bufK, dcL, warmN, nestM, olrX, lrX, b1_X,
        key=value (any job field or optimizer option). A ``-slr`` suffix on the mode is the
        earlier spelling of ``+slr``. ``async_lr`` (the earlier benchmark's, kept for it and
        for benchmarks.vs_ddp) gives async and ssp lr async_lr, beta1 0 and slr off unless
        asked; modifiers win over it."""
        head, *modifiers = text.strip().split("+")
        aware = head.endswith("-slr")
        name, _, arg = head.removesuffix("-slr").partition(":")
        if name not in _MODES:
            raise argparse.ArgumentTypeError(
                f"unknown mode {name!r} in {text!r} (one of {', '.join(_MODES)})"
            )
        mode, field, bare = _MODES[name]
        overrides: dict[str, Any] = {"mode": mode}
        if arg and field is None:
            raise argparse.ArgumentTypeError(f"{name} takes no ':N' (in {text!r})")
        if field is not None and (arg or bare is not None):
            if arg and not arg.isdigit():
                raise argparse.ArgumentTypeError(f"{name}:N needs a whole number, in {text!r}")
            overrides[field] = int(arg) if arg else bare
        if async_lr is not None and mode in ("async", "ssp"):
            overrides.update(lr=async_lr, beta1=0.0, staleness_aware_lr=False)
        if aware:
            overrides["staleness_aware_lr"] = True
        for modifier in modifiers:
            overrides.update(_modifier(modifier, text))
        return cls(text, overrides)

    def spec(self, base: Mapping[str, Any], workers: int, seed: int | None = None) -> JobSpec:
        """The job this variant runs on ``base`` (a job document): JobSpec.from_dict's, so a
        value the job refuses fails with its SpecError."""
        doc = {**base, **self.overrides, "expected_workers": workers}
        return JobSpec.from_dict(doc if seed is None else {**doc, "seed": seed})


def _modifier(text: str, variant: str) -> dict[str, Any]:
    for pattern, overrides in _MODIFIERS:
        match = re.fullmatch(pattern, text)
        if match:
            return overrides(match)
    raise argparse.ArgumentTypeError(
        f"unknown modifier {text!r} in {variant!r} (slr, noslr, bufK, dcL, warmN, nestM, "
        "olrX, lrX, b1_X or key=value)"
    )


def run_variant(
    base: JobSpec | Mapping[str, Any],
    variant: Variant,
    workers: int,
    servers: int,
    slowdown: dict[int, float],
    work: Path,
    seed: int | None = None,
    placement: Placement | None = None,
) -> dict:
    """One run of a variant on a fresh local cluster (its processes on the hosts
    ``placement`` gives, or all on this one): scheduler.report's summary, with the samples
    processed by each evaluation (``samples`` in each accuracy_curve entry), the pushes the
    servers received and their delay compensation counts."""
    doc = json.loads(base.to_json()) if isinstance(base, JobSpec) else dict(base)
    spec = variant.spec(doc, workers, seed)
    started, started_at = time.monotonic(), time.time()
    cluster = LocalCluster(spec, work, workers, slowdown, servers, placement=placement)
    with cluster.start():
        progress = cluster.wait(3600)
        statuses = cluster.server_status()
        wall = time.monotonic() - started
    summary = summarise(cluster.spec, progress, statuses, wall, started_at)
    samples = _samples_at_evaluations(work / STATE_FILE)
    for entry in summary["accuracy_curve"]:
        entry["samples"] = samples.get(entry["epoch"] - 1)
    summary.update(
        label=variant.label,
        overrides=variant.overrides,
        seed=spec.seed,
        batch_size=spec.batch_size,
        recipe_applied=dict(getattr(spec, "recipe_applied", {}) or {}),
        samples=samples.get("total", 0),
        samples_per_s=samples.get("total", 0) / wall,
        updates_per_s=max(summary["updates_applied"]) / wall,
        pushes_received=[s.pushes_received for s in statuses],
        compensated=sum(getattr(s, "compensated", 0) for s in statuses),
        uncompensated=sum(getattr(s, "uncompensated", 0) for s in statuses),
    )
    return summary


def _samples_at_evaluations(db_path: Path) -> dict:
    """Training samples in shards completed when each epoch's evaluation was assigned (the
    evaluating worker pulls the weights then), by epoch from 0, and their "total"."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        done = db.execute("SELECT completed_at, samples FROM completions").fetchall()
        assigned = db.execute("SELECT epoch, assigned_at FROM evaluations").fetchall()
    finally:
        db.close()
    out: dict = {e: sum(n for t, n in done if t <= at) for e, at in assigned if at is not None}
    out["total"] = sum(n for _, n in done)
    return out


def base_doc(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The job document every variant shares: the data (args.data_dir, or prepared in tmp),
    the model, and only what the flags set; the rest is the job's defaults."""
    data = args.data_dir or tmp / "data"
    if not (data / MANIFEST).exists():
        print(f"preparing {args.dataset} ...", flush=True)
        prepare(args.dataset, data, shards=16)
    doc: dict[str, Any] = {"data_dir": str(data), "model": args.model, "lease_timeout_s": 30.0}
    for name in ("epochs", "batch_size", "lr", "optimizer"):
        if getattr(args, name, None) is not None:
            doc[name] = getattr(args, name)
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        doc[key.strip()] = value
    return doc


def base_spec(args: argparse.Namespace, tmp: Path) -> JobSpec:
    """The earlier benchmark's shared job, Adam at args.lr, built as it was (no recipe
    fills it: benchmarks.vs_ddp runs DDP and each mode on it)."""
    doc = base_doc(args, tmp)
    return JobSpec(
        data_dir=doc["data_dir"],
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        lease_timeout_s=doc["lease_timeout_s"],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the outputs go")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"digits MLP, 2 epochs, {' '.join(QUICK_MODES)}: under a minute",
    )
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="mnist1d-cnn")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--modes",
        "--variants",
        nargs="+",
        default=["sync", "backup:1", "async", "ssp:1", "ssp:3"],
        help="variants: MODE[:N][+MODIFIER...], e.g. sync async+buf4 local:8+nest0.9",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="default: the job's (the model's recipe)")
    parser.add_argument("--batch-size", type=int, help="default: the job's")
    parser.add_argument("--lr", type=float, help="every variant's lr (default: the job's)")
    parser.add_argument("--optimizer", help="every variant's optimizer (default: the job's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a job field for all"
    )
    parser.add_argument("--async-lr", type=float, help="earlier form: async and ssp lr, beta1 0")
    parser.add_argument(
        "--target", type=float, help=f"test accuracy to reach (default {TARGET}, --quick 0.6)"
    )
    parser.add_argument("--straggler", type=parse_straggler, action="append", default=[])
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds 0..N-1")
    parser.add_argument("--repeats", type=int, help="another name for --seeds")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each variant's job, check it, run nothing"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None:
        args.seeds = args.repeats
    if args.quick:
        args.dataset, args.model = "digits", "digits-mlp"
        args.epochs = args.epochs or 2
        args.batch_size = args.batch_size or 32
        if args.modes == parser.get_default("modes"):
            args.modes = QUICK_MODES
        args.target = 0.6 if args.target is None else args.target
    if args.target is None:
        args.target = TARGET
    if min(args.seeds, args.workers, args.servers) < 1:
        parser.error("--seeds, --workers and --servers must be at least 1")
    try:
        args.variants = [Variant.parse(m, args.async_lr) for m in args.modes]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if len({v.label for v in args.variants}) < len(args.variants):
        parser.error("a variant is named twice")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    slowdown = {i: f - 1.0 for i, f in args.straggler}
    with tempfile.TemporaryDirectory(prefix="modes-") as tmp:
        base = base_doc(args, Path(tmp))
        for variant in args.variants:  # every variant's job is checked before any runs
            try:
                spec = variant.spec(base, args.workers)
            except SpecError as e:
                raise SystemExit(f"variant {variant.label}: {e}") from None
            if args.dry_run:
                given = {**variant.overrides, **dict(getattr(spec, "recipe_applied", {}) or {})}
                print(f"{variant.label}: " + ", ".join(f"{k}={v}" for k, v in given.items()))
        if args.dry_run:
            return 0
        variants = []
        for variant in args.variants:
            runs = []
            for seed in range(args.seeds):
                work = Path(tmp) / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', variant.label)}-{seed}"
                summary = run_variant(
                    base, variant, args.workers, args.servers, slowdown, work, seed
                )
                runs.append(run_record(summary))
                print(
                    f"{variant.label} seed {seed}: final accuracy "
                    f"{summary['final_accuracy']:.3f} in {summary['wall_s']:.1f}s",
                    flush=True,
                )
            variants.append({"label": variant.label, "overrides": variant.overrides, "runs": runs})
        train_samples = read_manifest(Path(base["data_dir"])).train_samples
    first = variants[0]["runs"][0]
    result = {
        "benchmark": "sync_vs_async",
        "format": 2,
        "command": command_line("benchmarks.sync_vs_async", argv),
        "machine": machine(),
        "dataset": args.dataset,
        "model": args.model,
        "workers": args.workers,
        "servers": args.servers,
        "epochs": first["epochs"],
        "batch_size": first["batch_size"],
        "target_accuracy": args.target,
        "seeds": list(range(args.seeds)),
        "straggler": ", ".join(f"worker {i} x{f}" for i, f in args.straggler),
        "train_samples": train_samples,
        "variants": variants,
    }
    result["summary"] = [summarise_variant(v, args.target) for v in variants]
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    written = [args.out / "results.json", args.out / "results.md", *plot(result, args.out)]
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
