"""Server-side optimizers, elementwise, matching ``torch.optim`` step for step.

Each optimizer updates a parameter in place from a gradient and its state.
Because every operation is elementwise, the same step may be applied to a
slice of a part (param, grad and each state tensor sliced alike), which is
how large pushes are applied chunk by chunk. The formulas follow torch's
single-tensor implementations operation for operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

State = dict[str, Tensor]


@dataclass(frozen=True)
class SGD:
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be non-negative")

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
class Adam:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("Adam betas must lie in [0, 1)")
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError("eps and weight_decay must be non-negative")

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
class Adagrad:
    lr_decay: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if min(self.lr_decay, self.eps, self.weight_decay, self.initial_accumulator_value) < 0:
            raise ValueError("Adagrad options must be non-negative")

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
