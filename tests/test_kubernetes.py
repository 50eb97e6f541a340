"""deploy/kubernetes: every kustomization renders (tests/kube.py) to manifests valid in
strict mode against a pinned Kubernetes version; their names, ports and variables agree;
and the small overlay's containers, run as local processes, finish a job."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from protos.jobspec import JobSpec, variable_of
from protos.security import TOKEN_ENV
from ps_worker import environment
from scheduler.launch import BIN, SHARED_CORES_ENV, Daemon
from tests import kuberun
from tests.kube import KUSTOMIZATION, KustomizeError, containers, find, load_all, pod_spec, render

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
DOCS = ROOT / "docs" / "kubernetes.md"
KUBERNETES_VERSION = "1.31.0"  # kubernetes-validate==1.31.0 (pyproject's dev extra)
OVERLAYS = sorted(
    p.parent.relative_to(DEPLOY) for p in DEPLOY.glob("overlays/*/kustomization.yaml")
)
KUSTOMIZATIONS = [Path("base"), *OVERLAYS]
SECRET = "gradstore"  # what docs/kubernetes.md has you create
# Variables for a training script of one's own (ps_worker.torch_api), which ps-worker
# itself does not read: it takes the servers and its id from the scheduler.
SCRIPT_VARIABLES = {environment.SERVERS_ENV, environment.RANK_ENV, environment.WORLD_ENV}
# What the manifests give the scheduler, which the job file must therefore not say (a
# variable or flag would silently win over it).
FROM_MANIFESTS = ("data_dir", "servers", "expected_workers")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CLUSTER_ADDRESS = re.compile(r"(^|,)[a-z][a-z0-9.-]*:\d+")  # a name, not 127.0.0.1


def rendered(kustomization: Path) -> list[dict]:
    return render(DEPLOY / kustomization)


def test_the_pinned_kubernetes_version_is_installed():
    assert kubernetes_validate.__version__ == KUBERNETES_VERSION
    dev = (ROOT / "pyproject.toml").read_text()
    assert f'"kubernetes-validate=={KUBERNETES_VERSION}"' in dev


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=str)
def test_manifests_are_valid_in_strict_mode(kustomization):
    docs = rendered(kustomization)
    kinds = sorted(d["kind"] for d in docs)
    workloads = ["StatefulSet", "Deployment", "Job"]
    assert kinds == sorted(["ConfigMap", "Service", "Service", "PersistentVolumeClaim", *workloads])
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.timeout(60)
def test_strict_validation_refuses_an_unknown_field():
    job = find(rendered(Path("base")), "Job", "gradstore-worker")
    containers(job)[-1]["readOnlyRootFS"] = True  # a misspelt field, which kubectl would drop
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_the_renderer_merges_as_kustomize_does():
    base, small = rendered(Path("base")), rendered(Path("overlays/small"))
    job = find(small, "Job", "gradstore-worker")
    assert job["spec"]["completions"] == 2
    assert containers(job) == containers(find(base, "Job", "gradstore-worker"))
    data = find(small, "ConfigMap", "gradstore")["data"]
    assert data["WORLD_SIZE"] == "2" and data["PS_SHARDS"] == "16"  # kept from the base
    gpu = containers(find(rendered(Path("overlays/gpu")), "Job", "gradstore-worker"))
    worker = gpu[-1]
    assert worker["image"] == "gradstore:cuda" and all(c["image"] == "gradstore:cuda" for c in gpu)
    assert worker["resources"]["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}
    names = [e["name"] for e in worker["env"]]
    assert names[-1] == "PS_DEVICE" and "PS_SCHEDULER" in names  # merged by name
    assert [m["name"] for m in worker["volumeMounts"]] == ["data", "secret", "tmp"]


@pytest.mark.parametrize(
    "kustomization, why",
    [
        ("commonLabels: {a: b}\n", "commonLabels outside the supported subset"),
        ("namePrefix: x-\n", "namePrefix outside the supported subset"),
        ("patches: [{path: p.yaml, target: {kind: Job}}]\n", "a patch is {path: FILE} only"),
        ("patches: [{path: p.yaml}]\n", "one strategic-merge patch"),
        ("patches: [{path: d.yaml}]\n", "directive $patch outside"),
        ("patches: [{path: n.yaml}]\n", "matches 0 resources"),
        ("images: [{name: gradstore, digest: sha256:0}]\n", "an image is name, newName"),
    ],
)
def test_the_renderer_refuses_what_it_does_not_render(tmp_path, kustomization, why):
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    (tmp_path / "kustomization.yaml").write_text(
        f"{head}resources: [{DEPLOY / 'base'}]\n{kustomization}"
    )
    (tmp_path / "p.yaml").write_text("- op: add\n  path: /spec/completions\n  value: 4\n")
    job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: gradstore-worker}\n"
    (tmp_path / "d.yaml").write_text(f"{job}spec: {{$patch: replace}}\n")
    (tmp_path / "n.yaml").write_text(job.replace("gradstore-worker", "nobody"))
    with pytest.raises(KustomizeError, match=re.escape(why)):
        render(tmp_path)


def program_reads(program: str, monkeypatch) -> set[str]:
    """The variables a daemon reads while it builds its flags (its ``--help``, run here
    with an environment that records what is asked of it), and the job's token."""

    class Recording(dict):
        def __init__(self) -> None:
            super().__init__()
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

        def pop(self, key, *default):
            self.read.add(key)
            return super().pop(key, *default)

    (entry,) = entry_points(group="console_scripts", name=program)
    main = entry.load()
    recording = Recording()
    with monkeypatch.context() as m:
        m.setattr(os, "environ", recording)
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            main(["--help"])
    return recording.read | {TOKEN_ENV}  # read once the flags are parsed (read_token)


def values(c: dict) -> dict[str, str]:
    """A container's literal variables."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def probe_port(c: dict, probe: dict) -> str:
    """The port a probe checks: the kubelet's plain gRPC probe, or, for a daemon serving
    TLS (which that probe cannot speak), ps-health over TLS in the container, with the CA
    its clients verify it by."""
    if "PS_TLS_CERT" not in values(c):
        return str(probe["grpc"]["port"])
    program, address, option, ca = probe["exec"]["command"]
    assert (program, option) == ("ps-health", "--tls-ca") and "grpc" not in probe
    assert ca == str(Path(values(c)["PS_TLS_CERT"]).with_name("ca.crt"))
    host, port = address.split(":")
    assert host == "127.0.0.1"
    return port


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=str)
def test_names_ports_and_variables_agree(kustomization, monkeypatch):
    docs = rendered(kustomization)
    config = find(docs, "ConfigMap", "gradstore")["data"]
    servers = find(docs, "StatefulSet", "gradstore-server")
    scheduler = find(docs, "Deployment", "gradstore-scheduler")
    job = find(docs, "Job", "gradstore-worker")
    server, sched, worker = containers(servers)[-1], containers(scheduler)[-1], containers(job)[-1]

    # The servers: stable names behind the headless Service, the names PS_SERVERS gives.
    service = find(docs, "Service", servers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"].items()
        <= servers["spec"]["template"]["metadata"]["labels"].items()
    )
    (grpc,) = [p for p in service["spec"]["ports"] if p["targetPort"] == "grpc"]
    assert str(grpc["port"]) == kuberun.flag(server, "--port")
    (bulk,) = [p for p in service["spec"]["ports"] if p["targetPort"] == "bulk"]
    assert str(bulk["port"]) == kuberun.flag(server, "--bulk-port")
    replicas = servers["spec"]["replicas"]
    names = [f"gradstore-server-{i}.{service['metadata']['name']}" for i in range(replicas)]
    assert config["PS_SERVERS"] == ",".join(f"{n}:{grpc['port']}" for n in names)

    # The scheduler: one replica, replaced only once gone, reached by its Service.
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"] == {"type": "Recreate"}
    sched_service = find(docs, "Service", config["PS_SCHEDULER"].split(":")[0])
    (port,) = [p for p in sched_service["spec"]["ports"] if p["targetPort"] == "grpc"]
    assert config["PS_SCHEDULER"] == f"gradstore-scheduler:{port['port']}"
    assert str(port["port"]) == kuberun.flag(sched, "--port")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    state = kuberun.flag(sched, "--state")
    (state_mount,) = [m for m in sched["volumeMounts"] if state.startswith(m["mountPath"] + "/")]
    (state_volume,) = [
        v for v in pod_spec(scheduler)["volumes"] if v["name"] == state_mount["name"]
    ]
    assert state_volume["persistentVolumeClaim"]["claimName"] in claims

    # The workers: one pod per rank, as many as the scheduler expects.
    world = int(config["WORLD_SIZE"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == world
    env = {e["name"]: e for e in worker["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{kuberun.COMPLETION_INDEX}']"
    )
    assert env["WORLD_SIZE"]["valueFrom"]["configMapKeyRef"]["key"] == "WORLD_SIZE"
    expected = {e["name"]: e for e in sched["env"]}[variable_of("expected_workers")]
    assert expected["valueFrom"]["configMapKeyRef"]["key"] == "WORLD_SIZE"

    # TLS: served by the servers and the scheduler, or by neither; verified by their clients.
    tls = "PS_TLS_CERT" in values(server)
    assert tls == ("PS_TLS_CERT" in values(sched)) == ("PS_TLS_KEY" in values(server))
    cas = {values(c).get("PS_TLS_CA") for c in (sched, worker)}
    assert cas == (
        {str(Path(values(server)["PS_TLS_CERT"]).with_name("ca.crt"))} if tls else {None}
    )

    # The job file: a valid job once the manifests add what they give.
    job_file = yaml.safe_load(config["job.yaml"])
    assert not set(job_file) & set(FROM_MANIFESTS)
    JobSpec.from_dict({**job_file, "data_dir": "/data", "servers": config["PS_SERVERS"]})

    reads = {}
    for workload in (servers, scheduler, job):
        pod = pod_spec(workload)
        meta = workload["spec"]["template"]["metadata"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        assert pod["securityContext"]["runAsNonRoot"] is True
        for v in pod["volumes"]:
            if "secret" in v:
                assert v["secret"]["secretName"] == SECRET
            if "configMap" in v:
                assert all(i["key"] in config for i in v["configMap"]["items"])
        for c in containers(workload):
            name = f"{workload['metadata']['name']}/{c['name']}"
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            mounted = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert set(mounted.values()) <= volumes, name
            assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounted["/tmp"]], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), name
            for e in c.get("env", []):  # every reference names a key that exists
                if ref := e.get("valueFrom", {}).get("configMapKeyRef"):
                    assert ref["name"] == "gradstore" and ref["key"] in config, name
            program = c["command"][0]
            if program not in reads:
                reads[program] = program_reads(program, monkeypatch)
            used = {
                m.group(1)
                for a in c["command"] + c.get("args", [])
                for m in kuberun.VAR.finditer(a)
            }
            for e in c.get("env", []):
                if e["name"].startswith("PS_") or e["name"] in SCRIPT_VARIABLES:
                    allowed = reads[program] | used
                    if program == "ps-worker":
                        allowed |= SCRIPT_VARIABLES
                    assert e["name"] in allowed, f"{name}: {program} does not read {e['name']}"
            for probe in PROBES:  # the API allows one handler per probe
                handlers = {"exec", "grpc", "httpGet", "tcpSocket"} & set(c.get(probe, {}))
                assert len(handlers) == (probe in c), f"{name} {probe}: {handlers}"
            port = kuberun.flag(c, "--port")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if port is not None:  # a gRPC daemon: its port, and probes on it
                assert str(ports["grpc"]) == port, name
                if (bulk := kuberun.flag(c, "--bulk-port")) is not None:  # a fixed one
                    assert str(ports["bulk"]) == bulk, name
                for probe in PROBES:
                    assert probe_port(c, c[probe]) == port, f"{name} {probe}"
            if (metrics := kuberun.flag(c, "--metrics-port")) is not None:
                assert str(ports["metrics"]) == metrics == meta["annotations"]["prometheus.io/port"]
                assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert "PS_EXPECTED_WORKERS" in reads["ps-scheduler"]  # the recording sees the job's flags
    assert "PS_SCHEDULER" in reads["ps-worker"] and "PS_SERVERS" not in reads["ps-worker"]


def test_the_docs_name_every_overlay_and_the_secret():
    text = DOCS.read_text()
    for overlay in OVERLAYS:
        assert f"deploy/kubernetes/{overlay}" in text
    tokens = {
        e["value"]
        for d in rendered(Path("base"))
        for c in containers(d)
        for e in c.get("env", [])
        if e["name"] == "PS_TOKEN_FILE"
    }
    secret_mounts = {
        m["mountPath"]
        for d in rendered(Path("base"))
        for c in containers(d)
        for m in c["volumeMounts"]
        if m["name"] == "secret"
    }
    assert tokens == {f"{path}/token" for path in secret_mounts}  # the key docs create
    assert f"kubectl create secret generic {SECRET} --from-literal=token=" in text


def small_with_tls(directory: Path) -> Path:
    """A kustomization of the small overlay with the tls overlay's patches on top."""
    tls = DEPLOY / "overlays" / "tls"
    patches = [{"path": str(tls / p["path"])} for p in load_all(tls / KUSTOMIZATION)[0]["patches"]]
    directory.mkdir()
    resources = [str(DEPLOY / "overlays" / "small")]
    (directory / KUSTOMIZATION).write_text(
        yaml.safe_dump(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
            | {"resources": resources, "patches": patches}
        )
    )
    return directory


def make_secret(directory: Path) -> dict[str, str]:
    """The Secret docs/kubernetes.md has you create for TLS: its openssl commands, run here,
    and the keys its kubectl command gives the files they make (and the token)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    text = DOCS.read_text()
    block = text[text.index("## TLS") :].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    directory.mkdir()
    for line in (x for x in lines if not x.startswith("kubectl ")):
        subprocess.run(["bash", "-c", line], cwd=directory, check=True, timeout=60)
    (create,) = [x for x in lines if x.startswith("kubectl create secret")]
    files = re.findall(r"--from-file=(\S+)", create)
    assert f"kubectl create secret generic {SECRET} --from-literal=token=" in create
    return {"token": secrets.token_hex(16)} | {f: (directory / f).read_text() for f in files}


def digest(directory: Path) -> dict[str, str]:
    """Every prepared data file's SHA-256 (the scheduler's state files left out)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith("scheduler.db")
    }


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_small_overlay_runs_a_job_as_local_processes(tmp_path):
    docs = render(small_with_tls(tmp_path / "kustomization"))
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secret_data = {SECRET: make_secret(tmp_path / "pki")}
    pods = kuberun.pods(docs)
    listening: dict[str, str] = {}
    daemons: list[tuple[kuberun.Pod, Daemon]] = []
    prepared = []
    scheduler_env: dict[str, str] = {}
    scheduler = ""
    try:
        for pod in pods:
            addresses = kuberun.service_addresses(docs, pods, listening)
            for c in [*pod.spec.get("initContainers", []), *pod.spec["containers"]]:
                env = kuberun.container_env(c, pod, configmaps, secret_data)
                paths = kuberun.mounts(c, pod, tmp_path, configmaps, secret_data)
                command = kuberun.argv(c, env, paths, addresses)
                local = kuberun.local_env(env, paths, addresses)
                env = {k: local[k] for k in env}
                left = [a for a in [*command, *env.values()] if CLUSTER_ADDRESS.search(a)]
                assert not left, f"{pod.name}: no local address for {left}"
                if c in pod.spec.get("initContainers", []):
                    done = subprocess.run(
                        command, capture_output=True, text=True, timeout=120, env=local
                    )
                    assert done.returncode == 0, done.stderr
                    prepared.append(paths["/data"])
                    continue
                if pod.kind == "Job":
                    local.update(SHARED_CORES_ENV)
                d = Daemon(command, tmp_path / f"{pod.name}.log", env=local)
                daemons.append((pod, d))
                if pod.kind == "Job":
                    continue
                listening[f"{pod.name}:{kuberun.flag(c, '--port')}"] = d.address
                # ps-health over TLS, on the pod's own port (127.0.0.1:PORT in the command)
                own = {f"127.0.0.1:{kuberun.flag(c, '--port')}": d.address}
                probe = kuberun.argv(c["readinessProbe"]["exec"], env, paths, own)
                assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
                if pod.kind == "Deployment":
                    scheduler_env, scheduler = local, d.address
        workers = [d for p, d in daemons if p.kind == "Job"]
        assert len(workers) == int(configmaps["gradstore"]["WORLD_SIZE"]) == 2
        for d in workers:
            assert d.proc.wait(200) == 0, d.log.name
        # docs/kubernetes.md: kubectl exec deploy/gradstore-scheduler -- ps-scheduler status ...
        status = subprocess.run(
            [str(BIN / "ps-scheduler"), "status", "--scheduler", scheduler, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=scheduler_env,
        )
        assert status.returncode == 0, status.stderr
        progress = json.loads(status.stdout)
        shards = int(configmaps["gradstore"]["PS_SHARDS"])
        epochs = yaml.safe_load(configmaps["gradstore"]["job.yaml"])["epochs"]
        assert progress["finished"] and progress["done"] == epochs * shards
        assert len(progress["evaluations"]) == epochs
        assert 0 < progress["evaluations"][-1]["accuracy"] <= 1
        # Every pod prepared the same data for itself (the scheduler's copy is the job's).
        assert len(prepared) == 3 and all(digest(p) == digest(prepared[0]) for p in prepared)
    finally:
        for _, d in daemons:
            d.stop()
