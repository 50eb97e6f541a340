"""Render deploy/kubernetes's kustomizations offline, as ``kubectl apply -k`` would.

There is no kustomize binary here (nor Go to build one), and the PyPI package named
``kustomize`` does not render kustomizations (it writes them from Python). So the
manifests keep to a small subset of kustomize, which this module renders and which
it enforces: a kustomization may hold only ``resources`` (files, or directories
holding a kustomization), ``patches`` given by ``path`` alone, each a strategic-merge
patch naming its target by its own apiVersion, kind and metadata.name, and ``images``
(``name`` with ``newName`` and/or ``newTag``). Anything else (generators, name
prefixes, labels, JSON 6902 patches, ``target`` selectors, ``$patch`` directives) is
refused, so a user's ``kubectl apply -k`` and these tests cannot silently diverge.

A strategic merge, as the Kubernetes API defines it for the fields the manifests use:
mappings merge key by key (``null`` deletes a key); a list of containers, init
containers, volumes, env variables or image pull secrets merges by ``name``, volume
mounts by ``mountPath``, container ports by ``containerPort`` and Service ports by
``port``; every other list (command, args, tolerations, ...) is replaced whole.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
PATCH_FIELDS = {"path"}
IMAGE_FIELDS = {"name", "newName", "newTag"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
}
POD_CONTAINERS = ("initContainers", "containers")


class KustomizeError(ValueError):
    """A kustomization outside the subset, or a patch that applies to nothing."""


def load_all(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file, empty ones left out."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources the kustomization in ``directory`` builds."""
    path = directory / KUSTOMIZATION
    (k,) = load_all(path)
    if extra := sorted(set(k) - FIELDS):
        raise KustomizeError(f"{path}: {', '.join(extra)} outside the supported subset")
    if k.get("kind") != "Kustomization":
        raise KustomizeError(f"{path}: kind {k.get('kind')!r} is not Kustomization")
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        target = directory / entry
        docs += render(target) if target.is_dir() else load_all(target)
    for patch in k.get("patches", []):
        if not isinstance(patch, dict) or set(patch) != PATCH_FIELDS:
            raise KustomizeError(f"{path}: a patch is {{path: FILE}} only, got {patch!r}")
        apply_patch(docs, load_all(directory / patch["path"]), directory / patch["path"])
    for image in k.get("images", []):
        if set(image) - IMAGE_FIELDS or "name" not in image:
            raise KustomizeError(f"{path}: an image is name, newName, newTag; got {image!r}")
        set_image(docs, image)
    return docs


def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc.get("apiVersion", ""), doc.get("kind", ""), doc.get("metadata", {}).get("name", "")


def apply_patch(docs: list[dict[str, Any]], patches: list[Any], where: Path) -> None:
    """Merge each strategic-merge patch of a file into the resource it names."""
    if len(patches) != 1 or not isinstance(patches[0], dict):
        raise KustomizeError(f"{where}: one strategic-merge patch (a mapping) per file")
    patch = patches[0]
    matches = [i for i, d in enumerate(docs) if identity(d) == identity(patch)]
    if len(matches) != 1:
        raise KustomizeError(f"{where}: {identity(patch)} matches {len(matches)} resources")
    docs[matches[0]] = merge(docs[matches[0]], patch, where)


def merge(base: Any, patch: Any, where: Path, field: str = "") -> Any:
    """``patch`` merged into ``base`` (neither is changed)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise KustomizeError(f"{where}: directive {key} outside the supported subset")
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base[key], value, where, key) if key in base else value
        return copy.deepcopy(out)
    if isinstance(patch, list) and isinstance(base, list) and (key := merge_key(field, base)):
        out = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"{where}: an item of {field} without its {key}")
            found = [i for i, b in enumerate(out) if b.get(key) == item[key]]
            if found:
                out[found[0]] = merge(out[found[0]], item, where)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def merge_key(field: str, items: list[Any]) -> str | None:
    """The key a list merges by, or None for a list that a patch replaces."""
    if field == "ports":
        return "containerPort" if any("containerPort" in p for p in items) else "port"
    return MERGE_KEYS.get(field)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A workload's pod spec (Deployment, StatefulSet, Job), else None."""
    return doc.get("spec", {}).get("template", {}).get("spec")


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every init container and container of a workload."""
    spec = pod_spec(doc) or {}
    return [c for field in POD_CONTAINERS for c in spec.get(field, [])]


def set_image(docs: list[dict[str, Any]], image: dict[str, str]) -> None:
    """The ``images`` transformer: a new name and/or tag for every container of that image."""
    for doc in docs:
        for c in containers(doc):
            name, tag = c["image"], ""
            if ":" in name.rsplit("/", 1)[-1]:  # a tag, not a registry's port
                name, tag = name.rsplit(":", 1)
            if name == image["name"]:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                c["image"] = f"{name}:{tag}" if tag else name


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one resource of that kind and name."""
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc
