"""The layout: balance, splitting of large tensors, determinism."""

import random

import pytest

from protos.layout import TensorSpec, plan_layout, split_tensor

MIB = 1 << 20


def model_specs():
    return [
        TensorSpec("embed.weight", "float32", (1000, 1000)),  # ~3.8 MiB
        TensorSpec("fc1.weight", "float32", (512, 784)),
        TensorSpec("fc1.bias", "float32", (512,)),
        TensorSpec("fc2.weight", "float16", (10, 512)),
        TensorSpec("fc2.bias", "float64", (10,)),
        TensorSpec("empty", "float32", (0,)),
    ]


def test_every_element_is_held_exactly_once():
    layout = plan_layout(model_specs(), 3, MIB)
    for spec in model_specs():
        parts = sorted((p for p in layout.parts if p.tensor == spec.name), key=lambda p: p.index)
        assert [p.index for p in parts] == list(range(len(parts)))
        covered = 0
        for p in parts:
            assert p.start == covered and p.nbytes <= MIB
            covered = p.stop
        assert covered == spec.numel


def test_large_tensor_spans_servers():
    layout = plan_layout(model_specs(), 2, MIB)
    servers = {p.server for p in layout.parts if p.tensor == "embed.weight"}
    assert servers == {0, 1}


@pytest.mark.parametrize("num_servers", [1, 2, 3, 4, 7])
def test_bytes_are_balanced(num_servers):
    specs = model_specs()
    part_bytes = MIB // 4
    layout = plan_layout(specs, num_servers, part_bytes)
    loads = layout.bytes_per_server()
    assert sum(loads) == sum(s.nbytes for s in specs)
    # Greedy largest-first: no server exceeds another by more than one part.
    assert max(loads) - min(loads) <= part_bytes


def test_deterministic_and_independent_of_input_order():
    specs = model_specs()
    a = plan_layout(specs, 3, MIB)
    shuffled = specs[:]
    random.Random(1).shuffle(shuffled)
    b = plan_layout(shuffled, 3, MIB)
    assert a == b and a.digest == b.digest
    assert plan_layout(specs, 2, MIB).digest != a.digest


def test_split_sizes():
    spec = TensorSpec("w", "float32", (10,))
    assert split_tensor(spec, 16) == [(0, 4), (4, 4), (8, 2)]
    assert split_tensor(spec, 1) == [(i, 1) for i in range(10)]  # at least one element a part
    assert split_tensor(TensorSpec("e", "float32", (0,)), 16) == [(0, 0)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_servers"):
        plan_layout(model_specs(), 0, MIB)
    with pytest.raises(ValueError, match="unique"):
        plan_layout([TensorSpec("a", "float32", (1,))] * 2, 1, MIB)
