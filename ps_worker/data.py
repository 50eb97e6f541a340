"""Data shards: prepare a dataset as shard files plus a manifest, and load them back.

A data directory holds ``manifest.json``, the training split as N shard
files and a held-out test file, each an ``.npz`` with ``x`` (float32) and
``y`` (int64). A user's own shards work the same way given a manifest:

    {"dataset": "mine", "input_shape": [40], "classes": 10,
     "shards": [{"file": "shard-00000.npz", "samples": 500, "sha256": "..."}, ...],
     "test": {"file": "test.npz", "samples": 1000, "sha256": "..."}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
DATASETS = ("mnist1d", "digits")


class DataError(ValueError):
    """A data directory that is missing, malformed or corrupt."""


@dataclass(frozen=True)
class ShardFile:
    file: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    dataset: str
    input_shape: tuple[int, ...]
    classes: int
    shards: tuple[ShardFile, ...]
    test: ShardFile

    @property
    def train_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches in one pass over every shard (each shard's last one may be short)."""
        return sum(self.shard_batches(batch_size))

    def shard_batches(self, batch_size: int) -> list[int]:
        """The batches of each shard (its last one may be short)."""
        return [-(-s.samples // batch_size) for s in self.shards]


def generate(dataset: str, samples: int | None, seed: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of a built-in dataset, made locally."""
    if dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset  # needs matplotlib

        args = get_dataset_args()
        args.num_samples = samples or 25_000  # 20,000 train and 5,000 test
        args.seed = seed
        d = make_dataset(args)  # generated here; never get_dataset, which downloads
        return d["x"], d["y"], d["x_test"], d["y_test"]
    if dataset == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(y))
        if samples:
            order = order[:samples]
        x, y = x[order] / 16.0, y[order]
        split = int(len(y) * 0.8)
        return x[:split], y[:split], x[split:], y[split:]
    raise DataError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> ShardFile:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=np.ascontiguousarray(x, dtype=np.float32), y=y.astype(np.int64))
    os.replace(tmp, path)  # never a torn file
    return ShardFile(path.name, len(y), _sha256(path))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(
    dataset: str, out: Path, shards: int, samples: int | None = None, seed: int = 0
) -> Manifest:
    """Generate a dataset and write it as shards, a test file and a manifest."""
    if shards < 1:
        raise DataError("--shards must be at least 1")
    x, y, x_test, y_test = generate(dataset, samples, seed)
    if shards > len(y):
        raise DataError(f"{shards} shards for {len(y)} training samples: too many shards")
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_npz(out / f"shard-{i:05d}.npz", xs, ys)
        for i, (xs, ys) in enumerate(
            zip(np.array_split(x, shards), np.array_split(y, shards), strict=True)
        )
    ]
    test = _write_npz(out / "test.npz", x_test, y_test)
    manifest = Manifest(
        dataset, tuple(x.shape[1:]), int(max(y.max(), y_test.max()) + 1), tuple(files), test
    )
    write_manifest(out, manifest)
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    doc = {
        "dataset": manifest.dataset,
        "input_shape": list(manifest.input_shape),
        "classes": manifest.classes,
        "shards": [vars(s) for s in manifest.shards],
        "test": vars(manifest.test),
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        doc = json.loads(path.read_text())
        return Manifest(
            dataset=str(doc["dataset"]),
            input_shape=tuple(int(d) for d in doc["input_shape"]),
            classes=int(doc["classes"]),
            shards=tuple(
                ShardFile(s["file"], int(s["samples"]), s["sha256"]) for s in doc["shards"]
            ),
            test=ShardFile(doc["test"]["file"], int(doc["test"]["samples"]), doc["test"]["sha256"]),
        )
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST} in {directory} (run `ps-data prepare` first)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is malformed: {e}") from None


def load(directory: Path, shard: ShardFile, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one shard or test file, checked against its manifest entry."""
    path = Path(directory) / shard.file
    if not path.exists():
        raise DataError(f"missing data file {path}")
    if verify and _sha256(path) != shard.sha256:
        raise DataError(f"{path} does not match its checksum in the manifest")
    with np.load(path, allow_pickle=False) as f:
        x, y = f["x"].astype(np.float32, copy=False), f["y"].astype(np.int64, copy=False)
    if len(x) != shard.samples or len(y) != shard.samples:
        raise DataError(f"{path} holds {len(y)} samples, the manifest says {shard.samples}")
    return x, y
