"""Push and pull throughput of the parameter server against the machine's own limits.

    python -m benchmarks.transport --quick --out bench-out/transport

For each tensor size (4 KiB to 256 MiB) and number of servers (1 to 4), starts
real ps-server processes, initialises a float32 model of that size (async,
SGD) and times, from one client, a push from and a pull into the whole model
over each path: TCP, the servers' Unix sockets, and shared memory (tensor
data in /dev/shm, gRPC carrying only control). In the same run, the same bytes
go over raw loopback TCP between two processes, through torch.distributed.rpc
(TensorPipe) between two processes, and through a gloo all-reduce across as
many processes as the servers plus the client; and a tiny push is timed next
to a bare gRPC round trip. Medians; GB/s is 1e9 bytes/s, both directions
counted. Writes transport.json, transport.md and transport.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2

from benchmarks.machine import command_line, machine
from benchmarks.rawtcp import measure_raw_tcp
from benchmarks.torch_ref import measure_gloo, measure_rpc
from ps_worker import Client, ClientConfig
from scheduler.launch import servers

KIB, MIB = 1 << 10, 1 << 20
PATHS = ("tcp", "bulk", "unix", "shm")
SIZES = (4 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)
QUICK_SIZES = (64 * KIB, 16 * MIB)
LARGE = 16 * MIB  # the targets are about tensors of this size and more


def path_config(path: str) -> ClientConfig:
    """A client that reaches servers over gRPC streams on TCP ("tcp"), the bulk data plane
    ("bulk"), or, on the same host, their Unix socket ("unix") or shared memory ("shm")."""
    return ClientConfig(
        same_host_unix_socket=path in ("unix", "shm"),
        same_host_shared_memory=path == "shm",
        bulk_data_plane=path == "bulk",
    )


def repeats_for(nbytes: int, base: int) -> int:
    """More repeats for small tensors, whose timings are short and noisy."""
    return min(100, max(base, int(base * (LARGE / nbytes) ** 0.5)))


def model_of(nbytes: int) -> torch.nn.Module:
    """A float32 module of nbytes: one large tensor and, above 64 KiB, four small ones."""
    model = torch.nn.Module()
    small = 256 if nbytes > 64 * KIB else 0
    model.register_parameter("embedding", torch.nn.Parameter(torch.randn(nbytes // 4 - 4 * small)))
    for i in range(4 if small else 0):
        model.register_parameter(f"bias{i}", torch.nn.Parameter(torch.randn(small)))
    return model


def measure_ps(num_servers: int, nbytes: int, repeats: int) -> list[dict]:
    """Push from and pull into a model of nbytes over each path; medians of repeats."""
    model = model_of(nbytes)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    rows = []
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        daemons = stack.enter_context(servers(num_servers, logs))
        for path in PATHS:
            with Client(
                [d.address for d in daemons],
                job_id="transport",
                worker_id=f"bench-{path}",
                config=path_config(path),
            ) as c:
                c.init(model, mode="async", optimizer="sgd", lr=0.1)
                assert c.transports == [path] * num_servers, c.transports
                push_s, pull_s = [], []
                for _ in range(repeats + 1):  # the first round warms up
                    start = time.perf_counter()
                    c.push_from(model)
                    mid = time.perf_counter()
                    c.pull_into(model)
                    push_s.append(mid - start)
                    pull_s.append(time.perf_counter() - mid)
                assert c.transports == [path] * num_servers, c.transports
            push, pull = statistics.median(push_s[1:]), statistics.median(pull_s[1:])
            both = statistics.median(a + b for a, b in zip(push_s[1:], pull_s[1:], strict=True))
            rows.append(
                {
                    "bytes": nbytes,
                    "servers": num_servers,
                    "path": path,
                    "push_s": push,
                    "pull_s": pull,
                    "push_pull_s": both,
                    "push_gbps": nbytes / push / 1e9,
                    "pull_gbps": nbytes / pull / 1e9,
                    "push_pull_gbps": 2 * nbytes / both / 1e9,
                }
            )
    return rows


COMPRESSIONS = ("none", "fp16", "bf16", "topk:0.01", "bf16,topk:0.01")


def measure_compression(nbytes: int, repeats: int) -> list[dict]:
    """Bytes on the wire and time of a push+pull over TCP, per compression (a job each on
    one server, its byte counters read from its /metrics)."""
    model = model_of(nbytes)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    rows = []
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (daemon,) = stack.enter_context(servers(1, logs, "--metrics-port", "0"))
        url = f"http://{daemon.metrics_address}/metrics"
        for compression in COMPRESSIONS:
            with Client([daemon.address], job_id="compression", config=path_config("tcp")) as c:
                c.init(model, mode="async", optimizer="sgd", lr=1e-6, compression=compression)
                c.push_from(model)  # warm up
                c.pull_into(model)
                before, times = wire_bytes(url), []
                for _ in range(repeats):
                    start = time.perf_counter()
                    c.push_from(model)
                    c.pull_into(model)
                    times.append(time.perf_counter() - start)
                after = wire_bytes(url)
                c.end_job()  # the server takes the next compression's job
            pushed, pulled = ((a - b) / repeats for a, b in zip(after, before, strict=True))
            rows.append(
                {
                    "compression": compression,
                    "bytes": nbytes,
                    "push_wire_bytes": pushed,
                    "pull_wire_bytes": pulled,
                    "push_pull_s": statistics.median(times),
                }
            )
    none = rows[0]
    for r in rows:
        r["wire_vs_none"] = (r["push_wire_bytes"] + r["pull_wire_bytes"]) / (
            none["push_wire_bytes"] + none["pull_wire_bytes"]
        )
        r["time_vs_none"] = r["push_pull_s"] / none["push_pull_s"]
        print(
            f"  {r['compression']}: {r['push_wire_bytes'] / MIB:.2f} MiB pushed, "
            f"{r['pull_wire_bytes'] / MIB:.2f} MiB pulled ({r['wire_vs_none']:.3f} of "
            f"float32), push+pull {r['push_pull_s'] * 1e3:.1f} ms",
            flush=True,
        )
    return rows


def wire_bytes(url: str) -> tuple[float, float]:
    """A server's tensor bytes received and sent so far, from its Prometheus metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("ps_bytes_"))
    return float(values["ps_bytes_in_total"]), float(values["ps_bytes_out_total"])


def measure_latency(calls: int) -> dict:
    """Median seconds of a tiny push (one float32) next to a bare gRPC round trip (a health
    check) on the same server, over each path."""
    out = {}
    with tempfile.TemporaryDirectory() as logs, servers(1, Path(logs)) as (daemon,):
        for path in PATHS:
            with Client(
                [daemon.address], job_id="tiny", worker_id=f"lat-{path}", config=path_config(path)
            ) as c:
                c.init({"w": torch.zeros(1)}, mode="async", optimizer="sgd", lr=0.1)
                grads = {"w": torch.zeros(1)}
                target = c._router.links[0].channel  # the channel the client itself uses
                check = target.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                push, rtt = [], []
                for _ in range(calls):
                    start = time.perf_counter()
                    c.push(grads)
                    mid = time.perf_counter()
                    check(health_pb2.HealthCheckRequest(), timeout=10)
                    push.append(mid - start)
                    rtt.append(time.perf_counter() - mid)
            out[path] = {
                "tiny_push_s": statistics.median(push),
                "grpc_round_trip_s": statistics.median(rtt),
            }
            print(
                f"over {path}: tiny push {out[path]['tiny_push_s'] * 1e6:.0f} us, bare gRPC "
                f"round trip {out[path]['grpc_round_trip_s'] * 1e6:.0f} us",
                flush=True,
            )
    return out


def run(sizes: list[int], server_counts: list[int], base_repeats: int) -> dict:
    rounds = [(n, repeats_for(n, base_repeats)) for n in sizes]
    print(f"raw loopback TCP ({len(sizes)} sizes) ...", flush=True)
    tcp = measure_raw_tcp(rounds)
    print("torch.distributed.rpc push and pull ...", flush=True)
    torch_rpc = measure_rpc(rounds)
    gloo = {}
    for n in sorted(set(server_counts)):
        print(f"gloo all-reduce across {n + 1} processes ...", flush=True)
        gloo[n + 1] = measure_gloo(rounds, n + 1)
    rows = []
    for nbytes, repeats in rounds:
        print(
            f"{_size(nbytes)}: raw TCP {tcp[nbytes]['gbps']:.2f} GB/s, torch rpc "
            f"{torch_rpc[nbytes]['push_pull_gbps']:.2f} GB/s",
            flush=True,
        )
        for n in server_counts:
            allreduce = gloo[n + 1][nbytes]["allreduce_s"]
            for row in measure_ps(n, nbytes, repeats):
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
    return {
        "benchmark": "transport",
        "sizes": sizes,
        "servers": server_counts,
        "machine": machine(),
        "raw_tcp": {str(n): v for n, v in tcp.items()},
        "torch_rpc": {str(n): v for n, v in torch_rpc.items()},
        "gloo_allreduce": {
            str(world): {str(n): v for n, v in by_size.items()} for world, by_size in gloo.items()
        },
        "latency": measure_latency(max(50, base_repeats * 50)),
        "compression": compression_rows(sizes, base_repeats),
        "results": rows,
        "targets": targets(rows),
    }


def compression_rows(sizes: list[int], repeats: int) -> list[dict]:
    """The compression table, at 16 MiB (or the largest size measured, if smaller)."""
    nbytes = LARGE if LARGE in sizes else max(sizes)
    print(f"compression on the wire, {_size(nbytes)} over tcp ...", flush=True)
    return measure_compression(nbytes, repeats)


def targets(rows: list[dict]) -> dict:
    """The issue's targets, over every row of a tensor of 16 MiB or more (worst case)."""
    large = [r for r in rows if r["bytes"] >= LARGE]

    def worst(path: str, key: str, fn=min) -> float | None:
        values = [r[key] for r in large if r["path"] == path]
        return fn(values) if values else None

    return {
        "tcp_vs_raw_tcp": {"goal": 0.7, "measured": worst("tcp", "ratio_vs_tcp")},
        "tcp_vs_torch_rpc": {"goal": 1.5, "measured": worst("tcp", "ratio_vs_torch_rpc")},
        "same_host_vs_raw_tcp": {"goal": 1.0, "measured": worst("shm", "ratio_vs_tcp")},
        "step_vs_gloo_allreduce": {
            "goal": 1.5,
            "measured": {p: worst(p, "step_vs_gloo_allreduce", max) for p in PATHS},
        },
    }


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
    colors = {"tcp": "tab:blue", "unix": "tab:orange", "shm": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for j, n in enumerate(result["servers"]):
        for way in PATHS:
            rows = [r for r in result["results"] if r["servers"] == n and r["path"] == way]
            x = [r["bytes"] for r in rows]
            label = f"{way}, {n} server{'s' if n > 1 else ''}"
            style = dict(color=colors[way], linestyle=styles[j % 4], marker=".", label=label)
            left.plot(x, [r["push_pull_gbps"] for r in rows], **style)
            right.plot(x, [r["step_vs_gloo_allreduce"] for r in rows], **style)
    right.axhline(1.5, color="gray", linewidth=0.8, label="target 1.5")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor bytes")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("push+pull GB/s")
    left.set_title("throughput")
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
    result = run(sizes, counts, repeats)
    result["command"] = command_line("benchmarks.transport", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport.json").write_text(json.dumps(result, indent=2))
    (args.out / "transport.md").write_text(markdown(result))
    plot(result, args.out / "transport.png")
    print(f"wrote {args.out}/transport.json, transport.md, transport.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
