"""What a person reads while a job runs: one line per back-off period while a server is
down, and one line per epoch, each once, counted from 1."""

from __future__ import annotations

import asyncio
import logging
import socket

from protos.security import ClientSecurity
from scheduler.report import EpochLines, bar_postfix
from scheduler.service import BACKOFF_S, ServerMembership


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_gives_one_short_line_per_back_off_period(caplog):
    """Trap: 1,244 lines of multi-line AioRpcError warnings in 2 minutes."""
    down = f"127.0.0.1:{free_port()}"
    now = [0.0]

    async def updates() -> list[bool]:
        membership = ServerMembership((down,), "job", ClientSecurity(), clock=lambda: now[0])
        results = []
        for step in range(40):  # every Lease and heartbeat tick asks for an update
            results.append(await membership.sync(frozenset({"w0"})))
            if step in (19, 29):  # two back-off periods pass
                now[0] += BACKOFF_S[1]
        await membership.close()
        return results

    with caplog.at_level(logging.WARNING, logger="scheduler"):
        assert not any(asyncio.run(updates()))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said  # the first failure, then one per period that passed
    for line in said:
        assert "\n" not in line and len(line) < 300, line
        assert line.startswith(f"membership update failed on {down} (UNAVAILABLE: ")
    assert said[0].endswith(f"trying again in {BACKOFF_S[0]:.1f}s")
    assert said[1].endswith(f"trying again in {2 * BACKOFF_S[0]:.1f}s")


def progress(done: int, evaluated: dict[int, float], epoch: int) -> dict:
    return {
        "epoch": epoch,
        "epochs": 3,
        "shards_per_epoch": 4,
        "done": done,
        "evaluations": [
            {"epoch": e, "accuracy": a, "loss": 1.0 - a} for e, a in sorted(evaluated.items())
        ],
    }


def test_each_epoch_is_printed_once_with_its_own_accuracy():
    """Trap: progress lines showed the previous epoch's accuracy beside the current epoch
    number, and printed the last epoch twice."""
    lines = EpochLines()
    seen = []
    for p in [
        progress(2, {}, 0),
        progress(5, {0: 0.5}, 1),
        progress(6, {0: 0.5}, 1),
        progress(10, {0: 0.5, 2: 0.9}, 2),  # epoch 3 evaluated before epoch 2: it waits
        progress(12, {0: 0.5, 1: 0.7, 2: 0.9}, 2),
        progress(12, {0: 0.5, 1: 0.7, 2: 0.9}, 2),  # the final poll, again
    ]:
        seen += lines.new(p)
    assert seen == [
        "epoch 1/3: test accuracy 0.5000, loss 0.5000 (5/12 shards done)",
        "epoch 2/3: test accuracy 0.7000, loss 0.3000 (12/12 shards done)",
        "epoch 3/3: test accuracy 0.9000, loss 0.1000 (12/12 shards done)",
    ]
    assert bar_postfix(progress(6, {0: 0.5}, 1)) == "epoch 2/3; epoch 1 test accuracy 0.500"
    assert bar_postfix(progress(2, {}, 0)) == "epoch 1/3"
