"""Round trips of the tensor codec for each dtype, empty and odd sizes."""

import numpy as np
import pytest
import torch

from protos import ps_pb2
from protos.codec import (
    CodecError,
    Piece,
    RawChunk,
    check_chunk,
    decode_frame,
    encode_frames,
    from_bytes,
    to_raw,
    to_torch,
    wire_dtype,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0,), (1,), (7,), (3, 5, 7), (1031, 3), (2, 0, 4)]


def send(value: np.ndarray | torch.Tensor, chunk_bytes: int = 1 << 20) -> list[list[RawChunk]]:
    """One tensor as one part, written as frames and read back: each message's chunks."""
    raw = to_raw(value)
    piece = Piece("w", 0, 0, raw, wire_dtype(value.dtype))
    return [decode_frame(m).chunks for m in encode_frames(None, [piece], chunk_bytes)]


def receive(chunks: list[RawChunk], numel: int, dtype) -> torch.Tensor:
    """Put a part's checked chunks back together, as a receiver does."""
    wire = wire_dtype(dtype)
    out = np.zeros(numel, dtype=wire.raw)
    for chunk in chunks:
        raw = check_chunk(chunk, wire, numel)
        out[chunk.offset : chunk.offset + raw.size] = raw
    assert sum(len(c.data) for c in chunks) == numel * wire.itemsize
    return to_torch(out, wire)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [6, 64, 1 << 20])
def test_torch_round_trip(dtype, shape, chunk_bytes):
    value = torch.randn(shape, dtype=torch.float64).to(dtype)
    messages = send(value, chunk_bytes)
    for m in messages:  # every message stays near the chunk size
        assert sum(len(c.data) for c in m) <= max(chunk_bytes, value.element_size())
    back = receive([c for m in messages for c in m], value.numel(), dtype).reshape(shape)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_round_trip(dtype):
    value = (np.arange(1001, dtype=np.float64) * 0.37).astype(dtype).reshape(7, 11, 13)
    chunks = [c for m in send(value, chunk_bytes=1000) for c in m]
    back = receive(chunks, value.size, np.dtype(dtype))
    np.testing.assert_array_equal(back.numpy().reshape(value.shape), value)


def test_a_chunk_decodes_without_copy():
    piece = Piece("x", 0, 0, to_raw(torch.arange(10, dtype=torch.float32)), wire_dtype("float32"))
    (message,) = encode_frames(None, [piece])
    (chunk,) = decode_frame(message).chunks
    raw = from_bytes(chunk.data, "float32")
    assert not raw.flags.owndata and np.array_equal(raw, piece.values)
    assert np.shares_memory(raw, np.frombuffer(message, dtype=np.uint8))


def test_noncontiguous_and_gpu_free_inputs():
    value = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    raw = to_raw(value)
    np.testing.assert_array_equal(raw, value.reshape(-1).numpy())


def test_packing_groups_small_tensors_into_one_message():
    pieces = [
        Piece(f"t{i}", 0, 0, np.ones(10, dtype="<f4"), wire_dtype("float32")) for i in range(20)
    ]
    messages = list(encode_frames(None, pieces, chunk_bytes=1 << 20))
    assert len(messages) == 1 and len(decode_frame(messages[0]).chunks) == 20
    messages = list(encode_frames(None, pieces, chunk_bytes=200))  # five 40-byte chunks each
    assert [len(decode_frame(m).chunks) for m in messages] == [5, 5, 5, 5]


def test_empty_tensor_is_still_sent():
    (message,) = send(np.ones(0, "<f4"))
    assert len(message) == 1 and message[0].tensor == "w" and bytes(message[0].data) == b""


def test_bad_chunks_are_rejected():
    wire = wire_dtype("float32")
    odd = RawChunk("w", 0, 0, wire.proto, memoryview(b"12345"))
    with pytest.raises(CodecError, match="not a whole number"):
        check_chunk(odd, wire, 10)
    wrong = RawChunk("w", 0, 0, ps_pb2.FLOAT64, memoryview(bytes(8)))
    with pytest.raises(CodecError, match="dtype float64, expected float32"):
        check_chunk(wrong, wire, 10)
    over = RawChunk("w", 0, 9, wire.proto, memoryview(bytes(8)))
    with pytest.raises(CodecError, match="exceed"):
        check_chunk(over, wire, 10)
    with pytest.raises(CodecError, match="unsupported dtype"):
        wire_dtype(torch.int32)


# ------------------------------------------------------------------ framing


def frame_pieces():
    torch.manual_seed(0)
    return [
        Piece("a", 0, 0, to_raw(torch.randn(1000)), wire_dtype("float32")),
        Piece("b", 1, 5, to_raw(torch.randn(3, dtype=torch.float64)), wire_dtype("float64")),
        Piece("é", 0, 0, to_raw(torch.randn(7).to(torch.bfloat16)), wire_dtype("bfloat16")),
        Piece("empty", 0, 0, to_raw(torch.randn(0)), wire_dtype("float32")),
    ]


@pytest.mark.parametrize("chunk_bytes", [100, 1000, 1 << 20])
def test_frames_are_valid_protobuf_with_aligned_data(chunk_bytes):
    header = ps_pb2.PushHeader(job_id="j", worker_id="w", clock=3).SerializeToString()
    frames = list(encode_frames(header, frame_pieces(), chunk_bytes))
    parsed = [ps_pb2.PushRequest.FromString(f) for f in frames]
    assert parsed[0].header.clock == 3
    assert not any(p.HasField("header") for p in parsed[1:])
    for frame, message in zip(frames, parsed, strict=True):
        decoded = decode_frame(frame)
        assert len(decoded.chunks) == len(message.chunks)
        for raw, chunk in zip(decoded.chunks, message.chunks, strict=True):
            assert (raw.tensor, raw.part, raw.offset, raw.dtype) == (
                chunk.tensor,
                chunk.part,
                chunk.offset,
                chunk.dtype,
            )
            assert bytes(raw.data) == chunk.data
            if len(raw.data):
                assert np.frombuffer(raw.data, np.uint8).ctypes.data % 8 == 0
    sent = b"".join(c.data for m in parsed for c in m.chunks)
    assert sent == b"".join(p.values.tobytes() for p in frame_pieces())


def test_protobuf_serialized_messages_decode_too():
    chunk = ps_pb2.TensorChunk(tensor="w", part=2, offset=7, dtype=ps_pb2.FLOAT16, data=b"abcd")
    message = ps_pb2.PullResponse(header=ps_pb2.PullHeader(version=9), chunks=[chunk, chunk])
    frame = decode_frame(message.SerializeToString())
    assert ps_pb2.PullHeader.FromString(bytes(frame.header)).version == 9
    assert [(c.tensor, c.part, c.offset, c.dtype, bytes(c.data)) for c in frame.chunks] == [
        ("w", 2, 7, ps_pb2.FLOAT16, b"abcd")
    ] * 2


def test_empty_stream_still_sends_the_header():
    (frame,) = encode_frames(b"\x08\x01", [])
    assert ps_pb2.PushRequest.FromString(frame).header.job_id == ""
    assert decode_frame(frame).header is not None


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x12\x05ab",  # a chunk running past the end
        b"\x12",  # truncated length
        b"\x00\x01",  # field number 0
        b"\x0f",  # wire type 7
        b"\x12\x02\x08",  # a chunk whose varint is truncated
        b"\x12\x02\x0a\x00" + b"\x12\x03\x0a\x01\xff",  # a tensor name that is not UTF-8
        b"\x10\x01",  # header field as a varint
    ],
)
def test_malformed_frames_raise_codec_errors(garbage):
    with pytest.raises(CodecError, match="malformed"):
        decode_frame(garbage)


@pytest.mark.parametrize("numel", [56, 57, 58, 59, 60, 8185, 8186])
def test_chunks_whose_length_prefix_crosses_a_varint_boundary_decode(numel):
    """Found by hypothesis: padding that grows a chunk's length prefix by a byte (near 128 or
    16,384 bytes) once produced a message whose chunk ran past its end."""
    values = to_raw(torch.randn(numel).to(torch.bfloat16))
    for shift in range(8):  # the header's length moves where the chunk starts
        piece = Piece("t", 0, 0, values, wire_dtype("bfloat16"))
        (message,) = encode_frames(b"h" * shift, [piece])
        (chunk,) = decode_frame(message).chunks
        assert bytes(chunk.data) == values.tobytes()
