"""Servers that stop and come back on their checkpoints lose no acknowledged push."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from ps_worker import Client, ClientConfig
from scheduler.launch import BIN, Daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PUSHES = 40
WORKERS = 3


def start_server(log: Path, checkpoints: Path, port: int = 0) -> Daemon:
    argv = [str(BIN / "ps-server"), "--port", str(port), "--checkpoint-dir", str(checkpoints)]
    return Daemon([*argv, "--checkpoint-every", "5"], log)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling a condition, with a deadline


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "streams"])
def test_sigterm_and_restart_on_the_checkpoint_loses_no_acknowledged_push(tmp_path, shm):
    """Three workers push integers (SGD, lr 1) while one server is stopped with SIGTERM and
    restarted on its checkpoint directory: the weights end at init minus the exact sum."""
    checkpoints = [tmp_path / "ckpt0", tmp_path / "ckpt1"]
    daemons = [start_server(tmp_path / f"s{i}.log", checkpoints[i]) for i in range(2)]
    addresses = [d.address for d in daemons]
    init = {"w": torch.arange(300, dtype=torch.float32), "b": torch.zeros(7)}
    config = ClientConfig(retries=40, max_backoff_s=0.5, same_host_shared_memory=shm)
    total = {k: torch.zeros_like(v) for k, v in init.items()}
    pushed = [0] * WORKERS
    lock = threading.Lock()
    errors: list[BaseException] = []
    try:
        with Client(addresses, job_id="ckpt", worker_id="init", config=config) as c:
            c.init(init, mode="async", optimizer="sgd", lr=1.0, part_bytes=512)
            assert {p.server for p in c.layout.parts} == {0, 1}

        def work(w: int) -> None:
            try:
                with Client(addresses, job_id="ckpt", worker_id=f"w{w}", config=config) as c:
                    for i in range(PUSHES):
                        c.pull()
                        value = float((w + i) % 5 + 1)
                        grads = {k: torch.full_like(v, value) for k, v in init.items()}
                        c.push(grads)
                        with lock:
                            for k in total:
                                total[k] += grads[k]
                            pushed[w] += 1
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(pushed) >= PUSHES, 60, "a third of the pushes")
        port = addresses[0].rsplit(":", 1)[1]
        assert daemons[0].stop() == 0  # SIGTERM: drains, writes the checkpoint, exits 0
        daemons[0] = start_server(tmp_path / "s0-again.log", checkpoints[0], int(port))
        assert daemons[0].address == addresses[0]
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert pushed == [PUSHES] * WORKERS
        with Client(addresses, job_id="ckpt", worker_id="reader", config=config) as c:
            final = c.pull(observe=True)
            statuses = c.status()
        for k, v in init.items():
            assert torch.equal(final[k], v - total[k]), k
        # every push applied exactly once on each server, across the restart
        assert [s.updates_applied for s in statuses] == [PUSHES * WORKERS] * 2
    finally:
        for d in daemons:
            d.stop()


def test_a_server_killed_right_after_an_acknowledged_init_comes_back_holding_the_job(tmp_path):
    """Before any update there was no checkpoint: a server SIGKILLed then came back empty and
    every worker failed on 'the model is not initialised'. An Init is answered only once the
    job's first checkpoint is written."""
    checkpoints = tmp_path / "ckpt"
    daemon = start_server(tmp_path / "s.log", checkpoints)
    init = {"w": torch.arange(10, dtype=torch.float32)}
    config = ClientConfig(retries=40, max_backoff_s=0.5)
    try:
        with Client([daemon.address], job_id="early", worker_id="init", config=config) as c:
            c.init(init, mode="async", optimizer="sgd", lr=1.0)
        daemon.proc.kill()
        daemon.proc.wait(10)
        port = int(daemon.address.rsplit(":", 1)[1])
        daemon = start_server(tmp_path / "s2.log", checkpoints, port)
        with Client([daemon.address], job_id="early", worker_id="w0", config=config) as c:
            status = c.status()[0]
            assert status.initialised and status.config.job_id == "early"
            c.push({"w": torch.ones(10)})
            assert torch.equal(c.pull()["w"], init["w"] - 1)
    finally:
        daemon.stop()
