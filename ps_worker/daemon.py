"""The worker daemon: lease shards from the scheduler and train on them against the servers.

Whatever it waits for longer than a few seconds (the scheduler, the servers,
work) it says on its log, and keeps saying while it waits. Epochs are counted
from 1 in its log lines, from 0 on the wire. In the local modes it takes its
own optimizer steps (:class:`ps_worker.local.LocalSteps`) and pushes its change
every ``local_steps`` batches and at the end of each task.

A straggler (``slowdown`` s > 0) stands for a machine ``1 + s`` times slower:
each iteration takes ``1 + s`` times as long as its work did (compute, then
push and pull), the extra waited out on the stop event (no CPU taken from the
others), in two parts: s times the compute before the push (its gradients are
as stale as a slow machine's), s times the push and pull after it.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from tqdm import tqdm

from protos import rpc, scheduler_pb2, scheduler_pb2_grpc
from protos.jobspec import JobSpec
from protos.security import ClientSecurity
from ps_worker.client import Client, ClientConfig
from ps_worker.data import Manifest, load, read_manifest
from ps_worker.errors import PSError
from ps_worker.errors import StateError as LeaseLost  # FAILED_PRECONDITION: not its lease now
from ps_worker.local import LocalSteps
from ps_worker.metrics import WorkerMetrics
from ps_worker.models import build_model
from ps_worker.retry import RetryPolicy, call_with_retry
from ps_worker.waits import WaitReporter

log = logging.getLogger("ps_worker")
DEVICES = ("auto", "cpu", "cuda")  # the first is the default
DEVICE_HELP = "where the workers compute: auto (cuda when there is a GPU), cpu or cuda"


@dataclass(frozen=True)
class WorkerOptions:
    scheduler: str
    device: str = DEVICES[0]
    scheduler_timeout_s: float = 120.0  # how long to retry an unreachable scheduler
    poll_interval_s: float = 0.2  # between lease requests when there is no work yet
    progress: bool | None = None  # tqdm bars; None: only on a terminal
    slowdown: float = 0.0  # straggler: each iteration takes 1 + slowdown times its work
    security: ClientSecurity = field(default_factory=ClientSecurity)  # token and TLS
    metrics: WorkerMetrics | None = None  # Prometheus metrics to keep, if served


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PSError("--device cuda: no CUDA device is available")
    return torch.device(choice)


def wait_reporter() -> WaitReporter:
    """Reports on long waits at the times a Client reports on its own."""
    return WaitReporter(ClientConfig.report_wait_after_s, ClientConfig.report_wait_every_s)


class SchedulerLink:
    """The worker's calls to the scheduler, each with a deadline and retries; a call that
    retries an unreachable scheduler says so on the log while it does."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        security: ClientSecurity,
        reports: WaitReporter | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = security.channel(address, rpc.channel_options())
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.policy = RetryPolicy(retries=1000, backoff_s=0.1, max_backoff_s=2.0)
        self.reports = reports or wait_reporter()

    def call(self, name: str, request, timeout_s: float | None = None):
        method = getattr(self.stub, name)
        limit = timeout_s or self.timeout_s
        last = "no answer yet"

        def attempt(t: float):
            nonlocal last
            try:
                return method(request, timeout=min(t, 30.0))
            except grpc.RpcError as e:
                last = f"{e.code().name}: {(e.details() or '').splitlines()[0][:120]}"
                raise

        def describe() -> str:
            return f"the scheduler at {self.address} ({last}); retrying for up to {limit:g}s"

        with self.reports.waiting(name, describe):
            return call_with_retry(attempt, limit, self.policy, f"scheduler {self.address}", name)

    def close(self) -> None:
        self.reports.close()
        self.channel.close()


class WorkerDaemon:
    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.device = pick_device(options.device)
        self.link = SchedulerLink(options.scheduler, options.scheduler_timeout_s, options.security)
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.samples_per_s = 0.0
        self.has_weights = False  # the model holds the weights its next gradient needs
        # The lease this worker works on, from the Lease reply that granted it until the
        # scheduler acknowledged (or refused) its completion: what the heartbeats report.
        self.working: tuple[str, ...] = ()
        self.client: Client | None = None  # made once registered
        self.local: LocalSteps | None = None  # the local modes: the worker's own steps
        self.owed_s = 0.0  # a straggler's wait still owed (negative: overslept)

    def run(self) -> int:
        reply = self.link.call(
            "Register",
            scheduler_pb2.RegisterRequest(host=socket.gethostname(), device=str(self.device)),
        )
        self.worker_id = reply.worker_id
        self.spec = JobSpec.from_json(reply.job_spec_json)
        self.manifest = read_manifest(Path(self.spec.data_dir))
        log.info(
            "registered as %s; job %s (%s) on %s",
            self.worker_id,
            self.spec.job_id,
            self.spec.model,
            self.device,
        )
        # Heartbeats from registration on: building the model, waiting for the servers or
        # an Init may take longer than the lease timeout, and a silent worker is declared dead.
        heartbeats = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        heartbeats.start()
        try:
            self.model = build_model(self.spec.model, self.spec.seed).to(self.device)
            self.client = Client(
                list(self.spec.servers),
                job_id=self.spec.job_id,
                worker_id=self.worker_id,
                config=ClientConfig(security=self.options.security),
            )
            self.client.wait_for_servers(self.options.scheduler_timeout_s)
            settings = self.spec.job_settings(self.manifest.shard_batches(self.spec.batch_size))
            created = self.client.init(self.model, settings)
            if created:
                log.info("initialised the model on %d server(s)", len(self.spec.servers))
            log.info("job settings: %s", settings.describe())
            log.info("servers reached over: %s", ", ".join(self.client.transports))
            held = self.client.job().settings  # the servers' job: what this worker follows
            if held.mode.local:
                self.local = LocalSteps(self.client, self.model, held)
            self._loop()
            self.link.call("Leave", scheduler_pb2.WorkerLeaveRequest(worker_id=self.worker_id))
            return 0
        finally:
            self.stop.set()
            if heartbeats.is_alive():  # never leave a thread inside gRPC as the process exits
                heartbeats.join(self.spec.lease_timeout_s)
            if self.client is not None:
                self.client.close()
            self.link.close()

    def _loop(self) -> None:
        why_idle = [""]  # the scheduler's latest reason for giving no task
        with ExitStack() as idle:  # open while no task comes: a long stretch is reported
            while True:
                if self.fatal:
                    raise PSError(self.fatal)
                lease = self.link.call(
                    "Lease",
                    scheduler_pb2.LeaseRequest(worker_id=self.worker_id, lease_ids=self.working),
                )
                if lease.has_task:
                    self.working = (lease.task.lease_id,)
                if lease.has_evaluation:
                    self._evaluate(lease.evaluate_epoch)
                if lease.has_task:
                    idle.close()
                    why_idle[0] = ""
                    self._train(lease.task)
                elif lease.finished:
                    log.info("the job is finished")
                    return
                else:
                    log.debug("no task: %s", lease.reason)
                    if not why_idle[0]:
                        what = f"{self.worker_id} asking for work"
                        idle.enter_context(self.link.reports.waiting(what, lambda: why_idle[0]))
                    why_idle[0] = lease.reason or "no task yet"
                    self.stop.wait(self.options.poll_interval_s)  # poll again shortly

    def _train(self, task: scheduler_pb2.Task) -> None:
        x, y = load(Path(self.spec.data_dir), self.manifest.shards[task.shard])
        x_t = torch.from_numpy(x).to(self.device)
        y_t = torch.from_numpy(y).to(self.device)
        rng = np.random.default_rng([self.spec.seed, task.epoch, task.shard])
        order = torch.from_numpy(rng.permutation(len(y))).to(self.device)
        batches = order.split(self.spec.batch_size)
        clock_start = self.client.clock
        versions = []
        started = time.perf_counter()
        straggled = 0.0  # seconds waited as a straggler
        bar = tqdm(
            batches,
            desc=f"{self.worker_id} epoch {task.epoch + 1} shard {task.shard}",
            unit="batch",
            leave=False,
            disable=self._no_progress(),
        )
        if not self.has_weights:
            if self.local is not None:
                self.local.pull()
            else:
                self.client.pull_into(self.model)
            self.has_weights = True
        for index in bar:
            step_started = time.perf_counter()
            self.model.zero_grad(set_to_none=False)
            loss = torch.nn.functional.cross_entropy(self.model(x_t[index]), y_t[index])
            loss.backward()
            straggled += self._straggle(step_started)
            pushed = time.perf_counter()
            if self.local is not None:  # a local step; every local_steps-th pushes and pulls
                summary = self.local.step()
            else:  # the push returns the weights the next batch needs (one round trip if small)
                summary = self.client.push_pull_into(self.model)
            if summary is not None:
                versions.append(list(summary.versions))
            finished = time.perf_counter()
            straggled += self._straggle(pushed)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if metrics := self.options.metrics:
                metrics.compute_seconds.observe(pushed - step_started)
                metrics.push_pull_seconds.observe(finished - pushed)
                metrics.steps.inc()
                metrics.samples.inc(len(index))
                metrics.clock.set(self.client.clock)
        if self.local is not None:  # the task's last change, so no shard's work is held back
            flushed = time.perf_counter()
            if (summary := self.local.flush()) is not None:
                versions.append(list(summary.versions))
            straggled += self._straggle(flushed)
        elapsed = time.perf_counter() - started
        self.samples_per_s = len(y) / elapsed if elapsed > 0 else 0.0
        if metrics := self.options.metrics:
            metrics.shards.inc()
            metrics.samples_per_s.set(self.samples_per_s)
        request = scheduler_pb2.CompleteRequest(
            worker_id=self.worker_id,
            task=task,
            clock_start=clock_start,
            clock_end=self.client.clock,
            samples=len(y),
            versions=[scheduler_pb2.ServerVersions(version=v) for v in versions],
        )
        try:  # retried on a scheduler that restarts: a repeat of a recorded one is answered
            reply = self.link.call("Complete", request)
        except LeaseLost as e:
            log.warning(
                "epoch %d shard %d: the scheduler refused its completion; the shard goes to "
                "another worker: %s",
                task.epoch + 1,
                task.shard,
                e,
            )
            return
        finally:
            self.working = ()
        log.info(
            "epoch %d shard %d: %d samples in %.2fs (%.0f samples/s)%s%s",
            task.epoch + 1,
            task.shard,
            len(y),
            elapsed,
            self.samples_per_s,
            f", {straggled / elapsed:.1%} of it waited as a straggler" if straggled else "",
            "" if reply.recorded else "; recorded before (a retried report)",
            extra={
                "epoch": task.epoch + 1,
                "shard": task.shard,
                "samples_per_s": self.samples_per_s,
                "straggled_s": straggled,
            },
        )

    def _evaluate(self, epoch: int) -> None:
        loss, accuracy = evaluate(self.client, self.spec, self.manifest, self.device)
        if not math.isfinite(loss):
            log.warning("epoch %d: the model diverged (test loss %s)", epoch + 1, loss)
            loss = math.inf  # what the scheduler takes for a diverged model (NaN is not a loss)
        self.link.call(
            "ReportEvaluation",
            scheduler_pb2.EvaluationRequest(
                worker_id=self.worker_id, epoch=epoch, loss=loss, accuracy=accuracy
            ),
        )
        log.info(
            "epoch %d evaluated: test loss %.4f, accuracy %.4f",
            epoch + 1,
            loss,
            accuracy,
            extra={"epoch": epoch + 1, "accuracy": accuracy, "loss": loss},
        )

    def _heartbeat(self) -> None:
        period = self.spec.lease_timeout_s / 3
        while not self.stop.wait(period):
            request = scheduler_pb2.HeartbeatRequest(
                worker_id=self.worker_id,
                clock=self.client.clock if self.client is not None else 0,
                samples_per_s=self.samples_per_s,
                lease_ids=self.working,
            )
            try:
                self.link.stub.Heartbeat(request, timeout=period)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    self.fatal = f"the scheduler dropped this worker: {e.details()}"
                    return
                log.warning("heartbeat failed (%s); retrying", e.code().name)

    def _straggle(self, since: float) -> float:
        """A straggler waits ``slowdown`` times what its work took since ``since`` (less
        what earlier waits overslept); the seconds it waited."""
        if not self.options.slowdown:
            return 0.0
        start = time.perf_counter()
        self.owed_s += self.options.slowdown * (start - since)
        if self.owed_s > 0:
            self.stop.wait(self.owed_s)
        waited = time.perf_counter() - start
        self.owed_s -= waited
        return waited

    def _no_progress(self) -> bool | None:
        return None if self.options.progress is None else not self.options.progress


def evaluate(
    client: Client, spec: JobSpec, manifest: Manifest, device: torch.device
) -> tuple[float, float]:
    """(mean loss, accuracy) of the servers' current weights on the held-out test file."""
    model = build_model(spec.model, spec.seed).to(device)
    client.pull_into(model, observe=True)
    x, y = load(Path(spec.data_dir), manifest.test)
    return score(model, x, y, device)


def score(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model on a data set, in batches of 1000."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), 1000):
            xb = torch.from_numpy(x[start : start + 1000]).to(device)
            yb = torch.from_numpy(y[start : start + 1000]).to(device)
            out = model(xb)
            total_loss += torch.nn.functional.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(1) == yb).sum())
    return total_loss / len(y), correct / len(y)
