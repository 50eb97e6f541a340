"""Prometheus metrics of a worker daemon (``ps-worker --metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS_BUCKETS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class WorkerMetrics:
    """The metrics of one worker, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.steps = Counter("ps_worker_steps", "Batches trained (one push each)", registry=r)
        self.samples = Counter("ps_worker_samples", "Samples trained on", registry=r)
        self.shards = Counter("ps_worker_shards", "Shards finished", registry=r)
        self.compute_seconds = Histogram(
            "ps_worker_compute_seconds",
            "Forward and backward time of one batch",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.push_pull_seconds = Histogram(
            "ps_worker_push_pull_seconds",
            "Time from a push to the next weights, the mode's waiting included",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.samples_per_s = Gauge(
            "ps_worker_samples_per_second", "Throughput over the last shard", registry=r
        )
        self.clock = Gauge("ps_worker_clock", "Pushes this worker has made", registry=r)
