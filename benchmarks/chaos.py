"""Chaos rounds, many: how often a job survives a SIGKILL mid-training, per mode and victim.

    python -m benchmarks.chaos --rounds 30 --seed 7 --out benchmarks/results/chaos

Round i runs the chaos job (benchmarks/chaoskit.py) in mode i mod 4 (sync, async,
ssp, backup), kills the victims drawn from the seed at the moment drawn from it,
and checks what tests/test_chaos.py checks (finished, accuracy band, every shard
once, nothing left behind). ``--reference N`` first runs each mode N times
unkilled, for the accuracy band. Writes chaos.json and chaos.md; a failed
round's work dir (its logs) is kept and named in the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks import chaoskit
from benchmarks.machine import command_line, machine


def reference(data: Path, mode: str, tmp: Path) -> float:
    """An unkilled run of the chaos job in mode: its final accuracy."""
    from scheduler.local import LocalCluster

    spec = chaoskit.chaos_spec(data, mode)
    cluster = LocalCluster(spec, tmp, chaoskit.WORKERS, num_servers=chaoskit.SERVERS)
    with cluster.start():
        progress = cluster.wait(chaoskit.JOB_TIMEOUT_S)
        cluster.end_job()
    return progress["evaluations"][-1]["accuracy"]


def markdown(result: dict) -> str:
    rounds = result["rounds"]
    modes = list(chaoskit.MODES)
    kinds = [k for k in chaoskit.VICTIMS if any(r["victims"] == k for r in rounds)]

    def cell(mode: str | None, kind: str | None) -> str:
        match = [
            r
            for r in rounds
            if (mode is None or r["mode"] == mode) and (kind is None or r["victims"] == kind)
        ]
        ok = sum(r["survived"] for r in match)
        return f"{ok}/{len(match)}" if match else "-"

    ref = result["reference"]
    band = (
        ", ".join(f"{m} {min(a):.2f}-{max(a):.2f}" for m, a in ref.items() if a) or "not measured"
    )
    lines = [
        f"{result['model']} on {result['dataset']}, {result['servers']} servers, "
        f"{result['workers']} workers, {result['epochs']} epochs; {len(rounds)} rounds, seed "
        f"{result['seed']}. Survived / rounds, per victim (SIGKILL once the scheduler has "
        "recorded a drawn number of completed shards) and mode; a round survives when the job "
        f"finishes with accuracy >= {result['accuracy_floor']:.3f}, every shard of every epoch "
        "completed exactly once, and no process, server socket or shared-memory segment "
        f"left. Unkilled accuracy: {band}.",
        "",
        "| victim | " + " | ".join(modes) + " | all |",
        "|---|" + "---:|" * (len(modes) + 1),
    ]
    for kind in kinds:
        lines.append(
            f"| {kind} | " + " | ".join(cell(m, kind) for m in modes) + f" | {cell(None, kind)} |"
        )
    lines.append("| all | " + " | ".join(cell(m, None) for m in modes) + f" | {cell(None, None)} |")
    failed = [r for r in rounds if not r["survived"]]
    if failed:
        lines += ["", "Failed rounds:", ""]
        lines += [f"- {r['describe']}: {'; '.join(r['failures'])[:300]}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the outputs go")
    parser.add_argument("--rounds", type=int, default=30, help="rounds in all (default 30)")
    parser.add_argument("--seed", type=int, help=f"default: ${chaoskit.SEED_ENV}, else random")
    parser.add_argument("--modes", nargs="+", choices=list(chaoskit.MODES), default=None)
    parser.add_argument("--reference", type=int, default=0, help="unkilled runs per mode")
    args = parser.parse_args(argv)
    seed = chaoskit.seed_from_env() if args.seed is None else args.seed
    modes = args.modes or list(chaoskit.MODES)
    print(f"chaos seed {seed}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    ref: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        data = chaoskit.prepared_data(Path(tmp) / "data")
        for i in range(args.reference * len(modes)):
            mode = modes[i % len(modes)]
            ref[mode].append(reference(data, mode, Path(tmp) / f"reference{i}"))
            print(f"reference {mode}: accuracy {ref[mode][-1]:.3f}", flush=True)
        for i in range(args.rounds):
            plan = chaoskit.plan(seed, modes[i % len(modes)], i)
            work = Path(tempfile.mkdtemp(prefix=f"chaos-round{i}-"))
            outcome = chaoskit.run_round(plan, data, work)
            if outcome.survived:
                shutil.rmtree(work, ignore_errors=True)
            print(f"round {i + 1}/{args.rounds}: {chaoskit.summary_line(outcome)}", flush=True)
            outcomes.append(outcome)
    result = {
        "benchmark": "chaos",
        "command": command_line("benchmarks.chaos", argv),
        "machine": machine(),
        "seed": seed,
        "dataset": chaoskit.DATASET,
        "model": chaoskit.MODEL,
        "servers": chaoskit.SERVERS,
        "workers": chaoskit.WORKERS,
        "epochs": chaoskit.EPOCHS,
        "accuracy_floor": chaoskit.ACCURACY_FLOOR,
        "reference": ref,
        "rounds": [
            {
                "mode": o.plan.mode,
                "victims": "+".join(role for role, _ in o.plan.victims),
                "describe": o.plan.describe(),
                **{k: v for k, v in o.to_dict().items() if k != "plan"},
            }
            for o in outcomes
        ],
    }
    (args.out / "chaos.json").write_text(json.dumps(result, indent=2))
    (args.out / "chaos.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / 'chaos.json'}, {args.out / 'chaos.md'}")
    return 0 if all(o.survived for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
