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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from protos import outfile, scheduler_pb2, scheduler_pb2_grpc
from protos.jobspec import JobSpec, SpecError, add_job_arguments, job_variables, spec_from_args
from protos.security import TOKEN_ENV, ClientSecurity, SecurityError, read_token
from ps_worker import Client, ClientConfig, PSError
from ps_worker.daemon import DEVICE_HELP, DEVICES
from ps_worker.data import DATASETS, MANIFEST, DataError, prepare
from scheduler import status
from scheduler.finish import SAVE_HELP, end_job, save_model
from scheduler.launch import BIN, Daemon
from scheduler.lifecycle import (
    ADDRESSES,
    CHECKPOINTS,
    JOB_FILE,
    STATE_FILE,
    Claim,
    Terminated,
    WorkDir,
    check_work_dir_use,
    clear_previous_run,
    ending_signals_raise,
    first_unused,
)
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

__all__ = ["LocalCluster", "main", "parse_straggler", "summarise"]

POLL_S = 0.25
# One OpenMP thread per process: a local cluster's processes share the machine's cores, and
# several processes' busy-waiting OpenMP threads on the same cores made training 5x slower.
SHARED_CORES_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class LocalCluster:
    """Real processes on loopback; ``close()`` (or the with-block) stops them all."""

    spec: JobSpec
    work_dir: Path
    workers: int
    slowdown: dict[int, float] = field(default_factory=dict)  # worker index -> factor
    num_servers: int = 2
    device: str = DEVICES[0]  # the workers' --device
    server_daemons: list[Daemon] = field(default_factory=list)
    scheduler: Daemon | None = None
    worker_daemons: list[Daemon] = field(default_factory=list)
    token: str | None = None  # the job's shared token, given to every process
    restart_on_failure: bool = True  # restart a crashed server (on its checkpoint) or scheduler
    checkpoint_every: str = "5s"
    metrics: bool = False  # every daemon serves /metrics on a free port
    log_format: str = "text"  # or json
    restarts: list[str] = field(default_factory=list)  # what was restarted, and why
    cleared: list[str] = field(default_factory=list)  # what an earlier run had left here
    work_claim: Claim | None = None  # ps-cluster up's, taken before its checks; else start's
    _claimed_here: bool = False
    _scheduler_port: str = "0"

    def start(self) -> LocalCluster:
        """Start servers, the scheduler and the workers; on failure, stop what started."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> LocalCluster:
        if self.work_claim is None:
            self.work_claim, self._claimed_here = Claim(self.work_dir), True
        self.cleared = clear_previous_run(self.work_dir)  # a new cluster is a new job
        for i in range(self.num_servers):
            self.server_daemons.append(self._server(i, "0"))
        servers = tuple(d.address for d in self.server_daemons)
        self.spec = JobSpec.from_dict({**json.loads(self.spec.to_json()), "servers": servers})
        self.start_scheduler()
        (self.work_dir / ADDRESSES).write_text(
            json.dumps({"scheduler": self.scheduler.address, "servers": list(servers)})
        )
        for _ in range(self.workers):
            self.add_worker()
        return self

    @property
    def env(self) -> dict[str, str]:
        """What every process of the cluster gets in its environment."""
        return {**SHARED_CORES_ENV, **({TOKEN_ENV: self.token} if self.token else {})}

    @property
    def observability_args(self) -> list[str]:
        """The flags every daemon gets for its logs and metrics."""
        return ["--log-format", self.log_format] + (["--metrics-port", "0"] if self.metrics else [])

    @property
    def security(self) -> ClientSecurity:
        return ClientSecurity(token=self.token)

    def _server(self, i: int, port: str) -> Daemon:
        """Server i on port (0: any), checkpointing into its own directory."""
        argv = [
            str(BIN / "ps-server"),
            "--port",
            port,
            "--checkpoint-dir",
            str(self.work_dir / CHECKPOINTS / f"server{i}"),
            "--checkpoint-every",
            self.checkpoint_every,
            *self.observability_args,
        ]
        log = first_unused(self.work_dir, lambda n: f"server{i}{f'-{n}' if n else ''}.log")
        return Daemon(argv, log, env=self.env)

    def _supervise(self) -> None:
        """Restart a server or the scheduler that exited, or raise if that is off."""
        for i, d in enumerate(self.server_daemons):
            if d.proc.poll() is None:
                continue
            what = f"parameter server {i} exited with code {d.proc.returncode}"
            if not self.restart_on_failure:
                raise RuntimeError(f"{what}: {d.last_log_line()} (see {d.log.name})")
            d.stop()
            port = d.address.rsplit(":", 1)[1]
            self.server_daemons[i] = self._server(i, port)
            assert self.server_daemons[i].address == d.address
            self._restarted(f"{what}; restarted on its checkpoint")
        if self.scheduler is not None and self.scheduler.proc.poll() is not None:
            what = f"the scheduler exited with code {self.scheduler.proc.returncode}"
            if not self.restart_on_failure:
                raise RuntimeError(
                    f"{what}: {self.scheduler.last_log_line()} (see {self.scheduler.log.name})"
                )
            self.scheduler.stop()
            self.start_scheduler()
            self._restarted(f"{what}; restarted on its state file")

    def _restarted(self, message: str) -> None:
        self.restarts.append(message)
        print(f"ps-cluster: {message}", file=sys.stderr, flush=True)

    def start_scheduler(self) -> Daemon:
        """(Re)start the scheduler on its state file (and, after the first start, its port)."""
        config = self.work_dir / JOB_FILE
        config.write_text(self.spec.to_json())  # JSON is YAML
        argv = [
            str(BIN / "ps-scheduler"),
            "--port",
            self._scheduler_port,
            "--config",
            str(config),
            "--state",
            str(self.work_dir / STATE_FILE),
            "--no-end-job",  # the launcher ends the job itself, once it has what it reports
            *self.observability_args,
        ]
        # The job file is the whole job: PS_* variables in this environment must not override it
        # (ps-scheduler reads them as flags); empty is unset.
        env = {**self.env, **dict.fromkeys(job_variables(), "")}
        log = first_unused(self.work_dir, lambda n: f"scheduler{n}.log")
        self.scheduler = Daemon(argv, log, env=env)
        self._scheduler_port = self.scheduler.address.rsplit(":", 1)[1]
        return self.scheduler

    def add_worker(self) -> Daemon:
        i = len(self.worker_daemons)
        assert self.scheduler is not None
        argv = [
            str(BIN / "ps-worker"),
            "--scheduler",
            self.scheduler.address,
            "--device",
            self.device,
            "--no-progress",
            *self.observability_args,
        ]
        if self.slowdown.get(i):
            argv += ["--slowdown", str(self.slowdown[i])]
        daemon = Daemon(argv, self.work_dir / f"worker{i}.log", env=self.env)
        self.worker_daemons.append(daemon)
        return daemon

    def progress(self) -> dict | None:
        """The scheduler's progress, or None while it cannot be reached."""
        assert self.scheduler is not None
        try:
            with self.security.channel(self.scheduler.address, []) as channel:
                reply = scheduler_pb2_grpc.SchedulerStub(channel).Progress(
                    scheduler_pb2.ProgressRequest(), timeout=5
                )
            return json.loads(reply.progress_json)
        except grpc.RpcError:
            return None

    def server_status(self) -> list:
        with Client(
            list(self.spec.servers),
            job_id=self.spec.job_id,
            config=ClientConfig(timeout_s=10, security=self.security),
        ) as client:
            return client.status()

    def wait(self, timeout_s: float, on_progress=None) -> dict:
        """Poll until the job finishes; raises RuntimeError if it cannot."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = self.progress()
            if p is not None and on_progress:
                on_progress(p)
            if p is not None and p["finished"]:
                return p
            running = [w for w in self.worker_daemons if w.proc.poll() is None]
            if not running and p is not None:
                codes = [w.proc.returncode for w in self.worker_daemons]
                failed = next((w for w in self.worker_daemons if w.proc.returncode), None)
                said = f"; {Path(failed.log.name).name}: {failed.last_log_line()}" if failed else ""
                raise RuntimeError(
                    f"every worker exited (codes {codes}) before the job finished{said}"
                )
            self._supervise()
            time.sleep(POLL_S)  # polling the job's progress, not synchronising
        raise RuntimeError(f"the job did not finish within {timeout_s:.0f}s")

    def end_job(self) -> None:
        """After the job finished: its workers gone, the job dropped from the servers."""
        deadline = time.monotonic() + self.spec.lease_timeout_s
        for d in self.worker_daemons:  # a worker leaves once told the job is finished
            try:
                d.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.stop()
        end_job(self.spec, self.security)

    def close(self) -> None:
        for d in [
            *self.worker_daemons,
            *([self.scheduler] if self.scheduler else []),
            *self.server_daemons,
        ]:
            d.stop()
        if self._claimed_here and self.work_claim is not None:
            self.work_claim.release()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        help="restart a crashed server (on its checkpoint) or scheduler (default on)",
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
