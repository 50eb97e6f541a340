"""Many clients pushing at once: no lost update, no deadlock, and flat server memory.

    python -m benchmarks.load --out bench-out/load
    python -m benchmarks.load --quick --out bench-out/load-quick

Starts real ps-server processes, then N client threads in this process, each
with its own connection, push integer-valued gradients (async, SGD, lr 1), so
the final weights must equal the initial ones minus the exact sum of every
gradient pushed. Halfway through, every client waits while each server's
resident memory is read; at the end it is read again, with the peak. Reports
pushes per second and the servers' memory. Writes load.json, load.md and load.png
(pushes done against time, and each server's memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.machine import command_line, machine
from ps_worker import Client, ClientConfig
from scheduler.launch import servers

MIB = 1 << 20
TIMELINE_POINTS = 200  # the pushes-against-time curve keeps at most this many points


@dataclass
class LoadResult:
    clients: int
    pushes_per_client: int
    servers: int
    seconds: float
    exact: bool  # final weights == init - exact sum
    updates_applied: list[int]
    rss_half_mib: list[float]  # each server's resident memory halfway
    rss_end_mib: list[float]  # and at the end
    peak_rss_mib: list[float]
    timeline: list[tuple[float, int]]  # (seconds since the clients started, pushes done)
    half_s: float  # when the memory was read halfway

    @property
    def pushes_per_s(self) -> float:
        return self.clients * self.pushes_per_client / self.seconds


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def run_load(
    clients: int, pushes: int, num_servers: int, numel: int, log_dir: Path, timeout_s: float
) -> LoadResult:
    init = {"w": torch.zeros(numel), "b": torch.zeros(16)}
    config = ClientConfig(timeout_s=60)
    with servers(num_servers, log_dir) as daemons:
        addresses = [d.address for d in daemons]
        with Client(addresses, job_id="load", worker_id="init", config=config) as c:
            c.init(init, mode="async", optimizer="sgd", lr=1.0, part_bytes=max(64, numel * 2))
        totals = [{k: torch.zeros_like(v) for k, v in init.items()} for _ in range(clients)]
        errors: list[BaseException] = []
        half: list[float] = []
        done_at: list[list[float]] = [[] for _ in range(clients)]  # each push's return
        half_at: list[float] = []

        def measure_half() -> None:
            half_at.append(time.perf_counter())
            half.extend(memory_mib(d.proc.pid)[0] for d in daemons)

        barrier = threading.Barrier(clients, action=measure_half)

        def work(w: int) -> None:
            try:
                with Client(addresses, job_id="load", worker_id=f"w{w}", config=config) as c:
                    for i in range(pushes):
                        if i == pushes // 2:
                            barrier.wait(timeout_s)
                        value = float((w * 7 + i) % 5 + 1)
                        grads = {k: torch.full_like(v, value) for k, v in init.items()}
                        c.push(grads)
                        done_at[w].append(time.perf_counter())
                        for k in grads:
                            totals[w][k] += grads[k]
            except BaseException as e:  # surfaced below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        seconds = time.perf_counter() - started
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"clients still pushing after {timeout_s:.0f}s: deadlock?")
        if errors:
            raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}") from errors[0]
        end = [memory_mib(d.proc.pid) for d in daemons]
        with Client(addresses, job_id="load", worker_id="reader", config=config) as c:
            final = c.pull(observe=True)
            statuses = c.status()
    exact = all(torch.equal(final[k], init[k] - sum(t[k] for t in totals)) for k in init)
    return LoadResult(
        clients,
        pushes,
        num_servers,
        seconds,
        exact,
        [s.updates_applied for s in statuses],
        half,
        [r for r, _ in end],
        [p for _, p in end],
        timeline(sorted(t - started for times in done_at for t in times)),
        half_at[0] - started,
    )


def timeline(times: list[float], points: int = TIMELINE_POINTS) -> list[tuple[float, int]]:
    """(seconds, pushes done by then) at most ``points`` times, the last push included."""
    step = max(1, len(times) // points)
    picked = list(range(step - 1, len(times), step))
    if picked and picked[-1] != len(times) - 1:
        picked.append(len(times) - 1)
    return [(round(times[i], 4), i + 1) for i in picked]


def plot(result: dict, out: Path) -> list[Path]:
    """load.png: pushes done against time, and each server's resident memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["result"]
    fig, (progress, memory) = plt.subplots(1, 2, figsize=(10, 4))
    seconds, pushes = zip(*r["timeline"], strict=True) if r["timeline"] else ((), ())
    progress.plot([0.0, *seconds], [0, *pushes])
    progress.axvline(r["half_s"], color="grey", linestyle=":", label="memory read halfway")
    progress.set_xlabel("seconds since the clients started")
    progress.set_ylabel("pushes done (all clients)")
    progress.set_title(f"{r['clients']} clients x {r['pushes_per_client']} async pushes")
    progress.set_xlim(left=0)
    progress.set_ylim(bottom=0)
    progress.legend()
    servers = range(len(r["rss_half_mib"]))
    for offset, (key, label) in enumerate(
        [("rss_half_mib", "halfway"), ("rss_end_mib", "at the end"), ("peak_rss_mib", "peak")]
    ):
        memory.bar([s + (offset - 1) * 0.25 for s in servers], r[key], width=0.25, label=label)
    memory.set_xticks(list(servers), [f"server {s}" for s in servers])
    memory.set_ylim(0, 1.3 * max(r["peak_rss_mib"]))  # room for the legend above the bars
    memory.set_ylabel("resident memory (MiB)")
    memory.set_title("server memory")
    memory.legend(loc="upper center", ncol=3)
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def markdown(result: dict) -> str:
    r = result["result"]
    return (
        f"{r['clients']} clients x {r['pushes_per_client']} async pushes against "
        f"{r['servers']} servers: {r['pushes_per_s']:.0f} pushes/s; exact sum: {r['exact']}; "
        f"updates applied {r['updates_applied']}.\n\n"
        "| server | RSS halfway (MiB) | RSS at the end (MiB) | peak RSS (MiB) |\n"
        "|---:|---:|---:|---:|\n"
        + "".join(
            f"| {i} | {a:.1f} | {b:.1f} | {c:.1f} |\n"
            for i, (a, b, c) in enumerate(
                zip(r["rss_half_mib"], r["rss_end_mib"], r["peak_rss_mib"], strict=True)
            )
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/load"))
    parser.add_argument("--quick", action="store_true", help="8 clients x 50 pushes")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--numel", type=int, default=1000, help="floats in the model")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.pushes = 8, 50
    if min(args.clients, args.pushes, args.servers, args.numel) < 1:
        parser.error("--clients, --pushes, --servers and --numel must be positive")
    with tempfile.TemporaryDirectory() as logs:
        r = run_load(args.clients, args.pushes, args.servers, args.numel, Path(logs), 600)
    result = {
        "benchmark": "load",
        "command": command_line("benchmarks.load", argv),
        "machine": machine(),
        "result": {**r.__dict__, "pushes_per_s": r.pushes_per_s},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2))
    (args.out / "load.md").write_text(markdown(result))
    plot(result, args.out)
    print(markdown(result))
    print(f"wrote {args.out}/load.json, load.md, load.png")
    return 0 if r.exact else 1


if __name__ == "__main__":
    sys.exit(main())
