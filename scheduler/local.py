"""A local cluster as a Python object: real processes on loopback, supervised.

:class:`LocalCluster` starts the servers, the scheduler and the workers of a
job (``ps-cluster up`` and the benchmarks use it), restarts a server that dies
(on its checkpoint) or the scheduler (on its state file), removes what a dead
child left behind (its Unix socket, its shared-memory segments:
:func:`protos.orphans.sweep_leftovers`), and stops every process on ``close()``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protos.jobspec import JobSpec, job_variables
from protos.orphans import sweep_leftovers
from protos.security import TOKEN_ENV, ClientSecurity
from ps_worker import Client, ClientConfig
from ps_worker.daemon import DEVICES
from scheduler.finish import end_job
from scheduler.launch import BIN, SHARED_CORES_ENV, Daemon, Host, stop_together
from scheduler.lifecycle import (
    ADDRESSES,
    CHECKPOINTS,
    JOB_FILE,
    STATE_FILE,
    Claim,
    clear_previous_run,
    first_unused,
)
from scheduler.status import Unreachable, fetch_progress

__all__ = ["POLL_S", "SHARED_CORES_ENV", "LocalCluster"]

WORKER_REPLACEMENTS = 3  # a slot's killed workers replaced in a row with no shard done
RESTART_ATTEMPTS = 3  # restarts in a row of a server or the scheduler that did not start

POLL_S = 0.25


# (role, index) -> the host that runs it; roles: "server", "scheduler", "worker"
Placement = Callable[[str, int], Host]


@dataclass
class LocalCluster:
    """Real processes on loopback; ``close()`` (or the with-block) stops them all."""

    spec: JobSpec
    work_dir: Path
    workers: int
    slowdown: dict[int, float] = field(default_factory=dict)  # worker index -> factor - 1
    num_servers: int = 2
    device: str = DEVICES[0]  # the workers' --device
    server_daemons: list[Daemon] = field(default_factory=list)
    scheduler: Daemon | None = None
    worker_daemons: list[Daemon] = field(default_factory=list)
    token: str | None = None  # the job's shared token, given to every process
    restart_on_failure: bool = True  # restart a crashed server or scheduler, replace a worker
    checkpoint_every: str = "5s"
    metrics: bool = False  # every daemon serves /metrics on a free port
    log_format: str = "text"  # or json
    restarts: list[str] = field(default_factory=list)  # what was restarted, and why
    cleared: list[str] = field(default_factory=list)  # what an earlier run had left here
    started: list[Daemon] = field(default_factory=list)  # every process started, restarts too
    swept: list[str] = field(default_factory=list)  # files dead processes had left, removed
    placement: Placement | None = None  # which host runs each process; None: this one
    work_claim: Claim | None = None  # ps-cluster up's, taken before its checks; else start's
    _claimed_here: bool = False
    _scheduler_port: str = "0"
    _scheduler_address: str = ""
    _seen_dead: set[int] = field(default_factory=set)  # children already swept after
    _done: int = 0  # shards done when last seen: progress resets the counts below
    _replaced: dict[int, int] = field(default_factory=dict)  # worker slot -> replacements
    _failed_starts: int = 0  # restarts of a server or the scheduler that did not start

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
        return self._daemon(argv, log, self.env, ("server", i))

    def _daemon(
        self, argv: list[str], log: Path, env: dict[str, str], role: tuple[str, int]
    ) -> Daemon:
        """Start argv on the host its role is placed on (a server or the scheduler listening
        on that host's address)."""
        host = self.placement(*role) if self.placement else None
        if host is not None and role[0] != "worker":
            argv = [*argv, "--host", host.address]
        daemon = Daemon(argv, log, env=env, wrap=host.wrap if host else None)
        self.started.append(daemon)
        return daemon

    def _sweep_after_deaths(self) -> None:
        """Once a child has died: remove the socket and shared-memory segments that dead
        processes left (a killed process cannot remove its own)."""
        dead = {d.proc.pid for d in self.started if d.proc.poll() is not None}
        if dead - self._seen_dead:
            self._seen_dead |= dead
            self.swept += sweep_leftovers()

    def _supervise(self) -> None:
        """Restart a server or the scheduler that exited, or raise if that is off; replace a
        worker killed by a signal (when restarts are on); sweep what a dead child left."""
        self._sweep_after_deaths()
        for i, d in enumerate(self.server_daemons):
            if d.proc.poll() is None:
                continue
            what = f"parameter server {i} exited with code {d.proc.returncode}"
            if not self.restart_on_failure:
                raise RuntimeError(f"parameter server {i} {d.how_it_ended()}")
            d.stop()
            address = self.spec.servers[i]
            self.server_daemons[i] = self._server(i, address.rsplit(":", 1)[1])
            if self._started(lambda d=self.server_daemons[i]: d.address):  # (the same port)
                self._restarted(f"{what}; restarted on its checkpoint")
        if self.scheduler is not None and self.scheduler.proc.poll() is not None:
            what = f"the scheduler exited with code {self.scheduler.proc.returncode}"
            if not self.restart_on_failure:
                raise RuntimeError(f"the scheduler {self.scheduler.how_it_ended()}")
            self.scheduler.stop()
            if self._started(self.start_scheduler):
                self._restarted(f"{what}; restarted on its state file")
        for i, d in enumerate(self.worker_daemons):
            code = d.proc.poll()
            if code is None or code >= 0 or not self.restart_on_failure:
                continue  # running, finished, or failed by its own error: stays down
            d.stop()  # (closes its log)
            if self._replaced.get(i, 0) >= WORKER_REPLACEMENTS:
                if self._replaced[i] == WORKER_REPLACEMENTS:
                    self._replaced[i] += 1
                    self._restarted(
                        f"worker {i} was killed (code {code}) {WORKER_REPLACEMENTS + 1} times "
                        "with no shard done meanwhile: not replaced again"
                    )
                continue
            self._replaced[i] = self._replaced.get(i, 0) + 1
            self.worker_daemons[i] = self._worker(i)
            self._restarted(f"worker {i} was killed (code {code}); a new worker replaces it")

    def _started(self, start: Callable[[], object]) -> bool:
        """Whether a restart started (killed before it listened, it is tried again at the
        next look, up to RESTART_ATTEMPTS times in a row)."""
        try:
            start()
        except RuntimeError as e:
            self._failed_starts += 1
            if self._failed_starts > RESTART_ATTEMPTS:
                raise
            print(f"ps-cluster: {e}; trying again", file=sys.stderr, flush=True)
            return False
        self._failed_starts = 0
        return True

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
        self.scheduler = self._daemon(argv, log, env, ("scheduler", 0))
        self._scheduler_address = self.scheduler.address  # kept across its restarts
        self._scheduler_port = self._scheduler_address.rsplit(":", 1)[1]
        return self.scheduler

    def add_worker(self) -> Daemon:
        daemon = self._worker(len(self.worker_daemons))
        self.worker_daemons.append(daemon)
        return daemon

    def _worker(self, i: int) -> Daemon:
        """A ps-worker process for slot i (it registers as a new worker)."""
        assert self.scheduler is not None
        argv = [
            str(BIN / "ps-worker"),
            "--scheduler",
            self._scheduler_address,
            "--device",
            self.device,
            "--no-progress",
            *self.observability_args,
        ]
        if self.slowdown.get(i):
            argv += ["--slowdown", str(self.slowdown[i])]
        log = first_unused(self.work_dir, lambda n: f"worker{i}{f'-{n}' if n else ''}.log")
        return self._daemon(argv, log, self.env, ("worker", i))

    def progress(self) -> dict | None:
        """The scheduler's progress, or None while it cannot be reached."""
        assert self.scheduler is not None
        try:
            return fetch_progress(self.scheduler.address, self.security, timeout_s=5)
        except (Unreachable, RuntimeError):  # (RuntimeError: a restart that did not start)
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
            if p is not None and p["done"] > self._done:
                self._done, self._replaced = p["done"], {}
            if p is not None and p["finished"]:
                if self.restart_on_failure:  # a server killed at the end: up, to end the job
                    self._supervise()
                return p
            self._supervise()
            running = [w for w in self.worker_daemons if w.proc.poll() is None]
            if not running and p is not None:
                codes = [w.proc.returncode for w in self.worker_daemons]
                # The error of one that failed by itself (exit code > 0), not of one killed
                # by a signal (its last line is whatever it was doing then).
                failed = max(self.worker_daemons, key=lambda w: w.proc.returncode or 0)
                failed = failed if failed.proc.returncode else None
                said = f"; {Path(failed.log.name).name}: {failed.last_log_line()}" if failed else ""
                raise RuntimeError(
                    f"every worker exited (codes {codes}) before the job finished{said}"
                )
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
        """Stop the workers, then the scheduler and the servers (together), then any other
        process started; remove what the dead left behind."""
        stop_together(self.worker_daemons)
        stop_together([*([self.scheduler] if self.scheduler else []), *self.server_daemons])
        stop_together(self.started)  # those replaced by a restart (a no-op once ended)
        if self.started:  # every child has ended: nothing one made may stay
            self.swept += sweep_leftovers()
        if self._claimed_here and self.work_claim is not None:
            self.work_claim.release()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
