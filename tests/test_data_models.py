"""Data shards and models, without sockets."""

import json

import numpy as np
import pytest
import torch

from ps_worker.data import DataError, load, prepare, read_manifest
from ps_worker.models import ModelError, build_model


def test_prepare_digits_writes_shards_test_file_and_manifest(tmp_path):
    manifest = prepare("digits", tmp_path, shards=5, seed=1)
    assert read_manifest(tmp_path) == manifest
    assert manifest.input_shape == (64,) and manifest.classes == 10
    assert len(manifest.shards) == 5 and manifest.train_samples + manifest.test.samples == 1797
    x, y = load(tmp_path, manifest.shards[0])
    assert x.dtype == np.float32 and y.dtype == np.int64 and len(x) == manifest.shards[0].samples
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_mnist1d_is_generated_locally(tmp_path):
    manifest = prepare("mnist1d", tmp_path, shards=4, samples=1000)
    assert manifest.input_shape == (40,) and manifest.train_samples == 800
    x, _ = load(tmp_path, manifest.test)
    assert x.dtype == np.float32 and x.shape == (200, 40)


def test_user_shards_with_a_manifest(tmp_path):
    prepare("digits", tmp_path, shards=2)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["dataset"] = "mine"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert read_manifest(tmp_path).dataset == "mine"


def test_corrupt_or_missing_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="run `ps-data prepare` first"):
        read_manifest(tmp_path)
    manifest = prepare("digits", tmp_path, shards=2)
    path = tmp_path / manifest.shards[1].file
    corrupt = bytearray(path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match="checksum"):
        load(tmp_path, manifest.shards[1])
    with pytest.raises(DataError, match="too many shards"):
        prepare("digits", tmp_path / "x", shards=10_000)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="malformed"):
        read_manifest(tmp_path)


def test_builtin_models():
    cnn = build_model("mnist1d-cnn", 0)
    assert sum(p.numel() for p in cnn.parameters()) == 5210  # the MNIST-1D paper's CNN
    assert cnn(torch.randn(3, 40)).shape == (3, 10)
    assert build_model("digits-mlp", 0)(torch.randn(2, 64)).shape == (2, 10)
    a, b = build_model("mnist1d-mlp", 7), build_model("mnist1d-mlp", 7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_user_models_by_import_path():
    model = build_model("torch.nn:Identity", 0)
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet", 0)
    with pytest.raises(ModelError, match=r"cannot load model.*on PYTHONPATH"):
        build_model("no_such_package.models:make", 0)
    with pytest.raises(ModelError, match=r"cannot load model.*has no attribute"):
        build_model("torch.nn:NoSuchModule", 0)
    with pytest.raises(ModelError, match=r"not a torch\.nn\.Module"):
        build_model("builtins:dict", 0)
