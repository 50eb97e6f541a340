"""Server-side optimizers against torch.optim on the same gradient sequence."""

import pytest
import torch

from protos.optimizers import SGD, Adagrad, Adam

CASES = [
    (SGD(), torch.optim.SGD, {}),
    (SGD(momentum=0.9), torch.optim.SGD, {"momentum": 0.9}),
    (SGD(momentum=0.9, dampening=0.1), torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),
    (SGD(momentum=0.9, nesterov=True), torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (
        SGD(momentum=0.5, weight_decay=0.01),
        torch.optim.SGD,
        {"momentum": 0.5, "weight_decay": 0.01},
    ),
    (Adam(), torch.optim.Adam, {}),
    (
        Adam(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
        torch.optim.Adam,
        {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    ),
    (Adagrad(), torch.optim.Adagrad, {}),
    (
        Adagrad(lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1),
        torch.optim.Adagrad,
        {"lr_decay": 0.01, "weight_decay": 0.05, "initial_accumulator_value": 0.1},
    ),
]


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), CASES, ids=lambda c: repr(c)[:40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "in-slices"])
def test_matches_torch_optim(ours, theirs, kwargs, dtype, sliced):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(1000, generator=gen, dtype=dtype)
    grads = [torch.randn(1000, generator=gen, dtype=dtype) for _ in range(25)]
    lr = 0.05

    reference = torch.nn.Parameter(init.clone())
    opt = theirs([reference], lr=lr, foreach=False, **kwargs)
    for g in grads:
        reference.grad = g.clone()
        opt.step()

    param = init.clone()
    state = ours.init_state(param)
    for step, g in enumerate(grads, start=1):
        bounds = [(0, 333), (333, 999), (999, 1000)] if sliced else [(0, 1000)]
        for a, b in bounds:
            ours.step(param[a:b], g[a:b], {k: v[a:b] for k, v in state.items()}, step, lr)

    torch.testing.assert_close(param, reference.detach(), rtol=1e-6, atol=1e-7)


def test_invalid_options():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        Adam(beta1=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        Adagrad(eps=-1)
