"""Tensor codec: numpy arrays and torch tensors to chunk messages and back.

Values travel as raw little-endian bytes beside their dtype. A tensor part
is cut into chunks of at most ``chunk_bytes`` and small chunks are packed
together, so every message carries about ``chunk_bytes`` of data. Decoding
is ``numpy.frombuffer`` over the message's bytes: no copy.

bfloat16 has no numpy dtype: its raw values travel and decode as uint16
and :func:`to_torch` reinterprets them as ``torch.bfloat16``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from protos import ps_pb2

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB messages measured fastest (docs/design.md, wire rules)


@dataclass(frozen=True)
class WireDType:
    """How one dtype is named, stored raw and viewed in torch."""

    name: str
    proto: int
    raw: np.dtype  # the numpy dtype of the raw little-endian values
    torch: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.raw.itemsize


WIRE_DTYPES: dict[str, WireDType] = {
    d.name: d
    for d in (
        WireDType("float32", ps_pb2.FLOAT32, np.dtype("<f4"), torch.float32),
        WireDType("float16", ps_pb2.FLOAT16, np.dtype("<f2"), torch.float16),
        WireDType("bfloat16", ps_pb2.BFLOAT16, np.dtype("<u2"), torch.bfloat16),
        WireDType("float64", ps_pb2.FLOAT64, np.dtype("<f8"), torch.float64),
    )
}
_BY_PROTO = {d.proto: d for d in WIRE_DTYPES.values()}
_BY_TORCH = {d.torch: d for d in WIRE_DTYPES.values()}


class CodecError(ValueError):
    """A chunk or tensor that cannot be encoded or decoded."""


class TooManyChunks(CodecError):
    """A message with more chunks than its reader allows."""


def wire_dtype(dtype: str | int | torch.dtype | np.dtype) -> WireDType:
    """Look up a supported dtype by name, proto enum, torch or numpy dtype."""
    found: WireDType | None
    if isinstance(dtype, str):
        found = WIRE_DTYPES.get(dtype)
    elif isinstance(dtype, torch.dtype):
        found = _BY_TORCH.get(dtype)
    elif isinstance(dtype, int):
        found = _BY_PROTO.get(dtype)
    else:
        found = WIRE_DTYPES.get(np.dtype(dtype).name)
    if found is None:
        supported = ", ".join(WIRE_DTYPES)
        raise CodecError(f"unsupported dtype {dtype!r} (supported: {supported})")
    return found


def dtype_of(value: np.ndarray | torch.Tensor) -> WireDType:
    """The wire dtype of an array or tensor."""
    return wire_dtype(value.dtype)


def to_raw(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A flat, contiguous, little-endian numpy view of the values (bfloat16 as uint16).

    Copies only when the input is not already a contiguous CPU array of
    the wire layout.
    """
    wire = dtype_of(value)
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        if wire.name == "bfloat16":
            flat = flat.view(torch.int16)
        array = flat.numpy()
    else:
        array = np.asarray(value).reshape(-1)
    return np.ascontiguousarray(array).view(wire.raw)


def from_bytes(data: bytes | memoryview, dtype: WireDType | str | int) -> np.ndarray:
    """Decode raw bytes without copying; the result is read-only."""
    wire = dtype if isinstance(dtype, WireDType) else wire_dtype(dtype)
    if len(data) % wire.itemsize:
        raise CodecError(f"{len(data)} bytes is not a whole number of {wire.name} values")
    return np.frombuffer(data, dtype=wire.raw)


def to_torch(raw: np.ndarray, dtype: WireDType | str | int) -> torch.Tensor:
    """View raw values as a CPU torch tensor of the wire dtype (no copy)."""
    wire = dtype if isinstance(dtype, WireDType) else wire_dtype(dtype)
    if raw.flags.writeable:
        tensor = torch.from_numpy(raw)
    else:  # torch warns when it wraps a read-only buffer; decoded chunks are only read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(raw)
    return tensor.view(torch.bfloat16) if wire.name == "bfloat16" else tensor


@dataclass(frozen=True)
class Piece:
    """A run of raw values to send: ``values`` are elements offset.. of a part."""

    tensor: str
    part: int
    offset: int
    values: np.ndarray  # raw, flat, contiguous
    dtype: WireDType
    indices: np.ndarray | None = None  # sparse (top-k): "<u4" element indices of values


INDEX_DTYPE = np.dtype("<u4")


def split_piece(piece: Piece, chunk_bytes: int) -> Iterator[Piece]:
    """Cut a piece into pieces of at most chunk_bytes (at least one element each)."""
    sparse = piece.indices is not None
    per_chunk = max(1, chunk_bytes // (piece.dtype.itemsize + (INDEX_DTYPE.itemsize * sparse)))
    n = piece.values.size
    if n <= per_chunk:
        yield piece
        return
    for start in range(0, n, per_chunk):
        yield Piece(
            piece.tensor,
            piece.part,
            piece.offset if sparse else piece.offset + start,
            piece.values[start : start + per_chunk],
            piece.dtype,
            piece.indices[start : start + per_chunk] if sparse else None,
        )


def group_pieces(pieces: Iterable[Piece], chunk_bytes: int) -> Iterator[list[Piece]]:
    """Cut pieces to at most chunk_bytes and group them into messages of about chunk_bytes."""
    batch: list[Piece] = []
    batch_bytes = 0
    for whole in pieces:
        for piece in split_piece(whole, chunk_bytes):
            size = piece.values.nbytes + (0 if piece.indices is None else piece.indices.nbytes)
            if batch and batch_bytes + size > chunk_bytes:
                yield batch
                batch, batch_bytes = [], 0
            batch.append(piece)
            batch_bytes += size
    if batch:
        yield batch


def check_chunk(chunk: RawChunk, wire: WireDType, part_numel: int) -> np.ndarray:
    """Decode a dense chunk and check its dtype and that it fits a part of part_numel values."""
    if chunk.indices:
        raise CodecError(
            f"tensor {chunk.tensor!r} part {chunk.part}: sparse (top-k) values where dense "
            "ones are expected"
        )
    return _check_values(chunk, wire, part_numel)


def check_sparse_chunk(
    chunk: RawChunk, wire: WireDType, part_numel: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a top-k chunk: (indices, values), checked against a part of part_numel values."""
    where = f"tensor {chunk.tensor!r} part {chunk.part}"
    if chunk.offset:
        raise CodecError(f"{where}: a sparse chunk's offset must be 0")
    raw_indices = chunk.indices if chunk.indices is not None else memoryview(b"")
    if len(raw_indices) % INDEX_DTYPE.itemsize:
        raise CodecError(f"{where}: {len(raw_indices)} index bytes are not whole uint32 values")
    indices = np.frombuffer(raw_indices, dtype=INDEX_DTYPE)
    values = _check_values(chunk, wire, 1 << 62)
    if indices.size != values.size:
        raise CodecError(f"{where}: {indices.size} indices for {values.size} values")
    if indices.size and int(indices.max()) >= part_numel:
        raise CodecError(f"{where}: index {int(indices.max())} is past its {part_numel} values")
    repeated = first_repeat(indices)
    if repeated is not None:
        raise CodecError(f"{where}: index {repeated} is sent twice")
    return indices, values


def first_repeat(indices: np.ndarray) -> int | None:
    """An index that occurs more than once in ``indices`` (None if all differ)."""
    if indices.size < 2:
        return None
    ordered = np.sort(indices)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    return int(ordered[same[0]]) if same.size else None


def _check_values(chunk: RawChunk, wire: WireDType, part_numel: int) -> np.ndarray:
    if chunk.dtype != wire.proto:
        got = _BY_PROTO[chunk.dtype].name if chunk.dtype in _BY_PROTO else str(chunk.dtype)
        raise CodecError(
            f"tensor {chunk.tensor!r} part {chunk.part}: dtype {got}, expected {wire.name}"
        )
    data = chunk.data
    if len(data) % wire.itemsize:
        raise CodecError(
            f"tensor {chunk.tensor!r} part {chunk.part}: {len(data)} bytes is not a whole "
            f"number of {wire.name} values"
        )
    raw = from_bytes(data, wire)
    if chunk.offset + raw.size > part_numel:
        raise CodecError(
            f"tensor {chunk.tensor!r} part {chunk.part}: elements {chunk.offset}.."
            f"{chunk.offset + raw.size} exceed its {part_numel} values"
        )
    return raw


# --------------------------------------------------------------------------
# Framing: stream messages (InitRequest, PushRequest, PullResponse all have
# `header = 1` and `repeated TensorChunk chunks = 2`) written and read
# directly as protobuf wire bytes, so tensor data is copied once into the
# outgoing message and never out of the incoming one.

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_TAG_HEADER = bytes([1 << 3 | _WIRE_LEN])
_TAG_CHUNK = bytes([2 << 3 | _WIRE_LEN])
_TAG_DATA = bytes([5 << 3 | _WIRE_LEN])
_TAG_PADDING = 6 << 3 | _WIRE_LEN
ALIGN = 8


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _padding(n: int) -> bytes:
    """A padding field of exactly n bytes (n >= 2)."""
    return bytes([_TAG_PADDING, n - 2]) + bytes(n - 2)


def _chunk_frame(piece: Piece, position: int) -> list[bytes | memoryview]:
    """The wire bytes of one `chunks` entry that starts at ``position`` of its message."""
    meta = ps_pb2.TensorChunk(
        tensor=piece.tensor,
        part=piece.part,
        offset=piece.offset,
        dtype=piece.dtype.proto,
        indices=b"" if piece.indices is None else piece.indices.tobytes(),
    ).SerializeToString()
    data = memoryview(piece.values).cast("B") if piece.values.size else memoryview(b"")
    data_head = _TAG_DATA + _varint(len(data))
    # The padding changes the chunk's length prefix, whose size moves the data again (and
    # may oscillate near a varint boundary): take the smallest padding that lands the data
    # on the boundary with the prefix it produces. A padding field takes at least 2 bytes.
    for pad in (0, *range(2, 2 + 2 * ALIGN)):
        head = _TAG_CHUNK + _varint(len(meta) + pad + len(data_head) + len(data))
        if (position + len(head) + len(meta) + pad + len(data_head)) % ALIGN == 0:
            break
    else:  # unreachable: 2 * ALIGN consecutive paddings cover every residue
        raise AssertionError("no padding aligns the chunk")
    padding = _padding(pad) if pad else b""
    return [head, meta, padding, data_head, data]


def encode_frames(
    header: bytes | None, pieces: Iterable[Piece], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Serialized stream messages: the header (already serialized) in the first, chunks in all.

    Each message is valid protobuf for InitRequest, PushRequest and
    PullResponse; tensor data starts 8-byte aligned within it.
    """
    first = True
    for group in group_pieces(pieces, chunk_bytes):
        yield _frame(header if first else None, group)
        first = False
    if first:
        yield _frame(header, [])


def _frame(header: bytes | None, group: list[Piece]) -> bytes:
    parts: list[bytes | memoryview] = []
    position = 0
    if header is not None:
        parts += [_TAG_HEADER + _varint(len(header)), header]
        position = len(parts[0]) + len(header)
    for piece in group:
        frame = _chunk_frame(piece, position)
        parts += frame
        position += sum(len(f) for f in frame)
    return b"".join(parts)


@dataclass(frozen=True)
class RawChunk:
    """A chunk read from wire bytes; ``data`` is a view into the message (no copy)."""

    tensor: str
    part: int
    offset: int
    dtype: int
    data: memoryview
    indices: memoryview | None = None  # sparse (top-k) chunks only


@dataclass(frozen=True)
class Frame:
    header: memoryview | None
    chunks: list[RawChunk]


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CodecError("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of every field: varints as ints, length-delimited as views."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CodecError("malformed message: field number 0")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, value
        elif wire == _WIRE_LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise CodecError("malformed message: a field runs past the end")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire in (_WIRE_I64, _WIRE_I32):
            pos += 8 if wire == _WIRE_I64 else 4
            if pos > end:
                raise CodecError("malformed message: a field runs past the end")
        else:
            raise CodecError(f"malformed message: unsupported wire type {wire}")


def _read_chunk(buf: memoryview) -> RawChunk:
    tensor, part, offset, dtype, data = "", 0, 0, 0, memoryview(b"")
    indices: memoryview | None = None
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, memoryview):
            try:
                tensor = str(value, "utf-8")
            except UnicodeDecodeError:
                raise CodecError("malformed message: tensor name is not UTF-8") from None
        elif number == 2 and isinstance(value, int):
            part = value
        elif number == 3 and isinstance(value, int):
            offset = value
        elif number == 4 and isinstance(value, int):
            dtype = value
        elif number == 5 and isinstance(value, memoryview):
            data = value
        elif number == 7 and isinstance(value, memoryview):
            indices = value
        elif number in (1, 2, 3, 4, 5, 7):
            raise CodecError(f"malformed message: chunk field {number} has the wrong wire type")
    return RawChunk(tensor, part, offset, dtype, data, indices)


def decode_frame(message: bytes, max_chunks: int | None = None) -> Frame:
    """Read a serialized stream message without copying tensor data; CodecError if malformed
    or if it has more than ``max_chunks`` chunks (counted as they are read: a message of
    millions of empty chunks is refused at the first one over)."""
    return decode_chunks(memoryview(message), max_chunks)


def split_header(message: bytes) -> tuple[memoryview | None, memoryview]:
    """(the header, the rest) of a message whose first field is its header, else (None, all):
    the header read before any chunk, so that its claims can bound the chunks."""
    buf = memoryview(message)
    if not buf:
        return None, buf
    key, pos = _read_varint(buf, 0)
    if key != 1 << 3 | _WIRE_LEN:
        return None, buf
    size, pos = _read_varint(buf, pos)
    if pos + size > len(buf):
        raise CodecError("malformed message: a field runs past the end")
    return buf[pos : pos + size], buf[pos + size :]


def decode_chunks(buf: memoryview, max_chunks: int | None = None) -> Frame:
    """The header (if any) and chunks of a message's fields; see :func:`decode_frame`."""
    header: memoryview | None = None
    chunks: list[RawChunk] = []
    for number, value in _fields(buf):
        if not isinstance(value, memoryview):
            if number in (1, 2):
                raise CodecError(f"malformed message: field {number} has the wrong wire type")
            continue
        if number == 1:
            header = value
        elif number == 2:
            if max_chunks is not None and len(chunks) >= max_chunks:
                raise TooManyChunks(f"more than {max_chunks} chunks")
            chunks.append(_read_chunk(value))
    return Frame(header, chunks)
