"""Learning-rate schedules: the curve, the wire, the store's steps, the job spec's count."""

from __future__ import annotations

import itertools
import math

import pytest

from protos.job import Job, JobError
from protos.jobspec import JobSpec, SpecError
from protos.schedule import LrSchedule, ScheduleError
from ps_server import checkpoint
from ps_server.errors import AlreadyExists
from ps_server.store import ParameterStore
from ps_worker.data import Manifest, ShardFile
from tests.storekit import chunks_for, initial_values, make_job, new_store, push, weights

COSINE = LrSchedule("cosine", total_steps=4, final_ratio=0.1)


def test_cosine_falls_from_lr_to_its_final_ratio_and_stays_there():
    factors = [COSINE.factor(step) for step in range(7)]
    assert factors[0] == 1.0
    assert math.isclose(factors[2], 0.1 + 0.9 * 0.5)  # halfway: halfway down
    assert all(a > b for a, b in itertools.pairwise(factors[:5]))
    assert factors[4:] == [pytest.approx(0.1)] * 3
    assert LrSchedule().factor(10_000) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("constant", LrSchedule()),
        ("cosine:4", LrSchedule("cosine", 4, 0.1)),
        ("cosine", LrSchedule("cosine", 9, 0.1)),
    ],
)
def test_schedules_parse(text, expected):
    assert LrSchedule.parse(text, final_ratio=0.1, default_steps=9) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("linear", "not one of constant, cosine"),
        ("cosine:x", "integer STEPS"),
        ("cosine:0", "at least 1"),
        ("cosine", "at least 1"),  # no steps given and none to default to
        ("constant:5", "takes no steps"),
    ],
)
def test_bad_schedules_are_refused(text, message):
    with pytest.raises(ScheduleError, match=message):
        LrSchedule.parse(text)


def test_final_ratio_must_be_a_fraction():
    with pytest.raises(ScheduleError, match=r"final_ratio 1.5 is not in \[0, 1\]"):
        LrSchedule("cosine", 10, 1.5)


def test_a_jobs_schedule_travels_in_its_config_and_must_match():
    job = make_job(lr_schedule=COSINE)
    assert Job.from_proto(job.to_proto()) == job
    assert not make_job().to_proto().optimizer.HasField("schedule")  # constant: unset
    store = ParameterStore()
    store.initialise(job, chunks_for(job, initial_values()))
    other = make_job(lr_schedule=LrSchedule("cosine", 5, 0.1))
    with pytest.raises(AlreadyExists, match="differs in: lr_schedule"):
        store.initialise(other, chunks_for(other, initial_values()))
    bad = job.to_proto()
    bad.optimizer.schedule.total_steps = 0
    with pytest.raises(JobError, match="at least 1"):
        Job.from_proto(bad)


def test_async_pushes_step_down_the_schedule():
    store, job = new_store("async", lr=1.0, lr_schedule=COSINE)
    lrs = [push(store, job, "a", clock, 1.0).lr for clock in range(1, 7)]
    assert lrs == pytest.approx([COSINE.factor(step) for step in range(6)])
    shift = sum(lrs)  # SGD: every weight moved by lr * 1.0 per push
    for name, value in initial_values().items():
        assert weights(store)[name].double().sub(value.double() - shift).abs().max() < 1e-5


def test_staleness_aware_lr_scales_the_scheduled_lr():
    store, job = new_store("async", lr=1.0, lr_schedule=COSINE, staleness_aware_lr=True)
    push(store, job, "fast", 1, 1.0)
    push(store, job, "fast", 2, 1.0)
    stale = push(store, job, "slow", 1, 1.0, pulled=0)
    assert stale.staleness == 2 and stale.lr == pytest.approx(COSINE.factor(2) / 2)


def test_a_sync_step_uses_one_lr_for_every_contribution():
    store, job = new_store("sync", workers=["a", "b"], lr=1.0, lr_schedule=COSINE)
    first = [push(store, job, w, 1, 1.0).lr for w in ("a", "b")]
    second = [push(store, job, w, 2, 1.0).lr for w in ("a", "b")]
    assert first == [1.0, 1.0] and second == pytest.approx([COSINE.factor(1)] * 2)
    assert store.steps == 2


def test_a_restored_server_resumes_its_schedule(tmp_path):
    store, job = new_store("async", lr=1.0, lr_schedule=COSINE)
    for clock in (1, 2, 3):
        push(store, job, "a", clock, 1.0)
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    fresh = ParameterStore()
    checkpoint.restore(fresh, checkpoint.read(tmp_path))
    assert fresh.job == job
    assert push(fresh, job, "a", 4, 1.0).lr == pytest.approx(COSINE.factor(3))


def manifest(samples: list[int]) -> Manifest:
    shards = tuple(ShardFile(f"s{i}", n, "") for i, n in enumerate(samples))
    return Manifest("d", (4,), 2, shards, ShardFile("t", 1, ""))


def test_a_bare_cosine_spans_the_jobs_expected_updates():
    batches = manifest([250, 250, 100]).batches_per_epoch(100)
    assert batches == 3 + 3 + 1
    spec = JobSpec(data_dir="d", epochs=4, lr_schedule="cosine", lr_final_ratio=0.05)
    assert spec.job_settings(batches).lr_schedule == LrSchedule("cosine", 28, 0.05)
    sync = JobSpec(data_dir="d", mode="sync", epochs=4, expected_workers=4, lr_schedule="cosine")
    assert sync.job_settings(batches).lr_schedule.total_steps == 7  # every barrier takes 4 batches
    fixed = JobSpec(data_dir="d", lr_schedule="cosine:1000")
    assert fixed.job_settings(batches).lr_schedule.total_steps == 1000
    assert JobSpec(data_dir="d").job_settings(batches).lr_schedule == LrSchedule()


def test_a_bad_schedule_in_a_job_spec_is_refused():
    with pytest.raises(SpecError, match="not one of constant, cosine"):
        JobSpec.from_dict({"data_dir": "d", "lr_schedule": "step"})
    with pytest.raises(SpecError, match=r"^epochs must be at least 1, got 0$"):
        JobSpec.from_dict({"data_dir": "d", "lr_schedule": "cosine", "epochs": 0})
    with pytest.raises(SpecError, match="final_ratio"):
        JobSpec.from_dict({"data_dir": "d", "lr_schedule": "cosine", "lr_final_ratio": 2})
