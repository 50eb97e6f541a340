"""Round trips of the tensor codec for each dtype, empty and odd sizes."""

import numpy as np
import pytest
import torch

from protos import ps_pb2
from protos.codec import (
    CodecError,
    Piece,
    check_chunk,
    decode_tensor,
    encode_tensor,
    from_bytes,
    pack_chunks,
    to_raw,
    wire_dtype,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0,), (1,), (7,), (3, 5, 7), (1031, 3), (2, 0, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [6, 64, 1 << 20])
def test_torch_round_trip(dtype, shape, chunk_bytes):
    value = torch.randn(shape, dtype=torch.float64).to(dtype)
    messages = encode_tensor("w", value, chunk_bytes=chunk_bytes)
    chunks = [c for m in messages for c in m]
    for m in messages:  # every message stays near the chunk size
        assert sum(len(c.data) for c in m) <= max(chunk_bytes, value.element_size())
    back = decode_tensor(chunks, shape, wire_dtype(dtype).name)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_round_trip(dtype):
    value = (np.arange(1001, dtype=np.float64) * 0.37).astype(dtype).reshape(7, 11, 13)
    messages = encode_tensor("x", value, chunk_bytes=1000)
    back = decode_tensor([c for m in messages for c in m], value.shape, np.dtype(dtype).name)
    np.testing.assert_array_equal(back.numpy(), value)


def test_single_chunk_decodes_without_copy():
    value = torch.arange(10, dtype=torch.float32)
    (message,) = encode_tensor("x", value)
    data = message[0].data
    raw = from_bytes(data, "float32")
    assert raw.base is not None and not raw.flags.owndata
    assert np.shares_memory(raw, np.frombuffer(data, dtype=np.uint8))


def test_noncontiguous_and_gpu_free_inputs():
    value = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    raw = to_raw(value)
    np.testing.assert_array_equal(raw, value.reshape(-1).numpy())


def test_packing_groups_small_tensors_into_one_message():
    pieces = [
        Piece(f"t{i}", 0, 0, np.ones(10, dtype="<f4"), wire_dtype("float32")) for i in range(20)
    ]
    messages = list(pack_chunks(pieces, chunk_bytes=1 << 20))
    assert len(messages) == 1 and len(messages[0]) == 20
    messages = list(pack_chunks(pieces, chunk_bytes=200))  # five 40-byte chunks per message
    assert [len(m) for m in messages] == [5, 5, 5, 5]


def test_empty_tensor_is_still_sent():
    messages = list(pack_chunks([Piece("e", 0, 0, np.ones(0, "<f4"), wire_dtype("float32"))]))
    assert len(messages) == 1 and messages[0][0].tensor == "e" and messages[0][0].data == b""


def test_bad_chunks_are_rejected():
    wire = wire_dtype("float32")
    odd = ps_pb2.TensorChunk(tensor="w", dtype=wire.proto, data=b"12345")
    with pytest.raises(CodecError, match="not a whole number"):
        check_chunk(odd, wire, 10)
    wrong = ps_pb2.TensorChunk(tensor="w", dtype=ps_pb2.FLOAT64, data=bytes(8))
    with pytest.raises(CodecError, match="dtype float64, expected float32"):
        check_chunk(wrong, wire, 10)
    over = ps_pb2.TensorChunk(tensor="w", offset=9, dtype=wire.proto, data=bytes(8))
    with pytest.raises(CodecError, match="exceed"):
        check_chunk(over, wire, 10)
    with pytest.raises(CodecError, match="unsupported dtype"):
        wire_dtype(torch.int32)
    (message,) = encode_tensor("w", torch.ones(4))
    with pytest.raises(CodecError, match="3 of 4"):
        decode_tensor(
            [ps_pb2.TensorChunk(tensor="w", dtype=wire.proto, data=bytes(12))], (4,), "float32"
        )
    assert decode_tensor(message, (4,), "float32").sum() == 4
