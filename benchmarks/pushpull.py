"""This system's side of the transport benchmark: a push from and a pull into a model of a
given size over each path, a tiny push against a bare gRPC round trip, and the bytes each
compression puts on the wire; servers on loopback or on hosts (:mod:`benchmarks.places`)."""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2

from benchmarks.places import Place
from ps_worker import Client, ClientConfig
from scheduler.launch import servers

KIB, MIB = 1 << 10, 1 << 20
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


def measure_ps(
    num_servers: int, nbytes: int, repeats: int, paths: Sequence[str], hosts: Sequence[Place]
) -> list[dict]:
    """Push from and pull into a model of nbytes over each path, server i on hosts[i];
    medians of repeats."""
    model = model_of(nbytes)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    rows = []
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        daemons = stack.enter_context(servers(num_servers, logs, hosts=hosts[:num_servers]))
        for path in paths:
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


def measure_latency(calls: int, paths: Sequence[str], host: Place) -> dict:
    """Median seconds of a tiny push (one float32) next to a bare gRPC round trip (a health
    check) on the same server (on ``host``), over each path."""
    out = {}
    with (
        tempfile.TemporaryDirectory() as logs,
        servers(1, Path(logs), hosts=[host]) as (daemon,),
    ):
        for path in paths:
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
