"""Layout: which server holds which part of which tensor.

A pure, deterministic function of (tensor specs, server count, part size).
Each tensor is cut into parts of at most ``part_bytes``; parts are assigned
largest first to the server holding the fewest bytes so far (ties: lowest
server index), so bytes per server are balanced, large tensors span several
servers and small ones are packed.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from protos.codec import Piece, WireDType, wire_dtype

DEFAULT_PART_BYTES = 4 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return wire_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Part:
    """Elements [start, start + count) of the flattened tensor, held by one server."""

    tensor: str
    index: int
    start: int
    count: int
    server: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.count * self.itemsize

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Layout:
    """The assignment of every tensor part to a server."""

    specs: tuple[TensorSpec, ...]
    num_servers: int
    part_bytes: int
    parts: tuple[Part, ...]

    def parts_on(self, server: int) -> list[Part]:
        """The parts one server holds, in (tensor, index) order."""
        return [p for p in self.parts if p.server == server]

    @cached_property
    def dtypes(self) -> dict[str, WireDType]:
        """The wire dtype of each tensor, by name."""
        return {s.name: wire_dtype(s.dtype) for s in self.specs}

    def bytes_per_server(self) -> list[int]:
        totals = [0] * self.num_servers
        for p in self.parts:
            totals[p.server] += p.nbytes
        return totals

    @cached_property
    def digest(self) -> str:
        """A short fingerprint that servers compare to their own computation."""
        doc = {
            "specs": [[s.name, s.dtype, list(s.shape)] for s in self.specs],
            "num_servers": self.num_servers,
            "part_bytes": self.part_bytes,
            "parts": [[p.tensor, p.index, p.start, p.count, p.server] for p in self.parts],
        }
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def split_tensor(spec: TensorSpec, part_bytes: int) -> list[tuple[int, int]]:
    """(start, count) of each part of a tensor; an empty tensor has one empty part."""
    per_part = max(1, part_bytes // spec.itemsize)
    if spec.numel == 0:
        return [(0, 0)]
    return [(s, min(per_part, spec.numel - s)) for s in range(0, spec.numel, per_part)]


def plan_layout(specs: Iterable[TensorSpec], num_servers: int, part_bytes: int) -> Layout:
    """Assign tensor parts to servers, balancing bytes per server."""
    specs = tuple(specs)
    if num_servers < 1:
        raise ValueError(f"num_servers must be at least 1, got {num_servers}")
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    # Largest first; ties broken by name and index so the result never depends on input order.
    pieces = sorted(
        (-count * itemsize, spec.name, index, start, count, itemsize)
        for spec, itemsize in ((spec, spec.itemsize) for spec in specs)
        for index, (start, count) in enumerate(split_tensor(spec, part_bytes))
    )
    # (bytes held, server): the heap's least is the server holding the fewest, lowest index
    # first; O(parts x log servers), where a scan of every server per part took minutes
    load = [(0, server) for server in range(num_servers)]
    parts = []
    for size, name, index, start, count, itemsize in pieces:
        held, server = load[0]
        heapq.heapreplace(load, (held - size, server))
        parts.append(Part(name, index, start, count, server, itemsize))
    parts.sort(key=lambda p: (p.tensor, p.index))
    return Layout(tuple(sorted(specs, key=lambda s: s.name)), num_servers, part_bytes, tuple(parts))


def server_pieces(
    layout: Layout,
    server: int,
    flat: Mapping[str, np.ndarray],
    dtypes: Mapping[str, WireDType] | None = None,
) -> list[Piece]:
    """The pieces of raw flat tensors that one server holds, in layout order.

    ``flat`` maps every tensor name to its raw values (:func:`protos.codec.to_raw`),
    in the layout's dtypes unless ``dtypes`` says otherwise (compressed gradients).
    """
    dtypes = dtypes or layout.dtypes
    return [
        Piece(p.tensor, p.index, 0, flat[p.tensor][p.start : p.stop], dtypes[p.tensor])
        for p in layout.parts_on(server)
    ]
