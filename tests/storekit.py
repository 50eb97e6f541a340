"""Helpers to drive a ParameterStore directly, without sockets."""

from __future__ import annotations

import torch

from protos.codec import DEFAULT_CHUNK_BYTES, Piece, RawChunk, decode_frame, encode_frames, to_raw
from protos.job import Job, Mode, Settings
from protos.layout import TensorSpec, plan_layout, server_pieces
from protos.optimizers import SGD
from ps_server.store import ParameterStore

SPECS = [
    TensorSpec("big", "float32", (40,)),  # 160 bytes: four parts at part_bytes=48
    TensorSpec("bias", "float32", (3,)),
    TensorSpec("scale", "float64", (2, 2)),
]
PART_BYTES = 48


def make_job(
    mode: str = "async",
    workers=(),
    server_index: int = 0,
    num_servers: int = 1,
    optimizer=None,
    lr: float = 1.0,
    **kw,
) -> Job:
    settings = Settings(
        mode=Mode(mode),
        optimizer=optimizer or SGD(),
        lr=lr,
        part_bytes=PART_BYTES,
        **{"staleness": 0, **kw},
    )
    layout = plan_layout(SPECS, num_servers, PART_BYTES)
    return Job("job", settings, layout, server_index, tuple(workers))


def initial_values() -> dict[str, torch.Tensor]:
    return {
        s.name: torch.arange(s.numel, dtype=torch.float64)
        .reshape(s.shape)
        .to({"float32": torch.float32, "float64": torch.float64}[s.dtype])
        for s in SPECS
    }


def raw_chunks(pieces: list[Piece], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[RawChunk]:
    """The chunks a server reads from the frames a client writes: what production feeds."""
    return [c for m in encode_frames(None, pieces, chunk_bytes) for c in decode_frame(m).chunks]


def chunks_for(
    job: Job, values: dict[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[RawChunk]:
    flat = {name: to_raw(v) for name, v in values.items()}
    return raw_chunks(server_pieces(job.layout, job.server_index, flat), chunk_bytes)


def grads(value: float) -> dict[str, torch.Tensor]:
    """A gradient equal to ``value`` everywhere."""
    return {name: torch.full_like(v, value) for name, v in initial_values().items()}


class FakeClock:
    """A clock the test moves: ``clock()`` is now, ``clock.advance(s)`` passes time."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def new_store(mode: str = "async", now=None, **kw) -> tuple[ParameterStore, Job]:
    """A store holding a fresh job; ``now`` is its clock (a FakeClock), real time if None."""
    store = ParameterStore() if now is None else ParameterStore(now=now)
    job = make_job(mode, **kw)
    assert store.initialise(job, chunks_for(job, initial_values()))
    return store, job


def weights(store: ParameterStore) -> dict[str, torch.Tensor]:
    """Reassemble the tensors from the store's parts (single-server jobs)."""
    job = store.job
    assert job is not None
    out = {}
    for spec in job.layout.specs:
        flat = torch.empty(
            spec.numel, dtype={"float32": torch.float32, "float64": torch.float64}[spec.dtype]
        )
        for part in job.layout.parts_on(job.server_index):
            if part.tensor == spec.name:
                flat[part.start : part.stop] = store.values(part.tensor, part.index)
        out[spec.name] = flat.reshape(spec.shape)
    return out


def push(
    store: ParameterStore,
    job: Job,
    worker: str,
    clock: int,
    value: float,
    pulled: int | None = None,
    session: str = "",
):
    return store.push(
        "job",
        worker,
        clock,
        store.version if pulled is None else pulled,
        chunks_for(job, grads(value)),
        session,
    )


def frames(header, job: Job, values: dict[str, torch.Tensor]) -> list[bytes]:
    """The stream messages of an Init or Push carrying ``header`` and this server's parts of
    ``values``: what a client sends, for raw gRPC calls to a real server."""
    flat = {name: to_raw(v) for name, v in values.items()}
    pieces = server_pieces(job.layout, job.server_index, flat)
    return list(encode_frames(header.SerializeToString(), pieces, DEFAULT_CHUNK_BYTES))
