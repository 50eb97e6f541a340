"""Prometheus metrics of a running server move with the traffic."""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

from ps_server.metrics import ServerMetrics
from ps_worker import Client
from scheduler.launch import servers
from tests.storekit import new_store, push

pytestmark = pytest.mark.timeout(120)


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) ([-+\deE.]+|NaN)$", text, flags=re.M)
    }


def test_gauges_show_the_published_view_not_the_live_store():
    metrics = ServerMetrics()
    value = metrics.registry.get_sample_value
    assert (value("ps_version"), value("ps_active_workers")) == (0, 0)  # before any job
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    push(store, job, "b", 1, 1.0)
    metrics.publish(store.view())
    push(store, job, "a", 2, 1.0)
    push(store, job, "b", 2, 1.0)
    push(store, job, "b", 3, 1.0, pulled=0)  # stale: dropped
    assert value("ps_version") == 1 and value("ps_stale_dropped") == 0  # as published
    metrics.publish(store.view())
    assert value("ps_version") == value("ps_updates_applied") == 2
    assert value("ps_stale_dropped") == 1 and value("ps_active_workers") == 2


@pytest.mark.integration
def test_a_servers_counters_move_during_a_job(tmp_path):
    checkpoints = tmp_path / "ckpt"
    extra = ("--metrics-port", "0", "--checkpoint-dir", str(checkpoints))
    with servers(1, tmp_path, *extra) as (daemon,):
        line = daemon.lines.get(timeout=30)  # the line after "listening on"
        assert line.startswith("ps-server metrics on "), line
        url = f"http://{line.rsplit(' ', 1)[1]}/metrics"
        model = {"w": torch.zeros(1000), "b": torch.zeros(10)}
        with Client([daemon.address], job_id="m", worker_id="w") as c:
            c.init(model, mode="async", optimizer="sgd", lr=0.1)
            c.pull()
            before = scrape(url)
            for _ in range(5):
                c.push({k: torch.ones_like(v) for k, v in model.items()})
                c.pull()
            after = scrape(url)
    assert after["ps_pushes_total"] - before["ps_pushes_total"] == 5
    assert after["ps_pulls_total"] - before["ps_pulls_total"] == 5
    assert after["ps_bytes_in_total"] - before["ps_bytes_in_total"] == 5 * 1010 * 4
    assert after["ps_bytes_out_total"] - before["ps_bytes_out_total"] == 5 * 1010 * 4
    assert after["ps_apply_seconds_count"] == after["ps_pushes_total"]
    assert after["ps_staleness_count"] == 5 and after["ps_version"] == 5
    assert after["ps_active_workers"] == 1 and after["ps_updates_applied"] == 5
    assert after["ps_checkpoint_age_seconds"] >= 0
