"""The optimizers a job may name: their options, the registry, and the update itself.

``OPTIMIZERS`` is the one table of optimizer names: argparse choices, job
specs, ``Client.init``, ``DistributedOptimizer`` and the wire mapping all
derive from it. An optimizer's options travel as the proto message of the
same name (``OptimizerConfig.sgd``, ``.adam``, ``.adagrad``), field for field;
this is checked against the proto at import.

The update runs on the servers. Each optimizer updates a parameter in place
from a gradient and its state. Because every operation is elementwise, the
same step may be applied to a slice of a part (param, grad and each state
tensor sliced alike), which is how large pushes are applied chunk by chunk.
The formulas follow torch's single-tensor implementations operation for
operation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from protos import ps_pb2

State = dict[str, Tensor]


class OptimizerError(ValueError):
    """An unknown optimizer, an option it does not have, or an option out of range."""


class _Options:
    """Shared by every optimizer: the name, the options' types, and the options to and from
    the wire."""

    name: ClassVar[str]

    def _check_types(self) -> None:
        """Each option is of its default's type: a bool option is True or False, a number
        option a finite real number (stored as a float). Runs before the range checks."""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise OptimizerError(
                        f"{self.name} option {f.name} must be true or false, got {value!r}"
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptimizerError(f"{self.name} option {f.name} must be a number, got {value!r}")
            try:
                value = float(value)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise OptimizerError(
                    f"{self.name} option {f.name} must be a finite number, got {value!r}"
                )
            object.__setattr__(self, f.name, value)

    def options(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_proto(self, lr: float) -> ps_pb2.OptimizerConfig:
        message = getattr(ps_pb2.OptimizerConfig(), self.name).__class__(**self.options())
        return ps_pb2.OptimizerConfig(lr=lr, **{self.name: message})

    def __str__(self) -> str:
        defaults = type(self)()
        changed = [
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.options().items()
            if getattr(defaults, k) != v
        ]
        return f"{self.name}({', '.join(changed)})"


@dataclass(frozen=True)
class SGD(_Options):
    name: ClassVar[str] = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise OptimizerError("nesterov momentum needs momentum > 0 and dampening = 0")
        if self.momentum < 0 or self.weight_decay < 0:
            raise OptimizerError("momentum and weight_decay must be non-negative")
        if not 0 <= self.dampening <= 1:
            raise OptimizerError(f"SGD dampening must lie in [0, 1]: it is {self.dampening}")

    def init_state(self, param: Tensor) -> State:
        return {"momentum_buffer": torch.zeros_like(param)} if self.momentum else {}

    def step(self, param: Tensor, grad: Tensor, state: State, step: int, lr: float) -> None:
        d_p = grad
        if self.weight_decay:
            d_p = d_p.add(param, alpha=self.weight_decay)
        if self.momentum:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(d_p)
            else:
                buf.mul_(self.momentum).add_(d_p, alpha=1 - self.dampening)
            d_p = d_p.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.add_(d_p, alpha=-lr)


@dataclass(frozen=True)
class Adam(_Options):
    name: ClassVar[str] = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(self, beta) < 1:
                raise OptimizerError(
                    f"Adam betas must lie in [0, 1): {beta} is {getattr(self, beta)}"
                )
        if self.eps < 0 or self.weight_decay < 0:
            raise OptimizerError("eps and weight_decay must be non-negative")
        if self.eps == 0:  # a zero gradient element would divide 0 by 0: NaN weights
            raise OptimizerError("Adam eps must be positive")

    def init_state(self, param: Tensor) -> State:
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def step(self, param: Tensor, grad: Tensor, state: State, step: int, lr: float) -> None:
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**step
        bias_correction2 = 1 - self.beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


@dataclass(frozen=True)
class Adagrad(_Options):
    name: ClassVar[str] = "adagrad"
    lr_decay: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        if min(self.lr_decay, self.eps, self.weight_decay, self.initial_accumulator_value) < 0:
            raise OptimizerError("Adagrad options must be non-negative")
        if self.eps == 0:  # a zero gradient element would divide 0 by 0: NaN weights
            raise OptimizerError("Adagrad eps must be positive")

    def init_state(self, param: Tensor) -> State:
        return {"sum": torch.full_like(param, self.initial_accumulator_value)}

    def step(self, param: Tensor, grad: Tensor, state: State, step: int, lr: float) -> None:
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        clr = lr / (1 + (step - 1) * self.lr_decay)
        state_sum = state["sum"]
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(self.eps)
        param.addcdiv_(grad, std, value=-clr)


Optimizer = SGD | Adam | Adagrad

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Adam, Adagrad)}
# Every option of every optimizer, with its type: the flags and job-file keys derive from it.
OPTION_TYPES: dict[str, type] = {
    f.name: type(f.default) for cls in OPTIMIZERS.values() for f in fields(cls)
}


def make_optimizer(name: str, **options: Any) -> Optimizer:
    """The optimizer ``name`` with ``options``; OptimizerError names what is wrong."""
    if name not in OPTIMIZERS:
        raise OptimizerError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    cls = OPTIMIZERS[name]
    own = [f.name for f in fields(cls)]
    foreign = sorted(set(options) - set(own))
    if foreign:
        raise OptimizerError(
            f"{', '.join(foreign)}: not an option of {name} (its options: {', '.join(own)})"
        )
    return cls(**options)


def optimizer_from_proto(config: ps_pb2.OptimizerConfig) -> Optimizer:
    """The optimizer an OptimizerConfig names; OptimizerError if none or out of range."""
    kind = config.WhichOneof("kind")
    if kind is None:
        raise OptimizerError(f"optimizer: none given ({', '.join(OPTIMIZERS)})")
    message = getattr(config, kind)
    return make_optimizer(
        kind, **{f.name: getattr(message, f.name) for f in fields(OPTIMIZERS[kind])}
    )


def _check_against_proto() -> None:
    """The registry and the wire agree: a oneof member per optimizer, a field per option."""
    oneof = ps_pb2.OptimizerConfig.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.name for f in oneof.fields} == set(OPTIMIZERS), "OptimizerConfig.kind != OPTIMIZERS"
    for f in oneof.fields:
        wire = {x.name for x in f.message_type.fields}
        assert wire == {x.name for x in fields(OPTIMIZERS[f.name])}, f"{f.name} options != proto"


_check_against_proto()
