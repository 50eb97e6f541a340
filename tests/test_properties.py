"""Property-based tests (hypothesis) of the tensor codec and the layout.

For any model and any message size, what the codec writes decodes to the
same values, aligned; any bytes at all either decode or raise CodecError;
and any layout covers every element once, within the part size, balanced.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.codec import WIRE_DTYPES, CodecError, decode_frame, encode_frames, to_raw
from protos.layout import TensorSpec, plan_layout, server_pieces

pytestmark = pytest.mark.timeout(120)

names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)
dtypes = st.sampled_from(sorted(WIRE_DTYPES))
shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
specs = st.lists(st.tuples(names, dtypes, shapes), min_size=1, max_size=6, unique_by=lambda t: t[0])


def values_of(spec: TensorSpec, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(spec.numel, generator=generator).to(WIRE_DTYPES[spec.dtype].torch)


@settings(max_examples=30, deadline=None)
@given(
    specs=specs,
    servers=st.integers(1, 4),
    part_bytes=st.integers(1, 300),
    chunk_bytes=st.integers(1, 500),
    seed=st.integers(0, 1000),
)
def test_what_is_encoded_decodes_to_the_same_values(specs, servers, part_bytes, chunk_bytes, seed):
    model = [TensorSpec(n, d, s) for n, d, s in specs]
    layout = plan_layout(model, servers, part_bytes)
    flat = {s.name: to_raw(values_of(s, seed)) for s in model}
    for server in range(servers):
        pieces = server_pieces(layout, server, flat)
        messages = list(encode_frames(b"header", pieces, chunk_bytes))
        got: dict[tuple[str, int], dict[int, bytes]] = {}
        for i, message in enumerate(messages):
            frame = decode_frame(message)
            assert (frame.header is not None) == (i == 0)
            base = np.frombuffer(message, np.uint8).ctypes.data
            for chunk in frame.chunks:
                got.setdefault((chunk.tensor, chunk.part), {})[chunk.offset] = bytes(chunk.data)
                if len(chunk.data):  # raw values start 8-byte aligned within the message
                    assert (np.frombuffer(chunk.data, np.uint8).ctypes.data - base) % 8 == 0
        for piece in pieces:
            runs = got[(piece.tensor, piece.part)]
            itemsize = piece.dtype.itemsize
            joined = b"".join(runs[o] for o in sorted(runs))
            assert sorted(runs)[0] == 0
            assert joined == piece.values.tobytes()
            offsets = sorted(runs)
            for a, b in itertools.pairwise(offsets):  # contiguous runs
                assert a + len(runs[a]) // itemsize == b


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_codec_error(data):
    try:
        frame = decode_frame(data)
    except CodecError:
        return
    for chunk in frame.chunks:
        assert isinstance(chunk.tensor, str) and chunk.offset >= 0


@settings(max_examples=80, deadline=None)
@given(specs=specs, servers=st.integers(1, 5), part_bytes=st.integers(1, 400))
def test_layouts_cover_every_element_once_within_the_part_size(specs, servers, part_bytes):
    model = [TensorSpec(n, d, s) for n, d, s in specs]
    layout = plan_layout(model, servers, part_bytes)
    assert layout.digest == plan_layout(model, servers, part_bytes).digest  # deterministic
    for spec in model:
        parts = sorted((p for p in layout.parts if p.tensor == spec.name), key=lambda p: p.index)
        assert [p.index for p in parts] == list(range(len(parts)))
        covered = 0
        for p in parts:
            assert p.start == covered and 0 <= p.server < servers
            assert p.nbytes <= max(part_bytes, spec.itemsize)
            covered += p.count
        assert covered == spec.numel
    loads = layout.bytes_per_server()
    biggest = max(p.nbytes for p in layout.parts)
    assert max(loads) - min(loads) <= biggest  # largest-first keeps servers balanced
