"""A client's life in a job against real servers: it says what it waits for, its weights come
out as a state dict, it leaves when it closes (or its process ends), ranks with uneven step
counts join, and one worker id has one live client."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from protos import status
from ps_worker import (
    Client,
    ClientConfig,
    DistributedOptimizer,
    ServerUnavailableError,
    WaitTimeoutError,
    WorkerIdInUseError,
)
from scheduler.launch import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    )


def train(model: torch.nn.Module, step) -> None:
    """One batch: forward, backward, then ``step()``."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    step()


@pytest.fixture
def addresses(shared_servers):
    return shared_servers  # tests/conftest.py: ended after each test


class Seen(logging.Handler):
    """Sets ``event`` when the ps_worker logger says something holding ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_pull_held_by_the_sync_barrier_says_whom_it_waits_for(addresses, caplog):
    """w0 pushed and pulls; w1, a member, has not pushed: the pull logs (after
    report_wait_after_s, and again) that the step waits for w1's gradient."""
    config = ClientConfig(report_wait_after_s=0.2, report_wait_every_s=0.2)
    model = small_model()
    seen = Seen("waiting for w1")
    logger = logging.getLogger("ps_worker")
    logger.addHandler(seen)
    caplog.set_level(logging.WARNING, logger="ps_worker")
    try:
        with Client(addresses, "held", "w0", config) as w0, Client(addresses, "held", "w1") as w1:
            w0.init(model, mode="sync", workers=["w0", "w1"])
            w0.push_from(model)
            pulled = threading.Thread(target=w0.pull_into, args=(model,))
            pulled.start()
            assert seen.event.wait(30), caplog.text
            w1.push_from(model)  # the step completes: the pull returns
            pulled.join(30)
            assert not pulled.is_alive()
    finally:
        logger.removeHandler(seen)
    (report, *_) = [r for r in caplog.records if "waiting for w1" in r.getMessage()]
    assert report.levelno == logging.WARNING
    assert report.getMessage().startswith("w0 pull: waiting for ")
    assert f"{addresses[0]}: sync step 0: have 1 of 2 required gradients" in report.getMessage()


def test_the_servers_weights_come_out_as_a_state_dict_safetensors_can_save(addresses, tmp_path):
    from safetensors.torch import load_file, save_file

    model = small_model()
    with Client(addresses, "out", "w0") as client:
        client.init(model, mode="async", optimizer="sgd", lr=0.1)
        for _ in range(3):
            train(model, lambda: client.push_pull_into(model))
        weights = client.state_dict()  # the parameters: what the servers hold
        assert set(weights) == {n for n, _ in model.named_parameters()}
        save_file(client.state_dict(model), tmp_path / "model.safetensors")
        fresh = small_model()
        fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
        initial = small_model().state_dict()
        assert any(not torch.equal(v, initial[n]) for n, v in weights.items())  # it trained
        for name, value in weights.items():
            torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
        batch_norm = fresh[1]
        torch.testing.assert_close(batch_norm.running_mean, model[1].running_mean)  # buffers
        assert batch_norm.num_batches_tracked.item() == 3


def test_ranks_with_uneven_step_counts_join_with_the_final_weights(addresses):
    """Sync, 2 ranks: rank 0 does 3 steps, rank 1 does 7. Rank 0's join lets rank 1 go on
    alone, then waits for it; both end with the servers' final weights."""
    config = ClientConfig(pull_timeout_s=30, report_wait_after_s=1)
    models = [small_model(), small_model()]
    errors: list[BaseException] = []
    states: dict[int, dict[str, torch.Tensor]] = {}

    def rank(r: int, steps: int) -> None:
        try:
            opt = DistributedOptimizer(
                models[r], addresses, "uneven", r, 2, config=config, mode="sync"
            )
            with opt:
                for _ in range(steps):
                    train(models[r], opt.step)
                opt.join(timeout_s=60)
                states[r] = opt.model_state_dict()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r, n)) for r, n in ((0, 3), (1, 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors and not any(t.is_alive() for t in threads), errors
    with Client(addresses, "uneven") as reader:
        final = reader.state_dict()
        assert [s.version for s in reader.status()] == [7, 7]
    for model, state in zip(models, (states[0], states[1]), strict=True):
        assert state.keys() == model.state_dict().keys()  # buffers too: loadable strictly
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), final[name], rtol=0, atol=0)
            torch.testing.assert_close(state[name], final[name], rtol=0, atol=0)


WORKER = """
import sys
import torch
from ps_worker import ClientConfig, DistributedOptimizer
steps, close = int(sys.argv[1]), sys.argv[2] == "close"
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = DistributedOptimizer(model, job_id="leave", mode="sync", lr=0.1,
                                 config=ClientConfig(pull_timeout_s=10))
for _ in range(steps):
    optimizer.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
if close:
    optimizer.close()
print("done", optimizer.client.clock)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ending", ["close", "exit"])
def test_a_rank_that_ends_releases_the_sync_barrier_at_once(addresses, ending):
    """Real processes started torchrun-style (PS_SERVERS, RANK, WORLD_SIZE): rank 0 does 3
    steps and closes its optimizer (or just exits), rank 1 does 6 and finishes instead of
    waiting on the barrier for rank 0 until its pull times out."""
    env = {**os.environ, "PS_SERVERS": ",".join(addresses), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(steps), ending],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r, steps in ((0, 3), (1, 6))
    ]
    outputs = [p.communicate(timeout=150) for p in ranks]
    for p, (_, err) in zip(ranks, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert [out.strip() for out, _ in outputs] == ["done 3", "done 6"]


@pytest.mark.parametrize("first", ["push_pull_into", "push_from"])
def test_a_worker_whose_first_call_is_a_push_holds_no_one_back_in_ssp(addresses, first):
    """w0 does 10 ssp steps (staleness 2); w1 joins by a push: it lands at w0's clock and
    adopts the servers' clock, so w0's next pull does not wait for it."""
    model = small_model()
    quick = ClientConfig(pull_timeout_s=5)
    with Client(addresses, "late", "w0", quick) as w0, Client(addresses, "late", "w1") as w1:
        w0.init(model, mode="ssp", staleness=2)
        for _ in range(10):
            train(model, lambda: w0.push_pull_into(model))
        w1.init(model, mode="ssp", staleness=2)
        train(model, lambda: getattr(w1, first)(model))
        assert w1.clock == 11
        assert [{w.worker_id: w.clock for w in s.workers} for s in w1.status()] == [
            {"w0": 10, "w1": 11}
        ] * 2
        train(model, lambda: w0.push_pull_into(model))  # not held by w1
        summary = w1.push_from(model)
        assert summary.applied and not summary.duplicate and summary.clock == 12


def test_one_worker_id_has_one_live_client(addresses, caplog):
    """A second live client with w0's id is refused with the server's reason, and
    changes nothing; once the first has closed (left), the id is free again. A refused
    client's close has nothing to leave: it does not end the holder, nor warn."""
    model = small_model()
    first = Client(addresses, "ids", "w0")
    at_once = ClientConfig(worker_id_wait_s=0)  # no wait for a crashed predecessor to go quiet
    try:
        first.init(model, mode="async")
        first.push_from(model)
        with Client(addresses, "ids", "w0", at_once) as second:
            with pytest.raises(WorkerIdInUseError, match="w0") as info:
                second.push_from(model)
            assert info.value.reason == status.WORKER_ID_IN_USE
            with pytest.raises(WorkerIdInUseError):
                second.pull_into(model)
            assert [s.updates_applied for s in second.status()] == [1, 1]
            first.close()
            second.pull_into(model)  # learns w0's clock
            assert second.push_from(model).applied
            with (
                Client(addresses, "ids", "w0", at_once) as third,
                pytest.raises(WorkerIdInUseError),
            ):
                third.push_from(model)
            assert second.push_from(model).applied  # third's close did not end second
    finally:
        first.close()
    assert "did not leave" not in caplog.text


def test_close_never_raises_when_its_server_is_gone(tmp_path, caplog):
    """A member's close tries to leave, within quick_timeout_s: with its server gone that
    fails, and close says so on the log instead of raising."""
    model = small_model()
    with servers(1, tmp_path) as (lone,):
        member = Client([lone.address], "gone", "w0", ClientConfig(retries=0))
        member.init(model, mode="async")
        member.push_from(model)
    member.close()
    assert "w0 did not leave the job cleanly" in caplog.text


def test_waiting_for_servers_names_those_that_do_not_answer(addresses, caplog):
    """One server up, one port where nothing listens: the wait logs the silent one while
    it waits, and the error names it (and not the live one)."""
    silent = "127.0.0.1:1"
    config = ClientConfig(report_wait_after_s=0.05, report_wait_every_s=0.05)
    seen = Seen(f"servers not accepting connections: {silent}")
    logger = logging.getLogger("ps_worker")
    logger.addHandler(seen)
    try:
        error = f"server\\(s\\) {silent} did not accept a connection within 5s"
        with (
            Client([addresses[0], silent], "j", "w0", config) as client,
            pytest.raises(ServerUnavailableError, match=error),
        ):
            client.wait_for_servers(timeout_s=5)  # reports every 0.05 s meanwhile
    finally:
        logger.removeHandler(seen)
    assert seen.event.is_set()
    assert addresses[0] not in str(caplog.text)


def test_a_client_that_took_no_part_leaves_nothing(caplog):
    """Status-only and observing clients never joined: close() sends no Leave (here it
    would fail: nothing listens), so it says nothing."""
    with Client(["127.0.0.1:1"], "j", "w0") as client:
        client.leave()
    assert "did not leave" not in caplog.text


def test_a_join_that_runs_out_of_time_names_the_workers_still_active(addresses):
    model = small_model()
    with Client(addresses, "late", "w0", ClientConfig(join_poll_s=0.05)) as w0:
        w0.init(model, mode="sync", workers=["w0", "w1"])
        w0.push_from(model)
        error = f"join: after 0.5s workers are still active: w1 \\(on {addresses[0]}, "
        with pytest.raises(WaitTimeoutError, match=error):
            w0.join(model, timeout_s=0.5)
        assert [w.active for w in w0.status()[0].workers] == [False, True]  # w0 has left


def test_an_ended_job_frees_its_servers_for_another(addresses, caplog):
    model = small_model()
    with Client(addresses, "first", "w0") as client:
        client.init(model, mode="async")
        client.push_from(model)
        assert client.end_job() == [True, True]
        assert client.end_job() == [False, False]  # nothing held any more
        assert not any(s.initialised for s in client.status())
    assert "did not leave" not in caplog.text  # the ended job had nobody left to leave
    other = torch.nn.Linear(3, 2)
    with Client(addresses, "second", "w0") as client:
        assert client.init(other, mode="sync", workers=["w0"])  # created: no conflict
        other(torch.randn(4, 3)).sum().backward()
        assert client.push_pull_into(other).versions == (1, 1)
