"""Rendered Kubernetes manifests as local processes: what each pod's containers would run.

Kubernetes gives a container its command and args with ``$(VAR)`` expanded from its
environment, that environment from literals, ConfigMap and Secret keys and the pod's own
fields (an Indexed Job's completion index), its volumes at their mount paths, and the
cluster's DNS names for Services. Here the same command runs on this machine: a mount
path becomes a directory of its own (a ConfigMap's or Secret's keys written into it, a
claim's directory kept per claim), a Service's name becomes the local address of the pod
it selects, and every daemon listens on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.launch import BIN
from tests.kube import pod_spec

VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
FIELD_ANNOTATION = re.compile(r"metadata\.annotations\['([^']+)'\]")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
WORKLOADS = ("StatefulSet", "Deployment", "Job")  # the order they start in here
LOOPBACK_FLAGS = ("--host", "--metrics-host")
FREE_PORT_FLAGS = ("--port", "--bulk-port", "--metrics-port")

Doc = dict[str, Any]


@dataclass
class Pod:
    """One pod a workload makes: its name, metadata and spec, and its claims' names."""

    kind: str
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: Doc
    claims: dict[str, str] = field(default_factory=dict)  # volume name -> claim name


def pods(docs: list[Doc]) -> list[Pod]:
    """The pods of every workload, StatefulSets first, then Deployments, then Jobs: a
    StatefulSet's pod i is NAME-i with claims TEMPLATE-NAME-i; a Job's pod i carries its
    completion index."""
    out = []
    for kind in WORKLOADS:
        for doc in (d for d in docs if d["kind"] == kind):
            name, spec = doc["metadata"]["name"], doc["spec"]
            meta = spec["template"]["metadata"]
            count = spec.get("completions", 1) if kind == "Job" else spec.get("replicas", 1)
            for i in range(count):
                pod = f"{name}-{i}"
                annotations = dict(meta.get("annotations", {}))
                if kind == "Job" and spec.get("completionMode") == "Indexed":
                    annotations[COMPLETION_INDEX] = str(i)
                claims = {
                    t["metadata"]["name"]: f"{t['metadata']['name']}-{pod}"
                    for t in spec.get("volumeClaimTemplates", [])
                }
                out.append(
                    Pod(kind, pod, meta.get("labels", {}), annotations, pod_spec(doc), claims)
                )
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` replaced by its value where defined (else left), ``$$`` by ``$``."""
    return VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(
    c: Doc, pod: Pod, configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """A container's environment as the kubelet builds it (a missing key is a KeyError)."""
    env: dict[str, str] = {}
    assert "envFrom" not in c, "envFrom is not used: every variable is named"
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        source = e["valueFrom"]
        if ref := source.get("configMapKeyRef"):
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
        elif ref := source.get("secretKeyRef"):
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        elif m := FIELD_ANNOTATION.fullmatch(source["fieldRef"]["fieldPath"]):
            env[e["name"]] = pod.annotations[m.group(1)]
        else:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", source
            env[e["name"]] = pod.name
    return env


def mounts(
    c: Doc,
    pod: Pod,
    root: Path,
    configmaps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
) -> dict[str, Path]:
    """Each of the container's mount paths and the local directory that stands for it."""
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        name = m["name"]
        if name in pod.claims:
            local = root / "claims" / pod.claims[name]
        elif "persistentVolumeClaim" in volumes[name]:
            local = root / "claims" / volumes[name]["persistentVolumeClaim"]["claimName"]
        else:
            local = root / pod.name / name
        local.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(name, {})
        if "configMap" in volume:
            write_keys(local, configmaps[volume["configMap"]["name"]], volume["configMap"])
        elif "secret" in volume:
            write_keys(local, secrets[volume["secret"]["secretName"]], volume["secret"])
        out[m["mountPath"]] = local
    return out


def write_keys(directory: Path, data: dict[str, str], source: Doc) -> None:
    """A ConfigMap's or Secret's keys as files (only its ``items``, when it names some)."""
    items = source.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        path = directory / item["path"]
        path.write_text(data[item["key"]])
        path.chmod(source.get("defaultMode", 0o644))


def service_addresses(docs: list[Doc], all_pods: list[Pod], listening: dict[str, str]) -> dict:
    """The cluster's names for the pods that listen (``listening``: a pod's name and
    container port, ``POD:PORT``, to its local address): ``SERVICE:PORT`` for a Service,
    and ``POD.SERVICE:PORT`` for each pod of a headless one."""
    out = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        name, spec = svc["metadata"]["name"], svc["spec"]
        chosen = [p for p in all_pods if spec["selector"].items() <= p.labels.items()]
        for port in spec["ports"]:
            for p in chosen:
                local = listening.get(f"{p.name}:{target_port(p, port)}")
                if local is None:
                    continue
                if spec.get("clusterIP") == "None":
                    out[f"{p.name}.{name}:{port['port']}"] = local
                else:
                    assert len(chosen) == 1, f"{name} selects {len(chosen)} pods"
                    out[f"{name}:{port['port']}"] = local
    return out


def target_port(pod: Pod, port: Doc) -> int:
    """The container port a Service port sends to (a name is looked up in the pod)."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    named = [
        p["containerPort"]
        for c in pod.spec["containers"]
        for p in c.get("ports", [])
        if p.get("name") == target
    ]
    assert len(named) == 1, f"{pod.name} has {len(named)} ports named {target}"
    return named[0]


def localise(text: str, paths: dict[str, Path], addresses: dict[str, str]) -> str:
    """A value for this machine: a path under a mount path in its local directory, and
    each of a comma-separated list of cluster addresses as the local one."""
    for mount in sorted(paths, key=len, reverse=True):
        if text == mount or text.startswith(mount + "/"):
            return str(paths[mount]) + text[len(mount) :]
    return ",".join(addresses.get(item, item) for item in text.split(","))


def argv(
    c: Doc, env: dict[str, str], paths: dict[str, Path], addresses: dict[str, str]
) -> list[str]:
    """The container's command and args for this machine: its program from this
    environment, loopback and free ports, local directories and addresses."""
    args = [expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]
    out = [str(BIN / args[0])]
    for previous, arg in itertools.pairwise(args):
        if previous in LOOPBACK_FLAGS:
            arg = "127.0.0.1"
        elif previous in FREE_PORT_FLAGS:
            arg = "0"
        out.append(localise(arg, paths, addresses))
    return out


def flag(c: Doc, name: str) -> str | None:
    """The value a container's command gives a flag, or None."""
    args = [*c.get("command", []), *c.get("args", [])]
    return args[args.index(name) + 1] if name in args else None


def local_env(
    env: dict[str, str], paths: dict[str, Path], addresses: dict[str, str]
) -> dict[str, str]:
    """The environment for this machine (paths and addresses localised, over ours)."""
    return {**os.environ, **{k: localise(v, paths, addresses) for k, v in env.items()}}
