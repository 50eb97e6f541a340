"""Prometheus metrics of the scheduler (``ps-scheduler --metrics-port``).

Counters move as workers call; the queue's and workers' gauges are set from
the durable state after each completion and evaluation and by the
scheduler's watch loop (every second at most), on the event loop, so the
HTTP thread that serves /metrics never touches the database.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from scheduler.state import SchedulerState

WORKER_STATES = ("active", "idle", "dead", "left")


class SchedulerMetrics:
    """The metrics of one scheduler, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.registrations = Counter("ps_scheduler_registrations", "Workers registered", registry=r)
        self.leases = Counter("ps_scheduler_leases", "Shard leases handed out", registry=r)
        self.completions = Counter(
            "ps_scheduler_completions", "Shard completions recorded", registry=r
        )
        self.evaluations = Counter(
            "ps_scheduler_evaluations", "Epoch evaluations recorded", registry=r
        )
        self.workers_dead = Counter(
            "ps_scheduler_workers_dead", "Workers declared dead for missed heartbeats", registry=r
        )
        self.queue_depth = Gauge(
            "ps_scheduler_queue_depth", "Shards waiting to be leased", registry=r
        )
        self.leased = Gauge("ps_scheduler_leased", "Shards leased now", registry=r)
        self.done = Gauge("ps_scheduler_shards_done", "Shards done, all epochs", registry=r)
        self.epoch = Gauge("ps_scheduler_epoch", "The epoch being trained (from 0)", registry=r)
        self.expired = Gauge(
            "ps_scheduler_expired_leases",
            "Leases taken back because their worker died or their deadline passed "
            "(kept across restarts)",
            registry=r,
        )
        self.workers = Gauge("ps_scheduler_workers", "Workers by state", ["state"], registry=r)
        self.accuracy = Gauge(
            "ps_scheduler_accuracy", "Test accuracy after the last evaluated epoch", registry=r
        )
        self.finished = Gauge("ps_scheduler_finished", "1 once the job is finished", registry=r)

    def refresh(self, state: SchedulerState, now: float) -> None:
        """Set the gauges from the state (called on the thread that owns it)."""
        p = state.progress(now)
        self.queue_depth.set(p.pending)
        self.leased.set(p.leased)
        self.done.set(p.done)
        self.epoch.set(p.epoch)
        self.expired.set(state.expired_leases())
        for s in WORKER_STATES:
            self.workers.labels(state=s).set(sum(w["state"] == s for w in p.workers))
        if p.evaluations:
            self.accuracy.set(p.evaluations[-1]["accuracy"])
        self.finished.set(int(p.finished))
