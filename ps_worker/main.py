"""``ps-worker``: the worker daemon."""

from __future__ import annotations

import argparse
import os
import sys

from protos import observability, parent, security
from ps_worker.daemon import DEVICE_HELP, DEVICES, WorkerOptions
from ps_worker.data import DataError
from ps_worker.errors import PSError
from ps_worker.models import ModelError


def main(argv: list[str] | None = None) -> int:
    parent.die_with_launcher()  # a launcher's child ends with it
    parser = argparse.ArgumentParser(
        prog="ps-worker",
        description="Register with the scheduler, lease data shards, pull weights, compute "
        "gradients with PyTorch (on the GPU when there is one) and push them, until the job "
        "is done.",
    )
    parser.add_argument(
        "--scheduler",
        default=os.environ.get("PS_SCHEDULER"),
        help="scheduler address HOST:PORT (env PS_SCHEDULER)",
    )
    parser.add_argument(
        "--device",
        type=str.lower,
        choices=DEVICES,
        default=os.environ.get("PS_DEVICE") or DEVICES[0],
        help=f"{DEVICE_HELP} [env PS_DEVICE]",
    )
    parser.add_argument(
        "--scheduler-timeout-s",
        type=float,
        default=WorkerOptions.scheduler_timeout_s,
        help="how long to keep retrying an unreachable scheduler or servers, saying so on "
        "the log every few seconds (default %(default)s)",
    )
    parser.add_argument(
        "--slowdown",
        type=float,
        default=0.0,
        help="straggler: each iteration (compute and push/pull) takes 1 + SLOWDOWN times "
        "as long, the extra spent waiting",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_const", const=True)
    progress.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    security.add_arguments(parser, serves=False, connects=True)
    observability.add_arguments(parser)
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("PS_METRICS_HOST", "127.0.0.1"),
        help="address /metrics listens on (default 127.0.0.1; 0.0.0.0 in a container)",
    )
    args = parser.parse_args(argv)
    if not args.scheduler:
        parser.error("--scheduler is required (or set PS_SCHEDULER)")
    if args.slowdown < 0:
        parser.error("--slowdown must not be negative")
    try:
        credentials = security.client_security(args)
    except security.SecurityError as e:
        parser.error(str(e))
    observability.configure_logging(args)

    from ps_worker.daemon import WorkerDaemon
    from ps_worker.metrics import WorkerMetrics

    metrics = None
    if args.metrics_port is not None:
        metrics = WorkerMetrics()
        port = observability.serve_metrics(
            metrics.registry, args.metrics_port, args.metrics_host, "ps-worker"
        )
        print(f"ps-worker metrics on {args.metrics_host}:{port}", flush=True)

    try:
        daemon = WorkerDaemon(
            WorkerOptions(
                scheduler=args.scheduler,
                device=args.device,
                scheduler_timeout_s=args.scheduler_timeout_s,
                progress=args.progress,
                slowdown=args.slowdown,
                security=credentials,
                metrics=metrics,
            )
        )
        return daemon.run()
    except (PSError, DataError, ModelError) as e:
        print(f"ps-worker: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
