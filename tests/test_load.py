"""32 clients pushing at once against 2 servers: no lost update, no deadlock, flat memory."""

from __future__ import annotations

import pytest

from benchmarks.load import run_load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_32_clients_200_pushes_each_lose_nothing_and_memory_stays_flat(tmp_path):
    result = run_load(clients=32, pushes=200, num_servers=2, numel=1000, log_dir=tmp_path,
                      timeout_s=240)  # fmt: skip
    assert result.exact  # weights = init - the exact sum of all 6,400 gradients
    assert result.updates_applied == [32 * 200] * 2
    for half, end in zip(result.rss_half_mib, result.rss_end_mib, strict=True):
        # the second 3,200 pushes may not grow a server by more than a few MiB
        assert end - half < 8.0, (result.rss_half_mib, result.rss_end_mib)
