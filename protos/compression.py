"""Compression on the wire, chosen per job.

A job's compression says how its tensor data travels; the servers always
keep full-precision weights and optimizer state.

- ``fp16`` / ``bf16``: gradients and weights travel as float16 / bfloat16,
  half the bytes of float32.
- ``topk:R``: each pushed gradient tensor sends only its largest-magnitude
  fraction R of elements as (index, value) pairs. The worker keeps what it
  did not send and adds it to its next gradient (error feedback), so nothing
  is lost, only delayed.
- ``bf16,topk:R`` (or ``fp16,topk:R``): both.

Over the same-host shared-memory path there is no wire to save, so a
compressing job's workers use streams (tcp or unix) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos import ps_pb2
from protos.codec import CodecError, wire_dtype

SHORT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "float16": "float16", "bfloat16": "bfloat16"}


class CompressionError(ValueError):
    """A compression spec that cannot be used."""


@dataclass(frozen=True)
class Compression:
    gradient_dtype: str | None = None  # wire dtype of gradients; None: the tensor's own
    weight_dtype: str | None = None  # wire dtype of weights; None: the tensor's own
    topk_ratio: float = 0.0  # 0: dense gradients

    def __post_init__(self) -> None:
        for what, dtype in (("gradient", self.gradient_dtype), ("weight", self.weight_dtype)):
            if dtype is not None and dtype not in ("float16", "bfloat16", "float32"):
                raise CompressionError(
                    f"{what} dtype {dtype!r}: choose float16, bfloat16 or float32"
                )
        if not (math.isfinite(self.topk_ratio) and 0.0 <= self.topk_ratio < 1.0):
            raise CompressionError(
                f"top-k ratio {self.topk_ratio} must be in (0, 1), or 0 for dense gradients"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.gradient_dtype or self.weight_dtype or self.topk_ratio)

    @classmethod
    def parse(cls, text: str | None) -> Compression:
        """``none``, ``fp16``, ``bf16``, ``topk:R``, or a dtype and top-k joined by a comma."""
        dtype, ratio = None, 0.0
        for item in (text or "none").replace(" ", "").lower().split(","):
            if item in ("", "none"):
                continue
            if item in SHORT_DTYPES:
                if dtype is not None:
                    raise CompressionError(f"compression {text!r}: more than one dtype")
                dtype = SHORT_DTYPES[item]
            elif item.startswith("topk:"):
                try:
                    ratio = float(item.removeprefix("topk:"))
                except ValueError:
                    raise CompressionError(
                        f"compression {text!r}: topk:R needs a number R, e.g. topk:0.01"
                    ) from None
                if ratio <= 0:
                    raise CompressionError(f"compression {text!r}: top-k ratio must be > 0")
            else:
                raise CompressionError(
                    f"compression {text!r}: unknown item {item!r} "
                    "(use none, fp16, bf16, topk:R, or e.g. bf16,topk:0.01)"
                )
        return cls(dtype, dtype, ratio)

    def __str__(self) -> str:
        items = []
        if self.gradient_dtype or self.weight_dtype:
            same = self.gradient_dtype == self.weight_dtype
            items.append(
                f"{self.gradient_dtype}" if same else f"{self.gradient_dtype}/{self.weight_dtype}"
            )
        if self.topk_ratio:
            items.append(f"topk:{self.topk_ratio:g}")
        return ",".join(items) or "none"

    def to_proto(self) -> ps_pb2.Compression:
        return ps_pb2.Compression(
            gradient_dtype=wire_dtype(self.gradient_dtype).proto if self.gradient_dtype else 0,
            weight_dtype=wire_dtype(self.weight_dtype).proto if self.weight_dtype else 0,
            topk_ratio=self.topk_ratio,
        )

    @classmethod
    def from_proto(cls, message: ps_pb2.Compression) -> Compression:
        """Validate a Compression message; raises CompressionError."""
        try:
            gradient = wire_dtype(message.gradient_dtype).name if message.gradient_dtype else None
            weight = wire_dtype(message.weight_dtype).name if message.weight_dtype else None
        except CodecError as e:
            raise CompressionError(f"compression: {e}") from None
        return cls(gradient, weight, message.topk_ratio)
