"""Push and pull throughput of the parameter server against raw loopback TCP.

    python -m benchmarks.transport --quick --json bench-out/transport.json

Starts 1 and 2 real ps-server processes, initialises a float32 model of the
given size (async, SGD), times pushes from and pulls into the whole model
from one client (medians), and, in the same run, a raw loopback TCP transfer of the same bytes
between two processes. Reports GB/s (1e9 bytes/s) and the ratio to TCP.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2

from benchmarks.rawtcp import measure_raw_tcp
from benchmarks.torch_ref import measure_gloo, measure_rpc
from ps_worker import Client, ClientConfig
from scheduler.launch import servers

MIB = 1 << 20
PATHS = ("tcp", "unix", "shm")


def path_config(path: str) -> ClientConfig:
    """A client that reaches same-host servers over TCP, their Unix socket, or shared memory."""
    return ClientConfig(
        same_host_unix_socket=path != "tcp", same_host_shared_memory=path == "shm"
    )


def model_of(nbytes: int) -> torch.nn.Module:
    """A float32 module of about nbytes: one large tensor and a few small ones."""
    model = torch.nn.Module()
    small = 256
    model.register_parameter("embedding", torch.nn.Parameter(torch.randn(nbytes // 4 - 4 * small)))
    for i in range(4):
        model.register_parameter(f"bias{i}", torch.nn.Parameter(torch.randn(small)))
    return model


def measure_ps(num_servers: int, model: torch.nn.Module, repeats: int) -> list[dict]:
    """Push from and pull into the module, as a training loop does, over TCP and then over
    the servers' Unix sockets (the same-host path); medians of repeats."""
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    rows = []
    with ExitStack() as stack:
        daemons = stack.enter_context(
            servers(num_servers, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        )
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
            push, pull = statistics.median(push_s[1:]), statistics.median(pull_s[1:])
            both = statistics.median(a + b for a, b in zip(push_s[1:], pull_s[1:], strict=True))
            rows.append(
                {
                    "servers": num_servers,
                    "path": path,
                    "push_s": push,
                    "pull_s": pull,
                    "push_gbps": nbytes / push / 1e9,
                    "pull_gbps": nbytes / pull / 1e9,
                    "push_pull_gbps": 2 * nbytes / both / 1e9,
                }
            )
    return rows


def measure_latency(calls: int) -> dict:
    """Median seconds of a tiny push (one float32) next to a bare gRPC round trip (a health
    check) on the same server, over TCP and over its Unix socket."""
    out = {}
    with tempfile.TemporaryDirectory() as logs, servers(1, Path(logs)) as (daemon,):
        for path in PATHS:
            with Client(
                [daemon.address], job_id="tiny", worker_id=f"lat-{path}", config=path_config(path)
            ) as c:
                c.init({"w": torch.zeros(1)}, mode="async", optimizer="sgd", lr=0.1)
                grads = {"w": torch.zeros(1)}
                target = c._servers[0].channel  # the channel the client itself uses
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


def run(size_mib: int, server_counts: list[int], repeats: int) -> dict:
    model = model_of(size_mib * MIB)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    tcp = measure_raw_tcp(nbytes, repeats)
    print(f"raw loopback TCP, {size_mib} MiB there and back: {tcp['gbps']:.2f} GB/s", flush=True)
    torch_rpc = measure_rpc(nbytes, repeats)
    print(f"torch.distributed.rpc push+pull: {torch_rpc['push_pull_gbps']:.2f} GB/s", flush=True)
    gloo = measure_gloo(nbytes, 2, repeats)
    print(f"gloo all-reduce, 2 processes: {gloo['allreduce_s'] * 1e3:.1f} ms", flush=True)
    rows = []
    for n in server_counts:
        for row in measure_ps(n, model, repeats):
            row["ratio_vs_tcp"] = row["push_pull_gbps"] / tcp["gbps"]
            row["ratio_vs_torch_rpc"] = row["push_pull_gbps"] / torch_rpc["push_pull_gbps"]
            # A sync step moves the same bytes; 1 server + 1 worker are 2 processes.
            row["step_vs_gloo_allreduce"] = (row["push_s"] + row["pull_s"]) / gloo["allreduce_s"]
            rows.append(row)
            print(
                f"{n} server(s) over {row['path']}: push {row['push_gbps']:.2f} GB/s, pull "
                f"{row['pull_gbps']:.2f} GB/s, push+pull {row['push_pull_gbps']:.2f} GB/s = "
                f"{row['ratio_vs_tcp']:.2f} of raw TCP",
                flush=True,
            )
    return {
        "benchmark": "transport",
        "model_bytes": nbytes,
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": _cpus(),
        },
        "raw_tcp": tcp,
        "torch_rpc": torch_rpc,
        "gloo_allreduce": gloo,
        "latency": measure_latency(repeats * 50),
        "results": rows,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def markdown(result: dict) -> str:
    lat = result["latency"]
    lines = [
        f"Model {result['model_bytes'] / MIB:.0f} MiB float32; raw loopback TCP "
        f"{result['raw_tcp']['gbps']:.2f} GB/s (there and back); torch.distributed.rpc "
        f"push+pull {result['torch_rpc']['push_pull_gbps']:.2f} GB/s; gloo all-reduce "
        f"(2 processes) {result['gloo_allreduce']['allreduce_s'] * 1e3:.1f} ms.",
        "",
        "| servers | path | push GB/s | pull GB/s | push+pull GB/s | vs raw TCP | vs torch rpc "
        "| push+pull time / gloo all-reduce |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['servers']} | {r['path']} | {r['push_gbps']:.2f} | {r['pull_gbps']:.2f} | "
            f"{r['push_pull_gbps']:.2f} | {r['ratio_vs_tcp']:.2f} | "
            f"{r['ratio_vs_torch_rpc']:.2f} | {r['step_vs_gloo_allreduce']:.1f} |"
        )
    lines += ["", "| path | tiny push (us) | bare gRPC round trip (us) |", "|---|---:|---:|"]
    for path, v in lat.items():
        lines.append(
            f"| {path} | {v['tiny_push_s'] * 1e6:.0f} | {v['grpc_round_trip_s'] * 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    parser.add_argument("--size-mib", type=int, default=64, help="model size (default 64)")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write a Markdown table here")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or any(n < 1 for n in args.servers):
        parser.error("--size-mib and --servers must be positive")
    repeats = args.repeats or (3 if args.quick else 10)
    result = run(args.size_mib, args.servers, repeats)
    for path, text in (
        (args.json, json.dumps(result, indent=2)),
        (args.markdown, markdown(result)),
    ):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
