"""Prometheus metrics of a parameter server (``ps-server --metrics-port``).

Counters move as requests are served. The store's own state (version,
active workers, stale drops) comes from an immutable :class:`StoreView` the
service publishes on its event loop after every change: the scrape thread
reads that snapshot, never the store's live state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ps_server.store import StoreView

LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
WAIT_BUCKETS = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ServerMetrics:
    """The metrics of one server, in their own registry."""

    def __init__(self, checkpoint_age: Callable[[], float] | None = None) -> None:
        self._view = StoreView()
        self.registry = registry = CollectorRegistry()
        self.pushes = Counter("ps_pushes", "Pushes received", registry=registry)
        self.pulls = Counter("ps_pulls", "Pulls served", registry=registry)
        self.bytes_in = Counter("ps_bytes_in", "Tensor bytes received", registry=registry)
        self.bytes_out = Counter("ps_bytes_out", "Tensor bytes sent", registry=registry)
        self.apply_seconds = Histogram(
            "ps_apply_seconds",
            "Time to check and apply (or accumulate) one push",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.wait_seconds = Histogram(
            "ps_wait_seconds",
            "Time pulls waited for the sync barrier or the ssp bound",
            ["mode"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.staleness = Histogram(
            "ps_staleness",
            "Versions applied between a worker's pull and its push",
            buckets=STALENESS_BUCKETS,
            registry=registry,
        )
        Gauge("ps_version", "Updates applied so far", registry=registry).set_function(
            lambda: self._view.version
        )
        Gauge("ps_active_workers", "Workers the server counts", registry=registry).set_function(
            lambda: len(self._view.active_workers)
        )
        Gauge(
            "ps_stale_dropped", "Stale gradients dropped (sync) so far", registry=registry
        ).set_function(lambda: self._view.counters.stale_dropped)
        Gauge("ps_updates_applied", "Optimizer updates applied", registry=registry).set_function(
            lambda: self._view.counters.updates_applied
        )
        for name, what in (
            ("contributions", "Gradients in the pending update (a barrier step's or a buffer's)"),
            ("compensated", "Gradients corrected by delay compensation so far"),
            ("uncompensated", "Gradients delay compensation applied as they came so far"),
            ("kept_bytes", "Bytes of pulled weights kept for delay compensation"),
        ):
            Gauge(f"ps_{name}", what, registry=registry).set_function(
                lambda name=name: self._view.counts()[name]
            )
        if checkpoint_age is not None:
            Gauge(
                "ps_checkpoint_age_seconds",
                "Seconds since the last checkpoint was written",
                registry=registry,
            ).set_function(checkpoint_age)

    def publish(self, view: StoreView) -> None:
        """Show this state from now on (called on the event loop; one atomic reference swap)."""
        self._view = view


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
