"""Push and pull throughput of the parameter server against the machine's own limits.

    python -m benchmarks.transport --quick --out bench-out/transport
    python -m benchmarks.transport --hosts netns --out bench-out/transport-netns

For each tensor size (4 KiB to 256 MiB) and number of servers (1 to 4), starts
real ps-server processes, initialises a float32 model of that size (async,
SGD) and times, from one client, a push from and a pull into the whole model
over each path: gRPC streams over TCP, the bulk data plane (tensor data over a
TCP connection of its own, gRPC carrying only control), and on the same host
the servers' Unix sockets and shared memory (tensor data in /dev/shm). In the
same run, the same bytes go over raw TCP between two processes, through
torch.distributed.rpc (TensorPipe) between two processes, and through a gloo
all-reduce across as many processes as the servers plus the client; and a
tiny push is timed next to a bare gRPC round trip. ``--hosts netns`` puts
every process but the client on a host of its own (a network namespace on a
bridge: benchmarks/hosts.py; needs root), so every byte crosses a link, and
measures the paths a client on another host takes (tcp, bulk). Medians; GB/s
is 1e9 bytes/s, both directions counted. Writes transport.json, transport.md
and transport.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks.hosts import Hosts, unavailable
from benchmarks.machine import command_line, machine
from benchmarks.places import KINDS, across, loopback
from benchmarks.pushpull import (
    KIB,
    LARGE,
    MIB,
    measure_compression,
    measure_latency,
    measure_ps,
    repeats_for,
)
from benchmarks.rawtcp import measure_raw_tcp
from benchmarks.torch_ref import measure_gloo, measure_rpc

PATHS = {"loopback": ("tcp", "bulk", "unix", "shm"), "netns": ("tcp", "bulk")}
SIZES = (4 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)
QUICK_SIZES = (64 * KIB, 16 * MIB)
# The targets: key -> (what, goal, lower is better); each run has the ones its hosts
# allow (shared memory only on one host, where TensorPipe has its own shared memory too).
TARGETS = {
    "bulk_vs_raw_tcp": ("push+pull over bulk / raw TCP", 0.7, False),
    "bulk_vs_torch_rpc": ("push+pull over bulk / torch rpc (across hosts)", 1.0, False),
    "shm_vs_torch_rpc": ("push+pull over shm / torch rpc (same host)", 1.5, False),
    "same_host_vs_raw_tcp": ("same-host (shm) push+pull / raw TCP", 1.0, False),
    "tiny_push_vs_grpc": ("tiny push over bulk / bare gRPC round trip", 1.2, True),
}
STEP_GOAL = 1.5  # a step (push, apply, pull) / a gloo all-reduce across as many processes


def run(sizes: list[int], server_counts: list[int], base_repeats: int, hosts: str) -> dict:
    """Every measurement, with the servers and references on loopback or on hosts."""
    with ExitStack() as stack:
        if hosts == "netns":
            places = across(stack.enter_context(Hosts(max(server_counts))))
        else:
            places = loopback(max(server_counts) + 1)
        return _run(sizes, server_counts, base_repeats, hosts, places)


def _run(sizes, server_counts, base_repeats, hosts, places) -> dict:
    paths = PATHS[hosts]
    rounds = [(n, repeats_for(n, base_repeats)) for n in sizes]
    print(f"raw TCP ({len(sizes)} sizes, {hosts}) ...", flush=True)
    tcp = measure_raw_tcp(rounds, places[1])
    print("torch.distributed.rpc push and pull ...", flush=True)
    torch_rpc = measure_rpc(rounds, places[:2])
    gloo = {}
    for n in sorted(set(server_counts)):
        print(f"gloo all-reduce across {n + 1} processes ...", flush=True)
        gloo[n + 1] = measure_gloo(rounds, n + 1, places)
    rows = []
    for nbytes, repeats in rounds:
        print(
            f"{_size(nbytes)}: raw TCP {tcp[nbytes]['gbps']:.2f} GB/s, torch rpc "
            f"{torch_rpc[nbytes]['push_pull_gbps']:.2f} GB/s",
            flush=True,
        )
        for n in server_counts:
            allreduce = gloo[n + 1][nbytes]["allreduce_s"]
            for row in measure_ps(n, nbytes, repeats, paths, places[1:]):
                row["ratio_vs_tcp"] = row["push_pull_gbps"] / tcp[nbytes]["gbps"]
                row["ratio_vs_torch_rpc"] = (
                    row["push_pull_gbps"] / torch_rpc[nbytes]["push_pull_gbps"]
                )
                # One step of one worker (push, apply, pull) against an all-reduce of the
                # same tensor across as many processes (the servers and the worker).
                row["step_vs_gloo_allreduce"] = row["push_pull_s"] / allreduce
                rows.append(row)
                print(
                    f"  {n} server(s) over {row['path']}: push+pull "
                    f"{row['push_pull_gbps']:.2f} GB/s = {row['ratio_vs_tcp']:.2f} of raw TCP, "
                    f"{row['ratio_vs_torch_rpc']:.2f} of torch rpc; step = "
                    f"{row['step_vs_gloo_allreduce']:.1f} x gloo all-reduce",
                    flush=True,
                )
    latency = measure_latency(max(50, base_repeats * 50), paths, places[1])
    return {
        "benchmark": "transport",
        "hosts": hosts,
        "paths": list(paths),
        "sizes": sizes,
        "servers": server_counts,
        "machine": machine(),
        "raw_tcp": {str(n): v for n, v in tcp.items()},
        "torch_rpc": {str(n): v for n, v in torch_rpc.items()},
        "gloo_allreduce": {
            str(world): {str(n): v for n, v in by_size.items()} for world, by_size in gloo.items()
        },
        "latency": latency,
        "compression": compression_rows(sizes, base_repeats) if hosts == "loopback" else [],
        "results": rows,
        "targets": targets(rows, latency, hosts),
    }


def compression_rows(sizes: list[int], repeats: int) -> list[dict]:
    """The compression table, at 16 MiB (or the largest size measured, if smaller)."""
    nbytes = LARGE if LARGE in sizes else max(sizes)
    print(f"compression on the wire, {_size(nbytes)} over tcp ...", flush=True)
    return measure_compression(nbytes, repeats)


def targets(rows: list[dict], latency: dict, hosts: str) -> dict:
    """The issue's targets this run measures, over every row of a tensor of 16 MiB or more
    (the worst case)."""
    large = [r for r in rows if r["bytes"] >= LARGE]

    def worst(path: str, key: str, fn=min) -> float | None:
        values = [r[key] for r in large if r["path"] == path]
        return fn(values) if values else None

    bulk = latency["bulk"]
    measured = {
        "bulk_vs_raw_tcp": worst("bulk", "ratio_vs_tcp"),
        "tiny_push_vs_grpc": bulk["tiny_push_s"] / bulk["grpc_round_trip_s"],
    }
    if hosts == "netns":
        measured["bulk_vs_torch_rpc"] = worst("bulk", "ratio_vs_torch_rpc")
    else:
        measured["shm_vs_torch_rpc"] = worst("shm", "ratio_vs_torch_rpc")
        measured["same_host_vs_raw_tcp"] = worst("shm", "ratio_vs_tcp")
    out = {key: {"goal": TARGETS[key][1], "measured": value} for key, value in measured.items()}
    out["step_vs_gloo_allreduce"] = {
        "goal": STEP_GOAL,
        "measured": {p: worst(p, "step_vs_gloo_allreduce", max) for p in PATHS[hosts]},
    }
    return out


def _size(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def markdown(result: dict) -> str:
    lines = [
        "| size | servers | path | push GB/s | pull GB/s | push+pull GB/s | vs raw TCP "
        "| vs torch rpc | step / gloo all-reduce |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {_size(r['bytes'])} | {r['servers']} | {r['path']} | {r['push_gbps']:.2f} | "
            f"{r['pull_gbps']:.2f} | {r['push_pull_gbps']:.2f} | {r['ratio_vs_tcp']:.2f} | "
            f"{r['ratio_vs_torch_rpc']:.2f} | {r['step_vs_gloo_allreduce']:.1f} |"
        )
    lines += ["", "| size | raw TCP GB/s | torch rpc push+pull GB/s |", "|---:|---:|---:|"]
    for n in result["sizes"]:
        lines.append(
            f"| {_size(n)} | {result['raw_tcp'][str(n)]['gbps']:.2f} | "
            f"{result['torch_rpc'][str(n)]['push_pull_gbps']:.2f} |"
        )
    lines += compression_markdown(result.get("compression", []))
    lines += ["", "| path | tiny push (us) | bare gRPC round trip (us) |", "|---|---:|---:|"]
    for path, v in result["latency"].items():
        lines.append(
            f"| {path} | {v['tiny_push_s'] * 1e6:.0f} | {v['grpc_round_trip_s'] * 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def compression_markdown(rows: list[dict]) -> list[str]:
    """The compression table's lines (none when the run had no compression rows)."""
    if not rows:
        return []
    lines = [
        "",
        f"Compression on the wire ({_size(rows[0]['bytes'])} model, push+pull over tcp, "
        "bytes counted by the server):",
        "",
        "| compression | pushed MiB | pulled MiB | bytes vs float32 | push+pull ms "
        "| time vs float32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['compression']} | {r['push_wire_bytes'] / MIB:.2f} | "
            f"{r['pull_wire_bytes'] / MIB:.2f} | {r['wire_vs_none']:.3f} | "
            f"{r['push_pull_s'] * 1e3:.1f} | {r['time_vs_none']:.2f} |"
        )
    return lines


def plot(result: dict, path: Path) -> None:
    """Push+pull GB/s against size (with the references), and the step against gloo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(sizes, [result["raw_tcp"][str(n)]["gbps"] for n in sizes], "k-o", label="raw TCP")
    left.plot(
        sizes,
        [result["torch_rpc"][str(n)]["push_pull_gbps"] for n in sizes],
        "k--s",
        label="torch rpc",
    )
    colors = {"tcp": "tab:blue", "bulk": "tab:red", "unix": "tab:orange", "shm": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for j, n in enumerate(result["servers"]):
        for way in result.get("paths", ("tcp", "unix", "shm")):  # (before the bulk path)
            rows = [r for r in result["results"] if r["servers"] == n and r["path"] == way]
            x = [r["bytes"] for r in rows]
            label = f"{way}, {n} server{'s' if n > 1 else ''}"
            style = dict(color=colors[way], linestyle=styles[j % 4], marker=".", label=label)
            left.plot(x, [r["push_pull_gbps"] for r in rows], **style)
            right.plot(x, [r["step_vs_gloo_allreduce"] for r in rows], **style)
    right.axhline(STEP_GOAL, color="gray", linewidth=0.8, label=f"target {STEP_GOAL}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor bytes")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("push+pull GB/s")
    left.set_title(f"throughput ({result.get('hosts', 'loopback')})")
    right.set_yscale("log")
    right.set_ylabel("push+pull time / gloo all-reduce time")
    right.set_title("a step against an all-reduce (lower is better)")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_size(text: str) -> int:
    units = {"KIB": KIB, "MIB": MIB, "K": KIB, "M": MIB}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/transport"), help="output dir")
    parser.add_argument("--quick", action="store_true", help="2 sizes, 1-2 servers, 3 repeats")
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, help="tensor sizes, e.g. 4KiB 16MiB (default 6)"
    )
    parser.add_argument("--servers", type=int, nargs="+", help="server counts (default 1 2 4)")
    parser.add_argument("--repeats", type=int, help="repeats of large sizes (default 10)")
    parser.add_argument(
        "--hosts",
        choices=KINDS,
        default="loopback",
        help="where the servers and references run: all on loopback (default), or each on "
        "a host of its own, a network namespace (netns; needs root)",
    )
    parser.add_argument(
        "--compression-only",
        action="store_true",
        help="only the compression table (bytes on the wire per compression), to --out",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    counts = args.servers or ([1, 2] if args.quick else [1, 2, 4])
    if any(n < 64 or n % 4 for n in sizes) or any(n < 1 for n in counts):
        parser.error("sizes must be multiples of 4 bytes, at least 64; server counts positive")
    repeats = args.repeats or (3 if args.quick else 10)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # many processes share the cores
    if args.compression_only:
        result = {
            "benchmark": "transport-compression",
            "machine": machine(),
            "command": command_line("benchmarks.transport", argv),
            "compression": compression_rows(sizes, repeats),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compression.json").write_text(json.dumps(result, indent=2))
        (args.out / "compression.md").write_text(
            "\n".join(compression_markdown(result["compression"])).lstrip() + "\n"
        )
        print(f"wrote {args.out}/compression.json, compression.md")
        return 0
    if args.hosts == "netns" and (why := unavailable()):
        parser.error(f"--hosts netns: {why}")
    result = run(sizes, counts, repeats, args.hosts)
    result["command"] = command_line("benchmarks.transport", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport.json").write_text(json.dumps(result, indent=2))
    (args.out / "transport.md").write_text(markdown(result))
    plot(result, args.out / "transport.png")
    print(f"wrote {args.out}/transport.json, transport.md, transport.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
