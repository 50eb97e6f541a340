"""``ps-export``: a job's server checkpoints reassembled into one ``.safetensors`` model file.

A server's checkpoint holds only its own parts of the model, back to back in
one buffer per dtype (:mod:`ps_server.flat`). This reads the current
checkpoint of every server of one job, checks that they belong together (one
job, one layout, every server index exactly once) and puts every tensor back
together by the layout, so that::

    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

loads the trained weights. The file holds the model's parameters (what a
client initialises the servers with: ``named_parameters()``), not its buffers
(BatchNorm's running statistics never reach the servers: load such a model
with ``strict=False``), and no optimizer state.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.message import DecodeError
from safetensors.torch import save_file

from protos import outfile
from protos.job import Job, JobError
from ps_server import checkpoint
from ps_server.checkpoint import MANIFEST, CheckpointError
from ps_server.flat import FlatParams


class ExportError(ValueError):
    """Checkpoints that cannot be read, or that do not make up one whole model."""


@dataclass(frozen=True)
class ServerShare:
    """One server's checkpointed parameters: its job and one flat buffer per dtype."""

    source: str  # where it was read from, for messages
    job: Job
    params: dict[str, torch.Tensor]  # dtype name -> the server's parts, back to back
    version: int


def share_of(snap: checkpoint.Snapshot, source: str) -> ServerShare:
    """The parameters a checkpoint holds (its optimizer state is left behind)."""
    try:
        state = checkpoint._state(snap)  # the checkpoint module's own decoding
    except (JobError, DecodeError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{source}: the checkpoint does not describe a job: {e}") from None
    job = state.view.job
    assert job is not None
    params = {name: group.param for name, group in state.groups.items()}
    return ServerShare(source, job, params, state.view.version)


def reassemble(shares: Sequence[ServerShare]) -> dict[str, torch.Tensor]:
    """Every tensor of the model, whole, from the shares of all of one job's servers.

    Pure: no I/O. ExportError (one line) when the shares are of different jobs
    or layouts, a server is missing or given twice, or a buffer does not fit.
    """
    if not shares:
        raise ExportError("no checkpoints given")
    first = shares[0]
    for share in shares[1:]:
        if share.job.job_id != first.job.job_id:
            raise ExportError(
                f"checkpoints of different jobs: {first.job.job_id!r} in {first.source}, "
                f"{share.job.job_id!r} in {share.source}"
            )
        if share.job.layout.digest != first.job.layout.digest:
            raise ExportError(
                f"job {first.job.job_id!r} has two layouts: {first.job.layout.digest} in "
                f"{first.source}, {share.job.layout.digest} in {share.source} (checkpoints "
                "of different runs?)"
            )
    layout = first.job.layout
    by_index: dict[int, ServerShare] = {}
    for share in shares:
        seen = by_index.setdefault(share.job.server_index, share)
        if seen is not share:
            raise ExportError(
                f"server {share.job.server_index} given twice: {seen.source} and {share.source}"
            )
    missing = [i for i in range(layout.num_servers) if i not in by_index]
    if missing:
        raise ExportError(
            f"job {first.job.job_id!r} has {layout.num_servers} servers; no checkpoint of "
            f"server {', '.join(map(str, missing))} was given"
        )
    flat = {s.name: torch.empty(s.numel, dtype=layout.dtypes[s.name].torch) for s in layout.specs}
    for index, share in sorted(by_index.items()):
        held = FlatParams(share.job)  # where each part sits in its dtype's buffer
        for name, group in held.groups.items():
            buffer = share.params.get(name)
            if buffer is None or (buffer.shape, buffer.dtype) != (
                group.param.shape,
                group.param.dtype,
            ):
                raise ExportError(
                    f"{share.source}: its {name} parameters do not fit server {index}'s share "
                    "of the layout"
                )
        for slot in held.slots.values():
            source = share.params[slot.group][slot.start : slot.stop]
            flat[slot.part.tensor][slot.part.start : slot.part.stop] = source
    return {s.name: flat[s.name].reshape(s.shape) for s in layout.specs}


def checkpoint_dirs(paths: Iterable[Path]) -> list[Path]:
    """Server checkpoint directories: each path is one (it holds a manifest), or a folder
    of them such as a ``ps-cluster`` work dir's ``checkpoints/`` (server0, server1, ...;
    a finished job's are deleted when it is ended on the servers)."""
    found: list[Path] = []
    for path in paths:
        if (path / MANIFEST).is_file():
            found.append(path)
            continue
        inner = sorted(p.parent for p in path.glob(f"*/{MANIFEST}")) if path.is_dir() else []
        if not inner:
            raise ExportError(f"no server checkpoint in {path} (nor in its subdirectories)")
        found += inner
    return found


def read_shares(paths: Iterable[Path]) -> list[ServerShare]:
    """The current checkpoint of every server directory under ``paths``, decoded."""
    shares = []
    for directory in checkpoint_dirs(paths):
        try:
            snap = checkpoint.read(directory)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        if snap is None:  # the manifest went away since it was listed
            raise ExportError(f"no server checkpoint in {directory}")
        shares.append(share_of(snap, str(directory)))
    return shares


def write_model(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write the tensors as one safetensors file, atomically (a new file, then a rename;
    never in place of a device, FIFO, socket, directory or symbolic link)."""
    whole = {k: v.contiguous() for k, v in tensors.items()}
    outfile.write(out, "--out", lambda tmp: save_file(whole, tmp, metadata))


def export(paths: Iterable[Path], out: Path) -> tuple[list[ServerShare], dict[str, torch.Tensor]]:
    """Read the checkpoints, reassemble the model and write it to ``out``."""
    shares = read_shares(paths)
    tensors = reassemble(shares)
    ordered = sorted(shares, key=lambda s: s.job.server_index)
    write_model(
        tensors,
        out,
        {
            "job_id": shares[0].job.job_id,
            "layout_digest": shares[0].job.layout.digest,
            "server_versions": ",".join(str(s.version) for s in ordered),
        },
    )
    return ordered, tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-export",
        description="Write one job's server checkpoints as one .safetensors model file, "
        "loadable with model.load_state_dict(safetensors.torch.load_file(PATH)). It holds the "
        "model's parameters (not its buffers, which never reach the servers: load a model "
        "with buffers using strict=False) and no optimizer state.",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        nargs="+",
        required=True,
        metavar="DIR",
        help="every server's --checkpoint-dir, or a folder of them (the checkpoints/ of a "
        "ps-cluster work dir whose job was not ended); each server's current checkpoint is read",
    )
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        outfile.check(args.out, "--out")  # before any work
    except OSError as e:
        print(f"ps-export: {e}", file=sys.stderr)
        return 2
    try:
        shares, tensors = export(args.checkpoints, args.out)
    except (ExportError, OSError) as e:
        print(f"ps-export: {e}", file=sys.stderr)
        return 1
    numel = sum(t.numel() for t in tensors.values())
    print(
        f"wrote {args.out}: {len(tensors)} tensors, {numel} parameters of job "
        f"{shares[0].job.job_id!r} from {len(shares)} server(s) at versions "
        f"{[s.version for s in shares]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
