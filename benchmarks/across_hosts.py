"""The same job on one host and across hosts, seed by seed: what the network costs a job.

    python -m benchmarks.across_hosts --quick --out bench-out/across-hosts
    python -m benchmarks.across_hosts --seeds 2 --out benchmarks/results/across-hosts

Runs the MNIST-1D CNN in a mode (``--mode``, default ssp as ``make demo`` does, with
its recipe) with 2 servers and 3 workers: once with every process on this host
(workers reach the servers through shared memory), then with the scheduler, each
server and each worker on a host of its own (network namespaces on a bridge, each
link shaped to ``--link-gbit``; workers reach the servers over the bulk data plane).
Both share this machine's cores, so the difference is what the network and the
cross-host path cost. Reports each run's time and samples to the target accuracy
and the ratio of the times, against the issue's target (at most 1.2). Needs root.
Writes across_hosts.json and across_hosts.md to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.hosts import Hosts, LinkModel, spread, unavailable
from benchmarks.machine import command_line, machine
from benchmarks.study import run_record, to_target
from benchmarks.sync_vs_async import TARGET, Variant, base_doc, run_variant

GOAL = 1.2  # time to the target across hosts / on one host, at most
WHERE = ("one host", "across hosts")


def reached_over(work: Path) -> list[str]:
    """How each worker said it reached the servers (``servers reached over: ...``)."""
    said = [
        re.search(r"servers reached over: (.+)$", log.read_text(), re.M)
        for log in sorted(work.glob("worker*.log"))
    ]
    return sorted({m.group(1) for m in said if m})


def run_seed(args: argparse.Namespace, base: dict, work: Path, seed: int) -> dict:
    """The job on one host, then across hosts: each run's record and how it was reached."""
    variant = Variant.parse(args.mode)
    hosts_needed = 1 + args.servers + args.workers
    out = {"seed": seed}
    for where in WHERE:
        place = work / f"{where.replace(' ', '-')}-{seed}"
        if where == "one host":
            summary = run_variant(base, variant, args.workers, args.servers, {}, place, seed)
        else:
            with Hosts(hosts_needed, LinkModel(rate_gbit=args.link_gbit)) as hosts:
                placement = spread(hosts, args.servers)
                summary = run_variant(
                    base, variant, args.workers, args.servers, {}, place, seed, placement
                )
        out[where] = {**run_record(summary), "reached_over": reached_over(place)}
        print(
            f"seed {seed}, {where}: final accuracy {summary['final_accuracy']:.3f} in "
            f"{summary['wall_s']:.1f}s, servers reached over {out[where]['reached_over']}",
            flush=True,
        )
    return out


def time_to(run: dict, target: float) -> float | None:
    reached = to_target(run, target)
    return None if reached is None else reached["wall_s"]


def summarise(result: dict) -> dict:
    """Per seed the time ratio (across / one host) to the target; their mean; the goal."""
    target = result["target_accuracy"]
    ratios = []
    for seed in result["seeds"]:
        one, across = (time_to(seed[w], target) for w in WHERE)
        seed["time_ratio"] = None if one is None or across is None else across / one
        if seed["time_ratio"] is not None:
            ratios.append(seed["time_ratio"])
    return {
        "goal": GOAL,
        "measured": statistics.fmean(ratios) if ratios else None,
        "reached": len(ratios),
    }


def markdown(result: dict) -> str:
    target = result["target_accuracy"]
    servers, workers = result["servers"], result["workers"]
    lines = [
        f"{result['model']}, {result['mode']}, {servers} server{'s' * (servers != 1)} and "
        f"{workers} worker{'s' * (workers != 1)}; across hosts: the scheduler, each server "
        f"and each worker on a host of its own, links of {result['link']}. Time to "
        f"{target:.0%} test accuracy (s) and final accuracy:",
        "",
        "| seed | one host | across hosts | time across / one host | reached over |",
        "|---:|---:|---:|---:|---|",
    ]
    for seed in result["seeds"]:
        cells = []
        for where in WHERE:
            t = time_to(seed[where], target)
            shown = "not reached" if t is None else f"{t:.1f}"
            cells.append(f"{shown} ({seed[where]['final_accuracy']:.3f})")
        ratio = seed.get("time_ratio")
        over = " / ".join(", ".join(seed[w]["reached_over"]) for w in WHERE)
        lines.append(
            f"| {seed['seed']} | {cells[0]} | {cells[1]} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {over} |"
        )
    s = result["summary"]
    measured = "-" if s["measured"] is None else f"{s['measured']:.2f}"
    met = s["measured"] is not None and s["measured"] <= s["goal"]
    lines += [
        "",
        "| target | goal | measured | |",
        "|---|---:|---:|---|",
        f"| time to {target:.0%} across hosts / on one host (mean over seeds) | "
        f"<= {s['goal']} | {measured} | {'met' if met else '**missed**'} |",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the outputs go")
    parser.add_argument(
        "--quick", action="store_true", help="digits MLP, 1 epoch, 1 server, 1 worker"
    )
    parser.add_argument("--mode", default="ssp", help="a variant, as benchmarks.sync_vs_async")
    parser.add_argument("--seeds", type=int, default=1, help="runs per place, seeds 0..N-1")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--link-gbit", type=float, default=10.0, help="each host's link rate")
    parser.add_argument("--target", type=float, help=f"test accuracy (default {TARGET})")
    args = parser.parse_args(argv)
    args.dataset, args.model, args.data_dir = "mnist1d", "mnist1d-cnn", None
    args.epochs = args.batch_size = args.lr = args.optimizer = None
    if args.quick:
        args.dataset, args.model, args.epochs = "digits", "digits-mlp", 1
        args.servers, args.workers = 1, 1
        args.target = 0.3 if args.target is None else args.target
    if args.target is None:
        args.target = TARGET
    if min(args.seeds, args.workers, args.servers) < 1 or args.link_gbit <= 0:
        parser.error("--seeds, --workers, --servers and --link-gbit must be positive")
    if why := unavailable():
        parser.error(f"hosts cannot be made here: {why}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="across-") as tmp:
        base = base_doc(args, Path(tmp))
        seeds = [run_seed(args, base, Path(tmp), seed) for seed in range(args.seeds)]
    result = {
        "benchmark": "across_hosts",
        "command": command_line("benchmarks.across_hosts", argv),
        "machine": machine(),
        "model": args.model,
        "mode": args.mode,
        "servers": args.servers,
        "workers": args.workers,
        "link": str(LinkModel(rate_gbit=args.link_gbit)),
        "target_accuracy": args.target,
        "seeds": seeds,
    }
    result["summary"] = summarise(result)
    (args.out / "across_hosts.json").write_text(json.dumps(result, indent=2))
    (args.out / "across_hosts.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}/across_hosts.json, across_hosts.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
