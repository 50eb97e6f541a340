"""Server checkpoints: safetensors files plus a JSON manifest, written atomically.

A checkpoint holds everything a server needs to carry on: the job, the
parameters and optimizer state of each dtype group, a barrier step's partial
sum and contributors (or a pending buffer's sum, count and staleness), the
step and version counters, and every worker's clock, active and left flags
(the clock makes a retried push a duplicate); not the clients' sessions (the
first seen after a restart claims each worker id), nor delay compensation's
kept weights. No pickle: a checkpoint is data and can never execute code.

Layout of a checkpoint directory::

    manifest.json                     the commit point: names the tensor file
    state-<version>-<token>.safetensors

A checkpoint is written as a new tensor file, then a new manifest (write,
fsync, rename), so a crash at any moment leaves the previous checkpoint or
the new one, never a torn file. Older tensor files are removed afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import load_file, save_file

from protos import ps_pb2
from protos.job import Job
from ps_server.flat import GroupState
from ps_server.records import Counters, StoreState, StoreView, WorkerState
from ps_server.store import ParameterStore

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit."""


@dataclass
class Snapshot:
    """A consistent copy of a store's state, taken between two requests."""

    manifest: dict
    tensors: dict[str, torch.Tensor]
    generation: int = 0  # the Checkpointer's, when taken: one taken before a discard is stale

    @property
    def version(self) -> int:
        return self.manifest["version"]


def snapshot(store: ParameterStore) -> Snapshot | None:
    """Copy the store's state (None before the model is initialised)."""
    state = store.snapshot_state()
    if state is None:
        return None
    view = state.view
    assert view.job is not None
    tensors: dict[str, torch.Tensor] = {}
    for name, group in state.groups.items():
        tensors[f"{name}/param"] = group.param
        for key, value in group.state.items():
            tensors[f"{name}/state/{key}"] = value
        if group.accumulator is not None:
            tensors[f"{name}/accumulator"] = group.accumulator
    c = view.counters
    manifest = {
        "format": FORMAT,
        "job": base64.b64encode(view.job.to_proto().SerializeToString()).decode(),
        "job_id": view.job.job_id,
        "steps": view.steps,
        "version": view.version,
        "workers": [[w.worker_id, w.clock, w.active, w.left] for w in view.workers],
        "contributors": list(view.contributors),
        "buffer": {"count": view.buffered, "staleness": view.buffered_staleness},
        "counters": {
            "updates_applied": c.updates_applied,
            "pushes_received": c.pushes_received,
            "stale_dropped": c.stale_dropped,
            "duplicates": c.duplicates,
            "staleness": {str(k): v for k, v in c.staleness.items()},
            "compensated": c.compensated,
            "uncompensated": c.uncompensated,
        },
        "written_at": time.time(),
    }
    return Snapshot(manifest, tensors)


def write(snap: Snapshot, directory: Path) -> Path:
    """Write a snapshot as the directory's current checkpoint; returns the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{snap.version:012d}-{uuid.uuid4().hex[:8]}.safetensors"
    tensor_path = directory / name
    partial = directory / f".{name}.partial"
    save_file({k: v.contiguous() for k, v in snap.tensors.items()}, str(partial))
    _fsync(partial)
    os.replace(partial, tensor_path)
    manifest = {**snap.manifest, "tensors": name, "sha256": _sha256(tensor_path)}
    staged = directory / f".{MANIFEST}.partial"
    staged.write_text(json.dumps(manifest, indent=1))
    _fsync(staged)
    os.replace(staged, directory / MANIFEST)
    _fsync(directory)
    _remove_tensor_files(directory, keep=name)
    return directory / MANIFEST


def _remove_tensor_files(directory: Path, keep: str = "") -> None:
    """Delete the directory's tensor files but ``keep``: older checkpoints', and the partial
    files of writes a crash cut short (each write's name is new: they would pile up)."""
    for pattern in ("state-*.safetensors", ".state-*.safetensors.partial"):
        for old in directory.glob(pattern):
            if old.name != keep:
                old.unlink(missing_ok=True)


def read(directory: Path) -> Snapshot | None:
    """The directory's current checkpoint, checked; None when there is none."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"{MANIFEST} holds {json.dumps(manifest)[:40]}, not a JSON object")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"unknown checkpoint format {manifest.get('format')!r}")
        tensor_path = directory / Path(manifest["tensors"]).name
        if _sha256(tensor_path) != manifest["sha256"]:
            raise CheckpointError(f"{tensor_path.name} does not match its checksum")
        return Snapshot(manifest, load_file(str(tensor_path)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {directory}: {e}") from e


def restore(store: ParameterStore, snap: Snapshot) -> None:
    """Make an empty store hold the checkpointed state."""
    if store.job is not None:
        raise CheckpointError("the store already holds a job")
    try:
        store.restore_state(_state(snap))
    except Exception as e:
        raise CheckpointError(f"the checkpoint does not describe a valid job: {e}") from e


def _state(snap: Snapshot) -> StoreState:
    """The store state a checkpoint describes (its tensors are checked by the store)."""
    m = snap.manifest
    job = Job.from_proto(ps_pb2.JobConfig.FromString(base64.b64decode(m["job"])))
    c = m["counters"]
    counters = Counters(
        int(c["updates_applied"]),
        int(c["pushes_received"]),
        int(c["stale_dropped"]),
        int(c["duplicates"]),
        MappingProxyType({int(k): int(v) for k, v in c["staleness"].items()}),
        int(c.get("compensated", 0)),  # (checkpoints before issue 16 have none)
        int(c.get("uncompensated", 0)),
    )
    buffer = m.get("buffer", {"count": 0, "staleness": 0})
    view = StoreView(
        job,
        int(m["steps"]),
        int(m["version"]),
        tuple(_worker(*entry) for entry in m["workers"]),
        tuple(m["contributors"]),
        counters,
        buffered=int(buffer["count"]),
        buffered_staleness=int(buffer["staleness"]),
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in snap.tensors.items():
        name, _, rest = key.partition("/")
        groups.setdefault(name, {})[rest] = value
    return StoreState(
        view,
        {  # a group without its parameters is left out: the store says it is missing
            name: GroupState(
                found["param"],
                {k.removeprefix("state/"): v for k, v in found.items() if k.startswith("state/")},
                found.get("accumulator"),
            )
            for name, found in groups.items()
            if "param" in found
        },
    )


def _worker(worker_id: str, clock: int, active: bool, left: bool = False) -> WorkerState:
    """A manifest's worker entry (checkpoints before Leave have no ``left``)."""
    return WorkerState(worker_id, int(clock), bool(active), bool(left))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Every:
    """How often to checkpoint: after so many seconds or so many versions, whichever first."""

    seconds: float | None = None
    versions: int | None = None

    @classmethod
    def parse(cls, text: str) -> Every:
        """'30s' (seconds), '500' (versions: updates applied), or both: '30s,500'."""
        seconds = versions = None
        for item in filter(None, (t.strip() for t in text.split(","))):
            try:
                if item.endswith("s"):
                    seconds = float(item[:-1])
                else:
                    versions = int(item)
            except ValueError:
                raise ValueError(f"bad checkpoint interval {item!r}: use e.g. 30s or 500") from None
        if (seconds is not None and seconds <= 0) or (versions is not None and versions < 1):
            raise ValueError("checkpoint intervals must be positive")
        if seconds is None and versions is None:
            raise ValueError("give a checkpoint interval, e.g. 30s or 500")
        return cls(seconds, versions)

    def due(self, since_s: float, versions: int) -> bool:
        return versions > 0 and (
            (self.seconds is not None and since_s >= self.seconds)
            or (self.versions is not None and versions >= self.versions)
        )


class Checkpointer:
    """Writes a store's checkpoints into one directory: when due, and on demand; deletes
    them when the job is ended."""

    def __init__(self, store: ParameterStore, directory: Path, every: Every) -> None:
        self.store = store
        self.directory = directory
        self.every = every
        self.written_version: int | None = None
        self.written_at = time.monotonic()
        self.generation = 0  # one more at each discard
        self._lock = threading.Lock()  # a save (on a thread) and a discard never interleave

    def restore_if_any(self) -> Snapshot | None:
        """Load the directory's checkpoint into the (empty) store, if there is one."""
        snap = read(self.directory)
        if snap is not None:
            restore(self.store, snap)
            self.written_version = snap.version
        return snap

    def due(self) -> bool:
        version = self.store.version
        done = self.written_version or 0
        return self.store.job is not None and self.every.due(
            time.monotonic() - self.written_at, version - done
        )

    def snapshot(self) -> Snapshot | None:
        """The store's state now (on the event loop, between requests); None without a job."""
        snap = snapshot(self.store)
        if snap is not None:
            snap.generation = self.generation
        return snap

    def save(self, snap: Snapshot) -> Path | None:
        """Write ``snap`` as the directory's checkpoint; None, writing nothing, if the job was
        ended (discarded) since it was taken."""
        with self._lock:
            if snap.generation != self.generation:
                return None
            path = write(snap, self.directory)
            self.written_version = snap.version
            self.written_at = time.monotonic()
            return path

    def discard(self) -> None:
        """Delete the directory's checkpoint, so that a restart restores nothing, and make
        every snapshot taken so far stale. Waits for a save in progress. OSError, changing
        nothing, when the manifest (the commit point) cannot be removed."""
        with self._lock:
            (self.directory / MANIFEST).unlink(missing_ok=True)
            self.generation += 1
            self.written_version = None
            self.written_at = time.monotonic()
            _remove_tensor_files(self.directory)
