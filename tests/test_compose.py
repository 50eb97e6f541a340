"""docker-compose.yml: valid against the Compose Specification, and its services' own
commands, run as local processes (service names mapped to loopback ports), finish a job."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from scheduler.cluster import SHARED_CORES_ENV
from scheduler.launch import BIN, Daemon

ROOT = Path(__file__).resolve().parent.parent
# tests/compose-spec.json is the Compose Specification's JSON schema, vendored from the
# compose-spec project (Apache-2.0).
SCHEMA = Path(__file__).with_name("compose-spec.json")
ENV = {
    "PS_DATASET": "digits",
    "PS_MODEL": "digits-mlp",
    "PS_EPOCHS": "2",
    "PS_BATCH_SIZE": "32",
    "PS_SAMPLES": "1000",
    "PS_EXPECTED_WORKERS": "2",
    "PS_TOKEN": "compose-secret",  # as if from .env: every daemon demands it
}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid():
    doc = compose()
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(doc)
    services = doc["services"]
    assert {"data", "scheduler", "server0", "server1", "worker"} <= set(services)
    for name in ("scheduler", "server0", "server1"):
        assert services[name]["restart"] == "on-failure"
        assert services[name]["healthcheck"]["test"][1] == "ps-health"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    for name in ("scheduler", "server0", "server1", "worker"):  # every daemon serves metrics
        assert "--metrics-port" in services[name]["command"], name
    assert all(s["volumes"] == ["data:/data"] for s in services.values())
    for name, service in services.items():  # the token reaches every daemon from .env
        assert service["environment"]["PS_TOKEN"] == "${PS_TOKEN:-}", name


def interpolate(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), arg)


def service_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose would give it (interpolated from env)."""
    return {k: interpolate(v, env) for k, v in service.get("environment", {}).items()}


def localise(
    command: list[str], env: dict[str, str], data: Path, addresses: dict[str, str]
) -> list[str]:
    """A service's command for this machine: loopback, free ports, the data dir, real peers."""
    args = [interpolate(a, env) for a in command]
    out = [str(BIN / args[0])]
    for i, a in enumerate(args[1:], start=1):
        previous = args[i - 1]
        if previous == "--host":
            a = "127.0.0.1"
        elif previous in ("--port", "--metrics-port"):
            a = "0"  # free ports: several services share this machine
        a = a.replace("/data", str(data))
        for service, address in addresses.items():
            a = re.sub(rf"\b{service}:\d+", address, a)
        out.append(a)
    return out


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_compose_commands_run_a_job_as_local_processes(tmp_path):
    services = compose()["services"]
    env = {**os.environ, **ENV}
    data = tmp_path / "data"
    addresses: dict[str, str] = {}
    daemons: list[Daemon] = []
    try:
        prepare = localise(services["data"]["command"], env, data, addresses)
        result = subprocess.run(prepare, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        for name in ("server0", "server1", "scheduler"):
            d = Daemon(
                localise(services[name]["command"], env, data, addresses),
                tmp_path / f"{name}.log",
                env={**ENV, **service_env(services[name], env)},
            )
            daemons.append(d)
            addresses[name] = d.address
            check = localise(services[name]["healthcheck"]["test"][1:], env, data, {})
            check[-1] = d.address  # the check's own 127.0.0.1:PORT, on this machine's port
            assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
        workers = [
            Daemon(
                localise(services["worker"]["command"], env, data, addresses),
                tmp_path / f"worker{i}.log",
                env={**ENV, **service_env(services["worker"], env), **SHARED_CORES_ENV},
            )
            for i in range(2)  # docker compose up --scale worker=2
        ]
        daemons += workers
        for w in workers:
            assert w.proc.wait(200) == 0, w.log.name
        status = subprocess.run(
            [str(BIN / "ps-scheduler"), "status", "--scheduler", addresses["scheduler"], "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        progress = json.loads(status.stdout)
        assert progress["finished"] and progress["done"] == 2 * 16
        assert len(progress["evaluations"]) == 2
    finally:
        for d in daemons:
            d.stop()
