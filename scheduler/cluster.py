"""ps-cluster: a whole cluster (scheduler, servers, workers) as local processes.

    ps-cluster up --dataset mnist1d --model mnist1d-cnn --mode ssp --servers 2 --workers 4

checks the job (the model is built and given a batch of the data), prepares
the data if the data directory has none, starts everything on free loopback
ports, prints a line per evaluated epoch, a final table, optionally a JSON
summary and the trained model, and stops every process however it ends.

    ps-cluster status --work-dir DIR [--watch]

shows the running cluster's live table (workers, clocks, heartbeats, epoch
progress, accuracy so far).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from protos import outfile, recipes
from protos.jobspec import JobSpec, SpecError, add_job_arguments, spec_from_args
from protos.security import ClientSecurity, SecurityError, read_token
from ps_worker import PSError
from ps_worker.daemon import DEVICE_HELP, DEVICES
from ps_worker.data import DATASETS, MANIFEST, DataError, prepare
from scheduler import status
from scheduler.finish import SAVE_HELP, save_model
from scheduler.lifecycle import (
    ADDRESSES,
    Terminated,
    WorkDir,
    check_work_dir_use,
    ending_signals_raise,
)
from scheduler.local import POLL_S, SHARED_CORES_ENV, LocalCluster
from scheduler.preflight import (
    MODEL_HELP,
    PreflightError,
    check_device,
    check_model_fits,
    check_save_path,
    check_stragglers,
    model_argument,
)
from scheduler.report import EpochLines, bar_postfix, final_table, summarise

__all__ = [
    "POLL_S",
    "SHARED_CORES_ENV",
    "LocalCluster",
    "main",
    "parse_straggler",
    "summarise",
]


def parse_straggler(text: str) -> tuple[int, float]:
    index, _, factor = text.partition(":")
    try:
        i, f = int(index), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--straggler {text!r}: expected INDEX:FACTOR, e.g. 0:3.0"
        ) from None
    if i < 0 or f < 1:
        raise argparse.ArgumentTypeError("--straggler: index >= 0 and factor >= 1")
    return i, f


def up(args: argparse.Namespace) -> int:
    """``ps-cluster up``: the job checked, run to its end, reported; every child stopped."""
    work = WorkDir(args.work_dir)
    try:
        with ending_signals_raise():
            return _up(args, work)
    except Terminated as e:
        print(f"ps-cluster: {e}: stopped every process", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ps-cluster: interrupted: stopped every process", file=sys.stderr)
        return 130
    finally:
        work.finish()


def _preflight(
    args: argparse.Namespace, data_dir: Path, work: WorkDir
) -> tuple[JobSpec, str | None]:
    """The job and its token, checked before any process starts; the work dir held (a run
    there is refused) before anything is written in it (the data, prepared if missing).
    Raises what up() reports in one line."""
    spec = spec_from_args(args, {"data_dir": str(data_dir), "expected_workers": args.workers})
    check_stragglers(args.straggler, args.workers)
    check_device(args.device)
    check_save_path(args.save)
    if args.summary_json:
        outfile.check(args.summary_json, "--summary-json")  # never a device, FIFO or link
    if not args.timeout_s > 0:  # NaN too
        raise PreflightError(f"--timeout-s {args.timeout_s:g}: must be positive")
    check_work_dir_use(work.path, args.config)
    token = read_token(args.token_file)
    prepared = (data_dir / MANIFEST).exists()
    if prepared:
        check_model_fits(spec)
    work.claim()
    if not prepared:
        print(f"preparing {args.dataset} in {data_dir} ...", flush=True)
        prepare(args.dataset, data_dir, args.shards, args.samples, int(args.seed or 0))
        check_model_fits(spec)
    return spec, token


def _up(args: argparse.Namespace, work: WorkDir) -> int:
    data_dir = args.data_dir or work.path / "data"
    try:
        spec, token = _preflight(args, data_dir, work)
    except (SpecError, PreflightError, DataError, SecurityError, OSError) as e:
        print(f"ps-cluster: {e}", file=sys.stderr)
        return 2
    cluster = LocalCluster(
        spec,
        work.path,
        args.workers,
        {i: f - 1.0 for i, f in args.straggler},
        args.servers,
        device=args.device,
        token=token,
        restart_on_failure=args.restart_on_failure,
        work_claim=work.hold,
    )
    started, started_at = time.monotonic(), time.time()
    interactive = sys.stdout.isatty()
    bar = tqdm(
        total=None,
        unit="shard",
        desc=spec.mode,
        file=sys.stdout,
        disable=args.quiet or not interactive,
    )
    epochs = EpochLines()

    def show(p: dict) -> None:
        if interactive:
            bar.total = p["epochs"] * p["shards_per_epoch"]
            bar.n = p["done"]
            bar.set_postfix_str(bar_postfix(p), refresh=False)
            bar.refresh()
        elif not args.quiet:  # a log, not a terminal: a line per evaluated epoch
            for line in epochs.new(p):
                print(line, flush=True)

    with cluster:
        try:
            cluster.start()
            if cluster.cleared:
                print(
                    f"ps-cluster: a new job: cleared the previous run's scheduler state, "
                    f"checkpoints and logs in {work.path}",
                    flush=True,
                )
            print(
                f"cluster up: scheduler {cluster.scheduler.address}, servers "
                f"{', '.join(cluster.spec.servers)}, {args.workers} workers "
                f"(--device {args.device}); {work.describe()}",
                flush=True,
            )
            if spec.recipe_applied:
                print(recipes.describe(spec.model, spec.mode, spec.recipe_applied), flush=True)
            progress = cluster.wait(args.timeout_s, show)
            statuses = cluster.server_status()
            if args.save:
                save_model(cluster.spec, cluster.security, args.save)
            try:
                cluster.end_job()  # after the summary's statuses and the model
            except PSError as e:
                print(f"ps-cluster: the job is done, but not ended on the servers: {e}")
        except (RuntimeError, PSError, OSError) as e:
            bar.close()
            work.keep = True
            print(f"ps-cluster: {e}", file=sys.stderr)
            print(f"ps-cluster: the logs are in {work.path}", file=sys.stderr)
            return 1
        finally:
            bar.close()
    summary = summarise(cluster.spec, progress, statuses, time.monotonic() - started, started_at)
    print(final_table(summary))
    if args.save:
        print(f"wrote the trained model to {args.save}")
    if args.summary_json:
        text = json.dumps(summary, indent=2)
        try:
            outfile.write(args.summary_json, "--summary-json", lambda t: Path(t).write_text(text))
        except OSError as e:
            print(f"ps-cluster: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.summary_json}")
    return 0


def cluster_status(args: argparse.Namespace) -> int:
    """``ps-cluster status``: the table of ``ps-scheduler status`` for a cluster's work dir."""
    try:
        addresses = json.loads((args.work_dir / ADDRESSES).read_text())
        token = read_token(args.token_file)
    except (OSError, ValueError) as e:
        print(
            f"ps-cluster: no running cluster in {args.work_dir} ({e}); pass the work dir "
            "that ps-cluster up printed",
            file=sys.stderr,
        )
        return 2
    except SecurityError as e:
        print(f"ps-cluster: {e}", file=sys.stderr)
        return 2
    return status.show(
        addresses["scheduler"],
        ClientSecurity(token=token),
        args.json,
        args.watch,
        args.interval,
        unreachable=f"ps-cluster: {{error}}; the run in {args.work_dir} has ended or was "
        "stopped (its logs and any --summary-json say how it went)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-cluster",
        description=__doc__.splitlines()[0],
        epilog="commands: up (run a job until it finishes), status (a running job's table)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,status}")
    p = sub.add_parser("up", help="run a job on a local cluster until it finishes")
    p.add_argument("--dataset", choices=DATASETS, default="mnist1d", help="data set to prepare")
    p.add_argument("--data-dir", type=Path, help="prepared data (prepared here if missing)")
    p.add_argument("--samples", type=int, default=None, help="samples to generate")
    p.add_argument("--shards", type=int, default=16, help="shards to prepare (default 16)")
    add_job_arguments(
        p,
        skip=("data_dir", "servers", "expected_workers"),
        custom={"model": {"type": model_argument, "help": MODEL_HELP, "metavar": "MODEL"}},
    )
    p.add_argument("--servers", type=int, default=2, help="parameter servers (default 2)")
    p.add_argument("--workers", type=int, default=4, help="workers (default 4)")
    p.add_argument("--device", choices=DEVICES, default=DEVICES[0], help=DEVICE_HELP)
    p.add_argument("--save", type=Path, metavar="PATH", help=SAVE_HELP)
    p.add_argument(
        "--token-file",
        type=Path,
        help="require this shared token on every call (or set $PS_TOKEN)",
    )
    p.add_argument(
        "--restart-on-failure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart a crashed server (on its checkpoint) or scheduler, and replace a killed "
        "worker (default on)",
    )
    p.add_argument(
        "--straggler",
        type=parse_straggler,
        action="append",
        default=[],
        help="INDEX:FACTOR makes that worker FACTOR times slower (repeatable)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where logs and state go; a run there clears the previous run's "
        "(default: a temporary dir, removed at the end unless the job fails)",
    )
    p.add_argument("--summary-json", type=Path, help="write the job's summary here")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long")
    p.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    st = sub.add_parser("status", help="show a running cluster's progress, once or live")
    st.add_argument(
        "--work-dir", type=Path, required=True, help="the work dir that ps-cluster up printed"
    )
    st.add_argument("--token-file", type=Path, help="the cluster's token file (or $PS_TOKEN)")
    status.add_arguments(st)
    args = parser.parse_args(argv)
    if args.command == "status":
        if args.interval <= 0:
            parser.error("--interval must be positive")
        return cluster_status(args)
    if args.servers < 1 or args.workers < 1:
        parser.error("--servers and --workers must be at least 1")
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
