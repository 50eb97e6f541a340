"""Wire compression: the spec, sparse chunks, the store's decoding, error feedback, and a
real client and server moving half the bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from protos.codec import (
    CodecError,
    Piece,
    check_chunk,
    check_sparse_chunk,
    decode_frame,
    encode_frames,
    to_raw,
    wire_dtype,
)
from protos.compression import Compression, CompressionError
from protos.job import Job, JobError
from ps_server.errors import InvalidArgument
from ps_server.store import ParameterStore
from ps_worker import Client
from ps_worker.compress import GradientEncoder
from ps_worker.errors import InvalidRequestError
from scheduler.launch import servers
from tests.storekit import SPECS, grads, initial_values, make_job, raw_chunks
from tests.test_metrics import scrape

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", Compression()),
        ("bf16", Compression("bfloat16", "bfloat16")),
        ("FP16", Compression("float16", "float16")),
        ("topk:0.01", Compression(topk_ratio=0.01)),
        ("bf16, topk:0.1", Compression("bfloat16", "bfloat16", 0.1)),
    ],
)
def test_specs_parse_and_round_trip(text, expected):
    parsed = Compression.parse(text)
    assert parsed == expected
    assert Compression.from_proto(parsed.to_proto()) == parsed
    assert Compression.parse(str(parsed)) == parsed
    assert parsed.enabled == (text != "none")


@pytest.mark.parametrize("text", ["int8", "topk:0", "topk:1", "topk:x", "bf16,fp16", "topk:nan"])
def test_bad_specs_are_refused(text):
    with pytest.raises(CompressionError):
        Compression.parse(text)


def sparse_piece(indices, values, dtype="float32") -> Piece:
    wire = wire_dtype(dtype)
    raw = np.asarray(values, dtype=np.float32)
    raw = torch.tensor(raw).to(wire.torch)
    return Piece("t", 0, 0, to_raw(raw), wire, np.asarray(indices, dtype="<u4"))


def test_sparse_chunks_round_trip_even_when_split():
    piece = sparse_piece(range(0, 2000, 2), np.arange(1000) * 0.5)
    messages = list(encode_frames(b"h", [piece], chunk_bytes=1024))
    assert len(messages) > 1
    got_i, got_v = [], []
    for message in messages:
        for chunk in decode_frame(message).chunks:
            i, v = check_sparse_chunk(chunk, wire_dtype("float32"), 2000)
            got_i.append(i)
            got_v.append(v)
            with pytest.raises(CodecError, match="sparse"):
                check_chunk(chunk, wire_dtype("float32"), 2000)
    assert np.array_equal(np.concatenate(got_i), np.arange(0, 2000, 2))
    assert np.array_equal(np.concatenate(got_v), np.arange(1000) * 0.5)


def test_bad_sparse_chunks_are_refused():
    (chunk,) = raw_chunks([sparse_piece([1, 9], [1.0, 2.0])])
    with pytest.raises(CodecError, match="past its 5 values"):
        check_sparse_chunk(chunk, wire_dtype("float32"), 5)
    chunk = replace(chunk, indices=chunk.indices[:4])
    with pytest.raises(CodecError, match="1 indices for 2 values"):
        check_sparse_chunk(chunk, wire_dtype("float32"), 50)
    chunk = replace(chunk, indices=memoryview(b"\x00" * 5))
    with pytest.raises(CodecError, match="whole uint32"):
        check_sparse_chunk(chunk, wire_dtype("float32"), 50)


def test_a_jobs_compression_travels_in_its_config_and_must_match():
    job = make_job(compression=Compression.parse("bf16,topk:0.25"))
    assert Job.from_proto(job.to_proto()) == job
    store = ParameterStore()
    store.initialise(job, chunks(job, initial_values()))
    plain = make_job()
    with pytest.raises(Exception, match="compression"):
        store.initialise(plain, chunks(plain, initial_values()))
    bad = job.to_proto()
    bad.compression.topk_ratio = 7.0
    with pytest.raises(JobError, match="top-k ratio"):
        Job.from_proto(bad)


def chunks(job, values, compression: Compression | None = None):
    encoder = GradientEncoder(job.layout, compression or Compression())
    flat = {n: v.reshape(-1) for n, v in values.items()}
    pieces = encoder.encode(flat)(job.server_index)
    return raw_chunks(pieces)


def test_bf16_gradients_apply_rounded_and_weights_stay_full_precision():
    compression = Compression.parse("bf16")
    job = make_job(compression=compression)
    store = ParameterStore()
    store.initialise(job, chunks(job, initial_values()))
    g = {n: torch.full_like(v, 0.1) for n, v in initial_values().items()}
    with pytest.raises(InvalidArgument, match="expected bfloat16"):
        store.push("job", "w", 1, 0, chunks(job, g))  # float32 on the wire: refused
    store.push("job", "w", 1, 0, chunks(job, g, compression))
    expected = initial_values()["big"] - torch.tensor(0.1).to(torch.bfloat16).float()
    assert torch.equal(store.values("big", 0), expected[: store.values("big", 0).numel()])
    _, _, pieces = store.pull("job", "w")
    assert {p.dtype.name for p in pieces} == {"bfloat16"}
    assert store.values("big", 0).dtype == torch.float32  # the master copy


def test_top_k_with_error_feedback_loses_nothing():
    compression = Compression(topk_ratio=0.1)
    job = make_job(compression=compression)
    store = ParameterStore()
    store.initialise(job, chunks(job, initial_values()))
    encoder = GradientEncoder(job.layout, compression)
    rng = np.random.default_rng(0)
    total = {s.name: torch.zeros(s.numel, dtype=torch.float64) for s in SPECS}
    for clock in range(1, 21):
        g = {
            s.name: torch.tensor(rng.normal(size=s.numel)).to(initial_values()[s.name].dtype)
            for s in SPECS
        }
        pieces = encoder.encode(g)(0)
        sent = sum(p.values.size for p in pieces)
        assert sent == sum(max(1, -(-s.numel // 10)) for s in SPECS)  # k per tensor
        store.push("job", "w", clock, store.version, raw_chunks(pieces))
        for name in total:
            total[name] += g[name].double()
    for spec in SPECS:  # SGD, lr 1: applied = initial - weights; applied + residual = sum
        weights = torch.cat(
            [
                store.values(spec.name, p.index)
                for p in job.layout.parts_on(0)
                if p.tensor == spec.name
            ]
        )
        applied = initial_values()[spec.name].reshape(-1).double() - weights.double()
        residual = encoder.residual[spec.name].double()
        assert torch.allclose(applied + residual, total[spec.name], atol=1e-4)


def test_a_top_k_push_must_name_every_part():
    compression = Compression(topk_ratio=0.5)
    job = make_job(compression=compression)
    store = ParameterStore()
    store.initialise(job, chunks(job, initial_values()))
    some = chunks(job, grads(1.0), compression)[1:]
    with pytest.raises(InvalidArgument, match="no chunk sent"):
        store.push("job", "w", 1, 0, some)
    assert store.version == 0


@pytest.mark.integration
def test_bf16_halves_the_bytes_a_real_server_moves(tmp_path):
    model = {"w": torch.zeros(4096), "b": torch.zeros(64)}
    moved = {}
    for compression in ("none", "bf16"):
        (tmp_path / compression).mkdir()
        with (
            servers(1, tmp_path / compression, "--metrics-port", "0") as (daemon,),
            Client([daemon.address], job_id="j", worker_id="w") as c,
        ):
            url = f"http://{daemon.metrics_address}/metrics"
            c.init(model, mode="async", optimizer="sgd", lr=1.0, compression=compression)
            # Same host: shared memory, unless the job compresses (then its Unix socket).
            assert c.transports == (["shm"] if compression == "none" else ["unix"])
            before = scrape(url)
            c.push({k: torch.full_like(v, 0.1) for k, v in model.items()})
            pulled = c.pull()
            after = scrape(url)
        moved[compression] = (
            after["ps_bytes_in_total"] - before["ps_bytes_in_total"],
            after["ps_bytes_out_total"] - before["ps_bytes_out_total"],
        )
        if compression == "bf16":
            assert torch.all(pulled["w"] == -torch.tensor(0.1).to(torch.bfloat16).float())
            assert pulled["w"].dtype == torch.float32
    assert moved["none"] == (4160 * 4, 4160 * 4)
    assert moved["bf16"] == (4160 * 2, 4160 * 2)


@pytest.mark.integration
def test_top_k_through_two_servers_encodes_each_push_once(tmp_path):
    """Both servers' threads ask for the pieces; the residual must move once per push."""
    rng = np.random.default_rng(1)
    model = {"w": torch.zeros(3000), "b": torch.zeros(40)}
    total = {k: torch.zeros_like(v) for k, v in model.items()}
    with (
        servers(2, tmp_path) as daemons,
        Client([d.address for d in daemons], job_id="k", worker_id="w") as c,
    ):
        c.init(model, mode="async", optimizer="sgd", lr=1.0, compression="topk:0.1")
        for _ in range(10):
            g = {
                k: torch.tensor(rng.normal(size=v.numel()), dtype=v.dtype) for k, v in model.items()
            }
            c.push(g)
            for k in total:
                total[k] += g[k]
        weights = c.pull()
        residual = c._encoder.residual
    for k in model:  # SGD, lr 1, from zeros: -weights is what was applied
        assert torch.allclose(-weights[k] + residual[k], total[k], atol=1e-5)


def test_unknown_compression_is_refused_before_anything_is_sent(tmp_path):
    with Client(["127.0.0.1:1"], job_id="j") as c, pytest.raises(InvalidRequestError):
        c.init({"w": torch.zeros(3)}, compression="zip")
