"""``ps-scheduler``: owns the job, worker membership and the data-shard task queue.

ps-scheduler --config job.yaml --state job.db [--host H --port P] [--fresh] [--save PATH]
ps-scheduler --data-dir data --servers 127.0.0.1:7001,127.0.0.1:7002 --mode sync ...
ps-scheduler status --scheduler 127.0.0.1:7000

The job is checked before it is served: its model is built and given a batch
of its data. When the job finishes, the scheduler writes the trained model
(``--save``).
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
from typing import TYPE_CHECKING

from protos import listen, observability, parent, recipes, security
from protos.jobspec import JobSpec, SpecError, add_job_arguments, spec_from_args
from ps_worker.data import DataError, read_manifest
from ps_worker.errors import PSError
from scheduler import status
from scheduler.finish import END_JOB_HELP, SAVE_HELP, end_job, end_job_on_each, save_model
from scheduler.metrics import SchedulerMetrics
from scheduler.preflight import (
    MODEL_HELP,
    PreflightError,
    check_model_fits,
    check_save_path,
    model_argument,
)
from scheduler.state import OtherJob, SchedulerState, StateError
from scheduler.statelock import hold_state

if TYPE_CHECKING:
    from scheduler.service import SchedulerService

log = logging.getLogger("scheduler")
END_POLL_S = 0.5  # how often a finished job checks whether its workers have left


async def serve(args: argparse.Namespace, spec: JobSpec, shards: int) -> int:
    """The job served on its state file, which this scheduler alone holds."""
    try:
        held = hold_state(args.state)  # before anything touches the state
    except OSError as e:
        print(f"ps-scheduler: {e}", file=sys.stderr)
        return 2
    try:
        return await _serve(args, spec, shards)
    finally:
        os.close(held)


async def _serve(args: argparse.Namespace, spec: JobSpec, shards: int) -> int:
    from scheduler.service import start_scheduler

    address = f"{args.host}:{args.port}"
    if busy := listen.cannot_listen("ps-scheduler", args.host, args.port):  # before --fresh
        print(busy, file=sys.stderr)
        return 2
    state = SchedulerState(str(args.state))
    if args.fresh:
        await discard(state, args)
    try:
        created = state.create_or_resume(spec, shards)
    except OtherJob as e:
        state.close()
        print(
            f"ps-scheduler: {args.state}: {e}; use --fresh to start afresh, or the same job "
            "spec to resume",
            file=sys.stderr,
        )
        return 2
    except StateError as e:
        state.close()
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
        print(listen.cannot_listen("ps-scheduler", args.host, args.port, e), file=sys.stderr)
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ps-scheduler listening on {args.host}:{port}", flush=True)
    if spec.recipe_applied:  # once it runs: a refusal before is its one line
        log.info("%s", recipes.describe(spec.model, spec.mode, spec.recipe_applied))
    if metrics is not None:
        print(f"ps-scheduler metrics on {args.host}:{metrics_port}", flush=True)
    watcher = asyncio.create_task(service.watch(stop))
    ending = asyncio.create_task(when_finished(service, args))
    await stop.wait()
    log.info("shutting down")
    ending.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(2.0)
    await watcher
    await service.membership.close()
    state.close()
    return 0


async def discard(state: SchedulerState, args: argparse.Namespace) -> None:
    """``--fresh``: forget the job the state file holds and end it on its servers (best
    effort, one line for each that cannot be reached), so that the new job's workers
    neither meet it (ALREADY_EXISTS) nor train on from its weights."""
    try:
        old = state.spec
    except (StateError, ValueError):  # no job, or one this version cannot read
        old = None
    if not state.discard():
        return
    log.info("--fresh: discarded the job %s held; starting a new one", args.state)
    if old is None:
        return
    held, failed = await asyncio.to_thread(end_job_on_each, old, args.connecting)
    log.info("--fresh: ended job %s on %d of %d server(s)", old.job_id, len(held), len(old.servers))
    for line in failed:
        log.warning("--fresh: cannot end job %s on %s; starting anyway", old.job_id, line)


async def when_finished(service: SchedulerService, args: argparse.Namespace) -> None:
    """Once the job is finished: write the trained model (``--save``), then, when every
    worker has left (or a lease timeout has passed), drop the job from the servers."""
    await service.finished.wait()
    spec = service.state.spec
    if args.save is not None:
        try:
            await asyncio.to_thread(save_model, spec, args.connecting, args.save)
            log.info("wrote the trained model to %s", args.save)
        except (PSError, OSError) as e:
            log.error("cannot write the trained model to %s: %s", args.save, e)
            return  # the weights stay on the servers, for another try
    if not args.end_job:
        return
    deadline = time.monotonic() + spec.lease_timeout_s
    while service.state.live_workers() and time.monotonic() < deadline:
        await asyncio.sleep(END_POLL_S)  # workers leave once told the job is finished
    try:
        ended = await asyncio.to_thread(end_job, spec, args.connecting)
    except PSError as e:
        log.error("cannot end the job on the servers: %s", e)
        return
    log.info("the job is finished: ended it on %d of %d server(s)", sum(ended), len(ended))


def main(argv: list[str] | None = None) -> int:
    parent.die_with_launcher()  # a launcher's child ends with it
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
        "that hands out data shards as leases.",
        epilog="commands: ps-scheduler status --scheduler HOST:PORT prints a running job's "
        "progress (ps-scheduler status --help)",
    )
    listen.add_arguments(parser)
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("scheduler.db"),
        help="SQLite file holding the job's state (default scheduler.db); restarted on it, "
        "the scheduler resumes the job",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the job the state file holds and start this one afresh",
    )
    parser.add_argument("--save", type=Path, metavar="PATH", help=SAVE_HELP)
    parser.add_argument(
        "--end-job", action=argparse.BooleanOptionalAction, default=True, help=END_JOB_HELP
    )
    observability.add_arguments(parser)
    security.add_arguments(parser, serves=True, connects=True)
    add_job_arguments(
        parser,
        env=True,
        custom={"model": {"type": model_argument, "help": MODEL_HELP, "metavar": "MODEL"}},
    )
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
        check_model_fits(spec)
        check_save_path(args.save)
    except (SpecError, DataError, PreflightError) as e:
        print(f"ps-scheduler: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(args, spec, shards))


if __name__ == "__main__":
    sys.exit(main())
