"""A worker's side of wire compression: each server's gradient pieces for one push.

Dense jobs send each tensor's values (in the job's gradient dtype, if it has
one). Top-k jobs send, per tensor, the largest-magnitude fraction of the
gradient plus what earlier pushes left unsent (error feedback): what is not
sent now, including the rounding of what is, is kept and added next time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from protos.codec import INDEX_DTYPE, Piece, dtype_of, to_raw, wire_dtype
from protos.compression import Compression
from protos.layout import Layout, server_pieces

PiecesFor = Callable[[int], list[Piece]]  # server index -> the pieces it receives


class GradientEncoder:
    """Encodes pushes for one job; holds the top-k residuals between pushes."""

    def __init__(self, layout: Layout, compression: Compression) -> None:
        self.layout = layout
        self.compression = compression
        self.wire_torch = (
            wire_dtype(compression.gradient_dtype).torch if compression.gradient_dtype else None
        )
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, grads: Mapping[str, torch.Tensor]) -> PiecesFor:
        """Each server's pieces of these flat gradients (top-k: updates the residuals now)."""
        if not self.compression.topk_ratio:
            cast = self.wire_torch
            if cast is None:
                raw = {n: to_raw(g) for n, g in grads.items()}
                return lambda i: server_pieces(self.layout, i, raw)
            raw = {n: to_raw(g.to(cast)) for n, g in grads.items()}
            dtypes = dict.fromkeys(grads, wire_dtype(cast))
            return lambda i: server_pieces(self.layout, i, raw, dtypes)
        chosen = {name: self._top_k(name, g) for name, g in grads.items()}
        return lambda i: self._sparse_pieces(i, chosen)

    def _top_k(self, name: str, grad: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
        """(sorted indices, raw values, wire dtype) of the k largest |grad + residual|."""
        acc = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        acc = acc + self.residual[name] if name in self.residual else acc.clone()
        k = max(1, math.ceil(self.compression.topk_ratio * acc.numel()))
        indices = torch.topk(acc.abs(), k, sorted=False).indices.sort().values
        values = acc[indices]
        sent = values.to(self.wire_torch or grad.dtype)
        acc[indices] -= sent.to(acc.dtype)  # what was sent leaves the residual; rounding stays
        self.residual[name] = acc
        return indices.cpu().numpy(), to_raw(sent), dtype_of(sent).name

    def _sparse_pieces(
        self, server: int, chosen: Mapping[str, tuple[np.ndarray, np.ndarray, str]]
    ) -> list[Piece]:
        pieces = []
        for p in self.layout.parts_on(server):
            indices, values, wire = chosen[p.tensor]
            lo, hi = np.searchsorted(indices, [p.start, p.stop])
            local = (indices[lo:hi] - p.start).astype(INDEX_DTYPE)
            pieces.append(Piece(p.tensor, p.index, 0, values[lo:hi], wire_dtype(wire), local))
        return pieces
