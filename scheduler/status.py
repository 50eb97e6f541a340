"""``ps-scheduler status`` / ``ps-cluster status``: a job's progress as a table, once or live.

The table shows the epoch and shard counts, the test accuracy of every
evaluated epoch so far, and each worker's state, clock (pushes made),
throughput and last heartbeat. ``--watch`` redraws it every ``--interval``
seconds until the job finishes (in place on a terminal, one table after
another otherwise).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import TextIO

import grpc

from protos import rpc, scheduler_pb2, scheduler_pb2_grpc
from protos.security import ClientSecurity

CLEAR = "\x1b[H\x1b[2J"
BAR_WIDTH = 24


class Unreachable(Exception):
    """The scheduler did not answer."""


class Refused(Unreachable):
    """The scheduler answered and refused the call: it needs the job's token."""


def fetch_progress(address: str, credentials: ClientSecurity, timeout_s: float = 10.0) -> dict:
    """The scheduler's Progress, as a dict; raises Unreachable with the gRPC status."""
    try:
        with credentials.channel(address, rpc.channel_options()) as channel:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).Progress(
                scheduler_pb2.ProgressRequest(), timeout=timeout_s
            )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise Refused(
                f"the scheduler at {address} refused the call: UNAUTHENTICATED (the job has a "
                "token: pass its --token-file, or set $PS_TOKEN)"
            ) from e
        raise Unreachable(f"cannot reach the scheduler at {address}: {e.code().name}") from e
    return json.loads(reply.progress_json)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_progress(p: dict) -> str:
    """The table ``ps-scheduler status`` prints."""
    total = p["epochs"] * p["shards_per_epoch"]
    epoch = min(p["epoch"] + 1, p["epochs"])
    in_epoch = p["completions_per_epoch"][epoch - 1] if p["completions_per_epoch"] else 0
    lines = [
        f"epoch {epoch}/{p['epochs']} {bar(in_epoch / max(1, p['shards_per_epoch']))} "
        f"{in_epoch}/{p['shards_per_epoch']} shards; job {p['done']}/{total} done, "
        f"{p['leased']} leased, {p['pending']} pending" + (" - finished" if p["finished"] else ""),
    ]
    if p["evaluations"]:
        lines.append(
            "test accuracy by epoch: "
            + "  ".join(f"{e['epoch'] + 1}: {e['accuracy']:.4f}" for e in p["evaluations"])
        )
    lines.append(
        f"{'worker':<14} {'state':<7} {'device':<8} {'clock':>7} {'samples/s':>10} "
        f"{'heartbeat':>10}"
    )
    for w in p["workers"]:
        lines.append(
            f"{w['worker_id']:<14} {w['state']:<7} {w['device']:<8} {w['clock']:>7} "
            f"{w['samples_per_s']:>10.0f} {w['heartbeat_age_s']:>8.1f}s ago"
        )
    return "\n".join(lines)


def show(
    address: str,
    credentials: ClientSecurity,
    as_json: bool = False,
    watch: bool = False,
    interval_s: float = 1.0,
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
    unreachable: str = "ps-scheduler: {error}",
) -> int:
    """Print the job's progress (redrawn until it finishes with ``watch``); an exit code.
    ``unreachable`` is the line printed when the scheduler does not answer."""
    stop = stop or threading.Event()
    live = watch and out.isatty()
    while True:
        try:
            progress = fetch_progress(address, credentials)
        except Refused as e:  # it runs: only this call was refused
            print(f"{unreachable.split(':', 1)[0]}: {e}", file=sys.stderr)
            return 1
        except Unreachable as e:
            print(unreachable.format(error=e), file=sys.stderr)
            return 1
        text = (
            json.dumps(progress, indent=None if watch else 2)
            if as_json
            else (format_progress(progress))
        )
        out.write((CLEAR if live else "") + text + "\n" + ("" if live or not watch else "\n"))
        out.flush()
        if not watch or progress["finished"]:
            return 0
        try:
            if stop.wait(interval_s):  # a refresh period, not synchronisation
                return 0
        except KeyboardInterrupt:
            return 0


def add_arguments(parser) -> None:
    """--json, --watch and --interval, for both status commands."""
    parser.add_argument("--json", action="store_true", help="print the progress as JSON")
    parser.add_argument(
        "--watch", action="store_true", help="redraw until the job finishes (Ctrl-C stops)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between redraws (default 1)"
    )
