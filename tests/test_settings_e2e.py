"""Every job setting, through every way in, reaches every server exactly as asked.

Each case asks for a job with non-default values; each way in (``ps-cluster up`` flags,
``ps-cluster up --config job.yaml``, ``ps-scheduler`` flags, the compose file's ``PS_*``
variables as its scheduler service reads them, ``Client.init`` and ``DistributedOptimizer``
keywords) carries it to real servers, and the test reads the configuration back from each
server's ``Status``. The reading below is written against the wire message, independently
of the code that builds it, so a setting that is parsed but dropped on the way fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from protos import ps_pb2
from protos.job import Mode, Settings
from protos.jobspec import ENV_PREFIX, flag_names, variable_of
from protos.schedule import LrSchedule
from ps_worker import Client, ClientConfig, DistributedOptimizer
from ps_worker.data import prepare
from scheduler.launch import BIN, Daemon
from scheduler.lifecycle import JOB_FILE
from tests.test_cluster import cluster_up
from tests.test_compose import compose, localise, service_env

pytestmark = pytest.mark.integration

_DTYPES = {ps_pb2.FLOAT16: "fp16", ps_pb2.BFLOAT16: "bf16"}


def _compression(c: ps_pb2.JobConfig) -> str:
    items = []
    if c.compression.gradient_dtype:
        assert c.compression.weight_dtype == c.compression.gradient_dtype
        items.append(_DTYPES[c.compression.gradient_dtype])
    if c.compression.topk_ratio:
        items.append(f"topk:{c.compression.topk_ratio:g}")
    return ",".join(items) or "none"


def _option(name: str) -> Callable[[ps_pb2.JobConfig], Any]:
    return lambda c: getattr(getattr(c.optimizer, c.optimizer.WhichOneof("kind")), name)


# How each setting reads off a server's JobConfig, in the form the cases write it.
READ: dict[str, Callable[[ps_pb2.JobConfig], Any]] = {
    "mode": lambda c: Mode.from_proto(c.mode).value,
    "staleness": lambda c: c.staleness,
    "backup_workers": lambda c: c.backup_workers,
    "staleness_aware_lr": lambda c: c.staleness_aware_lr,
    "buffer": lambda c: c.buffer,
    "delay_compensation": lambda c: c.delay_compensation,
    "local_steps": lambda c: c.local.steps if c.HasField("local") else Settings().local_steps,
    "outer_lr": lambda c: c.local.outer_lr if c.HasField("local") else Settings().outer_lr,
    "outer_momentum": lambda c: c.local.outer_momentum if c.HasField("local") else 0.0,
    "lr_warmup": lambda c: c.optimizer.schedule.warmup_steps,
    "optimizer": lambda c: c.optimizer.WhichOneof("kind"),
    "lr": lambda c: c.optimizer.lr,
    "lr_schedule": lambda c: LrSchedule.from_proto(c.optimizer).spec(),
    "lr_final_ratio": lambda c: c.optimizer.schedule.final_ratio,
    "compression": _compression,
    "part_bytes": lambda c: c.part_bytes,
    **{
        name: _option(name)
        for name in (
            "momentum",
            "dampening",
            "nesterov",
            "weight_decay",
            "beta1",
            "beta2",
            "eps",
            "lr_decay",
            "initial_accumulator_value",
        )
    },
}

CASES = {
    "sync-sgd": {
        "mode": "sync",
        "staleness": 3,
        "backup_workers": 1,
        "optimizer": "sgd",
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "lr": 0.05,
        "lr_schedule": "cosine:500",
        "lr_final_ratio": 0.1,
        "compression": "bf16",
        "part_bytes": 4096,
    },
    "async-adam": {
        "mode": "async",
        "staleness_aware_lr": True,
        "optimizer": "adam",
        "beta1": 0.0,
        "beta2": 0.99,
        "eps": 1e-6,
        "weight_decay": 1e-3,
        "lr": 0.003,
        "compression": "topk:0.05",
        "part_bytes": 100_000,
    },
    "ssp-adagrad": {
        "mode": "ssp",
        "staleness": 4,
        "optimizer": "adagrad",
        "lr_decay": 0.01,
        "eps": 1e-9,
        "initial_accumulator_value": 0.1,
        "lr": 0.02,
        "lr_schedule": "cosine:77",
        "lr_warmup": 20,
        "compression": "fp16",
        "buffer": 3,
        "delay_compensation": 0.05,
    },
    "local-sgd-dampened": {  # the workers run SGD, the servers the outer Nesterov step
        "mode": "local-async",
        "optimizer": "sgd",
        "momentum": 0.5,
        "dampening": 0.2,
        "local_steps": 4,
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        "staleness_aware_lr": True,
    },
}
WORKERS = 2  # the job's expected workers; one process registers, enough to init
MODEL = "digits-mlp"


def test_the_cases_cover_every_setting_with_a_value_other_than_its_default():
    assert set(READ) == set(Settings.names())
    default = Settings().to_doc()
    asked = {k for case in CASES.values() for k, v in case.items() if v != default.get(k)}
    missing = set(Settings.names()) - asked - {"lr_schedule", "lr_final_ratio"}
    assert not missing, f"no case asks for a non-default {missing}"
    assert {"lr_schedule", "lr_final_ratio"} <= asked


def expected(case: dict[str, Any]) -> dict[str, Any]:
    """What every server must report: the case over the defaults of its optimizer."""
    doc = Settings.build(optimizer=case["optimizer"]).to_doc()
    doc.update(case)
    doc["compression"] = case.get("compression", "none")
    return {k: v for k, v in doc.items() if k in READ}


def check_servers(addresses: list[str], case: dict[str, Any]) -> None:
    want = expected(case)
    with Client(addresses, config=ClientConfig(timeout_s=10)) as client:
        statuses = client.status()
    assert len(statuses) == len(addresses)
    for address, status in zip(addresses, statuses, strict=True):
        assert status.initialised, address
        got = {name: READ[name](status.config) for name in want}
        wrong = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k])}
        assert not wrong, f"{address}: (reported, asked) {wrong}"


def as_flags(case: dict[str, Any]) -> list[str]:
    out = []
    for name, value in case.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, shards=2, samples=400)
    return out


def wait_initialised(addresses: list[str], daemons: list[Daemon], timeout_s: float = 90) -> None:
    """Poll the servers until a worker has initialised the job on all of them."""
    deadline = time.monotonic() + timeout_s
    with Client(addresses, config=ClientConfig(timeout_s=5)) as client:
        while time.monotonic() < deadline:
            if all(s.initialised for s in client.status()):
                return
            for d in daemons:
                assert d.proc.poll() is None, f"{d.name} exited; see {d.log.name}"
            time.sleep(0.1)  # polling the servers' state, with a deadline
    raise AssertionError(f"no worker initialised the servers within {timeout_s}s")


def run_daemons(
    tmp_path: Path, addresses: list[str], scheduler_argv: list[str], env: dict[str, str], case
) -> None:
    """A scheduler started with ``scheduler_argv`` and ``env`` over the shared servers, and
    one worker; check the servers once the worker has initialised them."""
    argv = [a.replace("{SERVERS}", ",".join(addresses)) for a in scheduler_argv]
    scheduler = Daemon(argv, tmp_path / "scheduler.log", env=env)
    worker = None
    try:
        worker = Daemon(
            [str(BIN / "ps-worker"), "--scheduler", scheduler.address, "--no-progress"],
            tmp_path / "worker.log",
        )
        wait_initialised(addresses, [scheduler, worker])
        check_servers(addresses, case)
    finally:
        for d in (worker, scheduler):
            if d is not None:
                d.stop()


def via_cluster(tmp_path: Path, digits: Path, extra: list[str]) -> tuple[dict, dict]:
    """``ps-cluster up`` (2 servers, 1 worker, 1 epoch of digits): its summary and job file."""
    summary = cluster_up(
        tmp_path,
        *("--data-dir", str(digits), "--model", MODEL, "--epochs", "1", "--batch-size", "50"),
        *("--workers", "1", "--timeout-s", "120", "--no-recipe", *extra),
    )
    return summary, json.loads((tmp_path / "work" / JOB_FILE).read_text())


def check_reported(docs: list[dict[str, Any]], case: dict[str, Any]) -> None:
    """Settings docs as ps-cluster's summary reports them, read back from every server."""
    want = expected(case)
    for doc in docs:
        got = {k: doc[k] for k in want}
        got["compression"] = str(Settings.build(compression=doc["compression"]).compression)
        want_c = str(Settings.build(compression=want["compression"]).compression)
        assert {**got, "compression": None} == pytest.approx({**want, "compression": None})
        assert got["compression"] == want_c


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_ps_cluster_up_flags(tmp_path, digits, case):
    summary, job_file = via_cluster(tmp_path, digits, as_flags(CASES[case]))
    assert len(summary["settings_by_server"]) == 2
    check_reported(summary["settings_by_server"], CASES[case])
    for name, value in CASES[case].items():  # the job file says what was asked, too
        assert job_file[name] == pytest.approx(value) or name == "compression", name


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_ps_cluster_up_config_file(tmp_path, digits, case):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**CASES[case], "recipe": False}))  # test_recipes.py: on
    summary, _ = via_cluster(tmp_path, digits, ["--config", str(job)])
    check_reported(summary["settings_by_server"], CASES[case])


def scheduler_argv(tmp_path: Path, digits: Path) -> list[str]:
    return [
        str(BIN / "ps-scheduler"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state",
        str(tmp_path / "job.db"),
        "--data-dir",
        str(digits),
        "--servers",
        "{SERVERS}",
        "--model",
        MODEL,
        "--expected-workers",
        "1",
        "--no-recipe",  # the cases over the plain defaults (tests/test_recipes.py: recipes on)
    ]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", list(CASES))
def test_ps_scheduler_flags(tmp_path, digits, two_servers, case):
    argv = scheduler_argv(tmp_path, digits) + as_flags(CASES[case])
    run_daemons(tmp_path, two_servers, argv, {}, CASES[case])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", list(CASES))
def test_compose_variables(tmp_path, digits, two_servers, case):
    service = compose()["services"]["scheduler"]
    forwarded = set(service["environment"])
    needed = {variable_of(n) for n in flag_names(skip=("data_dir", "servers"))}
    assert needed <= forwarded, f"the compose scheduler drops {needed - forwarded}"
    # Every setting explicitly: the compose file's own defaults (ssp, staleness 1, ...) yield.
    variables = {variable_of(k): _env_value(v) for k, v in expected(CASES[case]).items()}
    variables |= {"PS_MODEL": MODEL, "PS_EXPECTED_WORKERS": "1", "PS_RECIPE": "false"}
    host = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env = {**host, **variables}
    argv = localise(service["command"], env, digits, {"server0": "{SERVERS}", "server1": ""})
    argv = [a.replace("{SERVERS},:7002", "{SERVERS}").replace("/scheduler.db", "") for a in argv]
    argv[argv.index("--state") + 1] = str(tmp_path / "job.db")
    run_daemons(tmp_path, two_servers, argv, service_env(service, env), CASES[case])


def _env_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def two_servers(shared_servers):
    return shared_servers  # tests/conftest.py: ended after each test


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(CASES))
def test_client_init(two_servers, case):
    with Client(two_servers, job_id="e2e") as client:
        assert client.init(_model(), **CASES[case])
    check_servers(two_servers, CASES[case])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_optimizer(two_servers, case):
    with DistributedOptimizer(_model(), two_servers, "e2e", rank=0, world=1, **CASES[case]):
        pass
    check_servers(two_servers, CASES[case])


def test_a_setting_for_another_optimizer_is_refused_before_anything_starts(tmp_path, digits):
    result = subprocess.run(
        [
            str(BIN / "ps-cluster"),
            "up",
            "--data-dir",
            str(digits),
            "--optimizer",
            "adam",
            "--momentum",
            "0.9",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "momentum: not an option of adam" in result.stderr
    assert not list(tmp_path.glob("*.log"))  # nothing was started


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--lr", "nan"], "learning rate lr must be a positive number, got nan"),
        (["--staleness", "1.5"], "staleness: expected a whole number, got '1.5'"),
        (["--part-bytes", "0"], "part_bytes must be a whole number >= 1"),
        (["--beta1", "1"], "beta1 is 1"),
    ],
)
def test_a_bad_setting_leaves_no_prepared_data_behind(tmp_path, flags, error):
    """Without --data-dir, ps-cluster prepares the data into the work dir: it did so before
    it read the settings, so a bad one left W/data behind."""
    work = tmp_path / "w"
    argv = [str(BIN / "ps-cluster"), "up", "--work-dir", str(work), "--dataset", "digits"]
    result = subprocess.run(
        [*argv, "--samples", "400", "--shards", "2", *flags],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert error in result.stderr
    assert not work.exists(), list(work.rglob("*"))


@pytest.mark.timeout(180)
def test_ps_cluster_up_is_not_overridden_by_ps_variables_in_its_environment(
    tmp_path, digits, monkeypatch
):
    """ps-cluster starts ps-scheduler on its job file, and ps-scheduler reads PS_<NAME> as
    flags over its --config: a PS_LR left in the shell (from the compose setup) changed
    the job, and a PS_OPTIMIZER made it fail."""
    for name, value in {"PS_LR": "0.5", "PS_STALENESS": "7", "PS_OPTIMIZER": "sgd"}.items():
        monkeypatch.setenv(name, value)
    case = {"lr": 0.02}
    summary, job_file = via_cluster(tmp_path, digits, as_flags(case))
    for doc in summary["settings_by_server"]:
        assert (doc["lr"], doc["staleness"], doc["optimizer"]) == (0.02, 2, "adam"), doc
    assert (job_file["lr"], job_file["optimizer"]) == (0.02, "adam")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
