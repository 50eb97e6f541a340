"""A model's tensors as the job sees them: checked, flat, and in the job's dtypes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from protos.codec import CodecError, dtype_of
from protos.layout import Layout
from ps_worker.errors import InvalidRequestError

Tensors = Mapping[str, torch.Tensor | np.ndarray]


def module_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in module.named_parameters()
    }


def named(tensors: Tensors | torch.nn.Module) -> dict[str, torch.Tensor | np.ndarray]:
    if isinstance(tensors, torch.nn.Module):
        return {n: p.detach() for n, p in tensors.named_parameters()}
    return dict(tensors)


def dtype_name(value: torch.Tensor | np.ndarray) -> str:
    try:
        return dtype_of(value).name
    except CodecError as e:
        raise InvalidRequestError(str(e)) from None


def check_names(layout: Layout, names: Iterable[str]) -> None:
    got = set(names)
    want = {s.name for s in layout.specs}
    if got != want:
        missing = ", ".join(sorted(want - got)) or "none"
        extra = ", ".join(sorted(got - want)) or "none"
        raise InvalidRequestError(
            f"tensors do not match the job's model: missing {missing}; unexpected {extra}"
        )


def checked_grads(layout: Layout, grads: Tensors) -> dict[str, torch.Tensor]:
    """Flat gradients (on their own device) in the job's dtypes, checked against the model."""
    check_names(layout, grads.keys())
    flat = {}
    for spec in layout.specs:
        g = grads[spec.name]
        if tuple(g.shape) != spec.shape:
            raise InvalidRequestError(
                f"gradient for {spec.name!r} has shape {tuple(g.shape)}, "
                f"the tensor's is {spec.shape}"
            )
        wanted = layout.dtypes[spec.name].torch
        if isinstance(g, np.ndarray):
            g = torch.from_numpy(g)
        flat[spec.name] = (g if g.dtype == wanted else g.to(wanted)).reshape(-1)
    return flat


def module_destinations(
    layout: Layout, module: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Flat tensors to pull into, and a function that moves staged ones into the module.

    A contiguous CPU parameter of the job's dtype is written in place; others
    (on a GPU, say) are staged on the CPU and copied once each.
    """
    params = dict(module.named_parameters())
    check_names(layout, params.keys())
    dest = {}
    staged = {}
    for spec in layout.specs:
        p = params[spec.name].data
        if tuple(p.shape) != spec.shape:
            raise InvalidRequestError(
                f"parameter {spec.name!r} has shape {tuple(p.shape)}, the job's is {spec.shape}"
            )
        wanted = layout.dtypes[spec.name].torch
        if p.device.type == "cpu" and p.is_contiguous() and p.dtype == wanted:
            dest[spec.name] = p.view(-1)
        else:
            dest[spec.name] = staged[spec.name] = torch.empty(spec.numel, dtype=wanted)

    def finish() -> None:
        with torch.no_grad():
            for name, flat in staged.items():
                params[name].data.copy_(flat.view(params[name].shape))

    return dest, finish


def module_state(
    layout: Layout, module: torch.nn.Module, weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``module.state_dict()``'s keys, its parameters from ``weights`` (the servers'), the
    rest (buffers, which the servers do not hold) from the module: CPU copies, one per key,
    so that ``load_state_dict(..., strict=True)`` takes it and safetensors can save it."""
    params = dict(module.named_parameters())  # one name per parameter, as the layout has
    check_names(layout, params.keys())
    name_of = {id(p): name for name, p in params.items()}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in module.state_dict(keep_vars=True).items():
        name = name_of.get(id(value))
        if name is None:
            state[key] = value.detach().to("cpu", copy=True)
        else:  # a tied parameter appears under several keys: each gets its own copy
            state[key] = weights[name] if name not in used else weights[name].clone()
            used.add(name)
    return state
