"""Built-in models, and user models given as ``package.module:function``."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable

import torch
from torch import nn

from protos.recipes import RECIPES


class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's 5,210-parameter CNN (input length 40, 10 classes)."""

    def __init__(self, channels: int = 25, classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for kernel in (5, 3, 3):
            out = (out + 2 - kernel) // 2 + 1
        self.linear = nn.Linear(channels * out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 1, -1)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


def mlp(inputs: int, hidden: int, classes: int, layers: int = 2) -> nn.Module:
    dims = [inputs] + [hidden] * layers
    blocks: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(dims):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    blocks.append(nn.Linear(dims[-1], classes))
    return nn.Sequential(*blocks)


BUILTIN: dict[str, Callable[[], nn.Module]] = {
    "mnist1d-cnn": MNIST1DCNN,
    "mnist1d-mlp": lambda: mlp(40, 100, 10),
    "digits-mlp": lambda: mlp(64, 128, 10, layers=1),
}


assert set(BUILTIN) == set(RECIPES), "every built-in model has a recipe (protos/recipes.py)"


class ModelError(ValueError):
    """A model name that names nothing buildable."""


def build_model(name: str, seed: int) -> nn.Module:
    """Build a model with seeded initial weights (identical in every worker)."""
    factory = BUILTIN.get(name) or _import_factory(name)
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(name: str) -> Callable[[], nn.Module]:
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(
            f"unknown model {name!r}: use one of {', '.join(BUILTIN)} or package.module:function"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"cannot load model {name!r}: {e} (is the directory holding it on PYTHONPATH, "
            "for every process of the job?)"
        ) from None
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot load model {name!r}: {e}") from None
    if not callable(factory):
        raise ModelError(f"{name} is not callable")
    return factory
