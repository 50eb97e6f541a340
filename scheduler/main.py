"""``ps-scheduler``: owns the job, worker membership and the data-shard task queue.

ps-scheduler --config job.yaml --state job.db [--host H --port P]
ps-scheduler --data-dir data --servers 127.0.0.1:7001,127.0.0.1:7002 --mode sync ...
ps-scheduler status --scheduler 127.0.0.1:7000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from protos import observability, security
from protos.jobspec import JobSpec, SpecError, add_job_arguments, spec_from_args
from ps_worker.data import DataError, read_manifest
from scheduler import status
from scheduler.metrics import SchedulerMetrics
from scheduler.state import SchedulerState, StateError

log = logging.getLogger("scheduler")


async def serve(args: argparse.Namespace, spec: JobSpec, shards: int) -> int:
    from scheduler.service import start_scheduler

    state = SchedulerState(str(args.state))
    try:
        created = state.create_or_resume(spec, shards)
    except StateError as e:
        print(f"ps-scheduler: {e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    if not created:
        state.resume_grace(time.time())
        p = state.progress(time.time())
        log.info(
            "resuming job %s from %s: %d of %d shards done",
            spec.job_id,
            args.state,
            p.done,
            p.epochs * p.shards_per_epoch,
        )
    address = f"{args.host}:{args.port}"
    metrics = None
    if args.metrics_port is not None:
        metrics = SchedulerMetrics()
        metrics.refresh(state, time.time())
        metrics_port = observability.serve_metrics(
            metrics.registry, args.metrics_port, args.host, "ps-scheduler"
        )
    try:
        server, port, service, health_servicer = await start_scheduler(
            state, address, args.serving, args.connecting, metrics
        )
    except RuntimeError as e:
        print(f"ps-scheduler: cannot listen on {address}: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ps-scheduler listening on {args.host}:{port}", flush=True)
    if metrics is not None:
        print(f"ps-scheduler metrics on {args.host}:{metrics_port}", flush=True)
    watcher = asyncio.create_task(service.watch(stop))
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(2.0)
    await watcher
    await service.membership.close()
    state.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        parser = argparse.ArgumentParser(
            prog="ps-scheduler status",
            description="Print a job's progress: epochs, accuracy so far, and each worker's "
            "clock and last heartbeat; --watch keeps it live.",
        )
        parser.add_argument("--scheduler", required=True, help="scheduler address HOST:PORT")
        status.add_arguments(parser)
        security.add_arguments(parser, serves=False, connects=True)
        args = parser.parse_args(argv[1:])
        if args.interval <= 0:
            parser.error("--interval must be positive")
        try:
            credentials = security.client_security(args)
        except security.SecurityError as e:
            parser.error(str(e))
        return status.show(args.scheduler, credentials, args.json, args.watch, args.interval)

    parser = argparse.ArgumentParser(
        prog="ps-scheduler",
        description="Own a training job: its spec, the worker membership and the task queue "
        "that hands out data shards as leases. `ps-scheduler status --scheduler ADDR` prints "
        "a running job's progress.",
    )
    parser.add_argument("--host", default=os.environ.get("PS_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PS_PORT", "0")))
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("scheduler.db"),
        help="SQLite file holding the job's state (default scheduler.db)",
    )
    observability.add_arguments(parser)
    security.add_arguments(parser, serves=True, connects=True)
    add_job_arguments(parser, env=True)
    args = parser.parse_args(argv)
    try:
        args.serving = security.server_security(args)
        args.connecting = security.client_security(args)
    except security.SecurityError as e:
        parser.error(str(e))
    observability.configure_logging(args)
    try:
        spec = spec_from_args(args)
        if not spec.servers:
            raise SpecError("servers: at least one parameter server address is needed")
        shards = len(read_manifest(Path(spec.data_dir)).shards)
    except (SpecError, DataError) as e:
        print(f"ps-scheduler: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(args, spec, shards))


if __name__ == "__main__":
    sys.exit(main())
