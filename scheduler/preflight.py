"""Checks a launcher runs before it starts any process, each failing with one line.

A job that cannot run should be refused where the person typed it, not found
minutes later in a worker's log: a model name that names nothing, a model
that does not fit the data (built once and given one batch), a straggler
index beyond the workers, a CUDA device that is not there, a model file that
cannot be written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from protos import outfile
from protos.jobspec import JobSpec
from ps_worker.data import DataError, load, read_manifest
from ps_worker.models import BUILTIN, ModelError, build_model

FIT_SAMPLES = 2  # samples of the first shard run through the model
MODEL_HELP = f"model to train: {', '.join(BUILTIN)}, or package.module:function"


class PreflightError(ValueError):
    """A job that would fail once started; the message says why, in one line."""


def model_argument(name: str) -> str:
    """argparse type of ``--model``: a built-in model, or a ``package.module:function``."""
    if name in BUILTIN:
        return name
    if ":" not in name:
        raise argparse.ArgumentTypeError(
            f"unknown model {name!r} (choose from {', '.join(BUILTIN)}, "
            "or give package.module:function)"
        )
    try:
        build_model(name, 0)
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def check_model_fits(spec: JobSpec) -> None:
    """Build the job's model and run a batch of its data through it, with the loss.

    Raises PreflightError saying what does not fit (the data's input shape and classes
    against what the model made of them)."""
    import torch

    try:
        manifest = read_manifest(Path(spec.data_dir))
        x, y = load(Path(spec.data_dir), manifest.shards[0])
        model = build_model(spec.model, spec.seed)
    except (DataError, ModelError) as e:
        raise PreflightError(str(e)) from None
    data = (
        f"the data in {spec.data_dir} ({manifest.dataset}: inputs of shape "
        f"{tuple(manifest.input_shape)}, {manifest.classes} classes)"
    )
    xb = torch.from_numpy(x[:FIT_SAMPLES])
    yb = torch.from_numpy(y[:FIT_SAMPLES])
    try:
        out = model(xb)
    except Exception as e:  # whatever a model raises on the wrong input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreflightError(f"model {spec.model} does not fit {data}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < manifest.classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PreflightError(
            f"model {spec.model} does not fit {data}: it gives outputs of shape {got} for "
            f"{len(yb)} samples, where ({len(yb)}, {manifest.classes}) class scores are needed"
        )
    try:
        torch.nn.functional.cross_entropy(out, yb).backward()
    except Exception as e:
        raise PreflightError(f"model {spec.model} cannot train on {data}: {e}") from None


def check_device(choice: str) -> None:
    """``cuda`` needs a CUDA device here."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise PreflightError("--device cuda: no CUDA device is available here (use cpu or auto)")


def check_stragglers(stragglers: list[tuple[int, float]], workers: int) -> None:
    """Every ``--straggler INDEX:FACTOR`` names one of the workers."""
    for index, factor in stragglers:
        if index >= workers:
            raise PreflightError(
                f"--straggler {index}:{factor:g}: there are {workers} workers "
                f"(indices 0 to {workers - 1})"
            )


def check_save_path(path: Path | None) -> None:
    """``--save PATH`` can be written when the job ends: a regular file or none yet, in a
    folder this process may write in."""
    if path is None:
        return
    try:
        outfile.check(path, "--save")  # a device, FIFO, directory or link is not replaced
    except OSError as e:
        raise PreflightError(str(e)) from None
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PreflightError(f"--save {path}: cannot write in {folder}")
