"""Time to accuracy: PyTorch DistributedDataParallel against this system in each mode.

    python -m benchmarks.vs_ddp --out bench-out/vs-ddp
    python -m benchmarks.vs_ddp --quick --out bench-out/vs-ddp-quick

Trains the same model on the same shards with the same batch size, optimizer and
epochs, once with DDP (gloo, as many processes as workers: each rank takes every
W-th shard of an epoch, gradients are averaged every batch, rank 0 scores the
test set after each epoch) and once per mode on a local cluster. Both clocks
start before any process is spawned. Reports each run's time to the target test
accuracy and its ratio to DDP's; writes vs_ddp.json, vs_ddp.md and vs_ddp.png (test
accuracy against the training samples processed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import command_line, machine
from benchmarks.sync_vs_async import Variant, base_spec, plot_accuracy, run_variant
from protos.jobspec import JobSpec
from ps_worker.data import read_manifest


def _ddp_rank(rank: int, world: int, port: int, spec_json: str, started_at: float, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ps_worker.daemon import score
    from ps_worker.data import load, read_manifest
    from ps_worker.models import build_model

    torch.set_num_threads(1)
    spec = JobSpec.from_json(spec_json)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = Path(spec.data_dir)
    manifest = read_manifest(data)
    model = DistributedDataParallel(build_model(spec.model, spec.seed))
    settings = spec.job_settings(manifest.shard_batches(spec.batch_size))
    adam = settings.optimizer
    assert adam.name == "adam", "the DDP reference runs the job's Adam"
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=settings.lr,
        betas=(adam.beta1, adam.beta2),
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        foreach=False,
    )
    shards = {i: load(data, s) for i, s in enumerate(manifest.shards) if i % world == rank}
    test = load(data, manifest.test) if rank == 0 else None
    curve = []
    for epoch in range(spec.epochs):
        model.train()
        with model.join():  # ranks may hold different numbers of batches
            for i, (x, y) in shards.items():
                x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
                order = np.random.default_rng([spec.seed, epoch, i]).permutation(len(y))
                for index in torch.from_numpy(order).split(spec.batch_size):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x_t[index]), y_t[index])
                    loss.backward()
                    optimizer.step()
        if rank == 0:
            _, accuracy = score(model.module, *test, torch.device("cpu"))
            curve.append(  # "epoch" counts the epochs done, as the cluster's summary does
                {"epoch": epoch + 1, "accuracy": accuracy, "wall_s": time.time() - started_at}
            )
            print(f"ddp epoch {epoch + 1}: test accuracy {accuracy:.4f}", flush=True)
    dist.barrier()
    if rank == 0:
        out.put(curve)
    dist.destroy_process_group()


def run_ddp(spec: JobSpec, workers: int) -> dict:
    """DDP training as separate processes; the accuracy curve and the wall time."""
    from benchmarks.torch_ref import _free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    started, started_at = time.monotonic(), time.time()
    port = _free_port()
    procs = [
        ctx.Process(target=_ddp_rank, args=(r, workers, port, spec.to_json(), started_at, out))
        for r in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        curve = out.get(timeout=3600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    wall = time.monotonic() - started
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a DDP process failed: exit codes {[p.exitcode for p in procs]}")
    return {
        "label": "ddp",
        "mode": "ddp",
        "accuracy_curve": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "wall_s": wall,
    }


def time_to(curve: list[dict], target: float) -> float | None:
    return next((e["wall_s"] for e in curve if e["accuracy"] >= target), None)


def markdown(result: dict) -> str:
    target = result["target_accuracy"]
    lines = [
        f"{result['model']} on {result['dataset']}, {result['workers']} workers "
        f"(DDP: {result['workers']} gloo processes; this system: {result['servers']} servers), "
        f"{result['epochs']} epochs, batch {result['batch_size']}; both clocks start before "
        "any process is spawned.",
        "",
        f"| run | time to {target:.0%} (s) | vs DDP | final accuracy | wall (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        t, ratio = r["time_to_target_s"], r["ratio_vs_ddp"]
        lines.append(
            f"| {r['label']} | {'not reached' if t is None else f'{t:.1f}'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['final_accuracy']:.3f} | "
            f"{r['wall_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> list[Path]:
    """vs_ddp.png: test accuracy after each epoch, DDP and each mode."""
    ddp = {"linestyle": "--", "color": "black"}
    path = out / "vs_ddp.png"
    plot_accuracy(
        [(r["label"], r["curve"], ddp if r["label"] == "ddp" else {}) for r in result["runs"]],
        result["train_samples"],
        result["target_accuracy"],
        f"{result['model']}: DDP against the parameter server",
        path,
    )
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/vs-ddp"))
    parser.add_argument("--quick", action="store_true", help="digits MLP, 3 epochs: under a minute")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="mnist1d-cnn")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--modes", nargs="+", default=["sync", "async", "ssp:1"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01, help="DDP's and sync's (Adam)")
    parser.add_argument("--async-lr", type=float, default=0.003, help="async and ssp (beta1 0)")
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.model, args.epochs, args.batch_size = "digits", "digits-mlp", 3, 32
        args.modes, args.lr, args.async_lr, args.target = ["sync", "async"], 0.003, 0.003, 0.8
    if args.workers < 1 or args.servers < 1 or args.epochs < 1:
        parser.error("--workers, --servers and --epochs must be positive")
    variants = [Variant.parse(m, args.async_lr) for m in args.modes]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # many processes share the cores
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vs-ddp-") as tmp:
        spec = base_spec(args, Path(tmp))
        data = Path(spec.data_dir)
        print(f"DDP, {args.workers} processes ...", flush=True)
        ddp = run_ddp(spec, args.workers)
        runs = [ddp]
        for variant in variants:
            print(f"{variant.label} on {args.servers} servers ...", flush=True)
            work = Path(tmp) / variant.label.replace(":", "-")
            runs.append(run_variant(spec, variant, args.workers, args.servers, {}, work))
        train_samples = read_manifest(data).train_samples
    ddp_time = time_to(ddp["accuracy_curve"], args.target)
    rows = []
    for run in runs:
        t = time_to(run["accuracy_curve"], args.target)
        rows.append(
            {
                "label": run["label"],
                "time_to_target_s": t,
                "ratio_vs_ddp": t / ddp_time if t is not None and ddp_time else None,
                "final_accuracy": run["final_accuracy"],
                "wall_s": run["wall_s"],
                "mode": run["mode"],
                "curve": run["accuracy_curve"],
            }
        )
    result = {
        "benchmark": "vs_ddp",
        "command": command_line("benchmarks.vs_ddp", argv),
        "machine": machine(),
        "dataset": args.dataset,
        "model": args.model,
        "workers": args.workers,
        "servers": args.servers,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "train_samples": train_samples,
        "target_accuracy": args.target,
        "runs": rows,
    }
    (args.out / "vs_ddp.json").write_text(json.dumps(result, indent=2))
    (args.out / "vs_ddp.md").write_text(markdown(result))
    plot(result, args.out)
    print(markdown(result))
    print(f"wrote {args.out}/vs_ddp.json, vs_ddp.md, vs_ddp.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
