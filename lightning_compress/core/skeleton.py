"""Copies of a model without its weights: parameters on the meta device (shapes only, no memory).

:func:`meta_copy` keeps a model's architecture (its modules, their attributes, tied parameters) at no cost;
:func:`materialize_` gives such a copy real, uninitialized parameters to load a state into. The export at the
end of a sharded (FSDP2) fit uses both: the copy is taken before ``fully_shard`` changes the modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["deep_copy", "materialize_", "meta_copy"]


def meta_copy(model: nn.Module, buffers: bool = True, share: Iterable[object] = ()) -> nn.Module:
    """A deep copy of ``model`` whose parameters (and buffers, with ``buffers=True``) are on the meta device.

    ``buffers=False`` copies the buffers with their values (non-persistent ones, such as rotary frequencies,
    are in no state dict). ``share``: objects the copy refers to instead of copying (e.g. a device mesh).
    Parameters shared by several modules stay shared in the copy.
    """
    memo: dict[int, Any] = {id(obj): obj for obj in share}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    if buffers:
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
    return deep_copy(model, memo)


def deep_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, also when a forward cached tensors with a gradient history in plain attributes
    (LeViT's attention biases in eval mode; MONAI's DynUNet keeps its deep supervision heads' outputs in a list):
    deepcopy refuses those, so the copy holds them detached."""
    memo = {} if memo is None else memo
    for module in model.modules():
        for value in vars(module).values():
            held = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else (value,)
            for cached in held:
                if isinstance(cached, torch.Tensor) and not cached.is_leaf and id(cached) not in memo:
                    memo[id(cached)] = cached.detach()
    return copy.deepcopy(model, memo)


def materialize_(
    model: nn.Module, device: torch.device | str = "cpu", dtypes: Mapping[str, torch.dtype] | None = None
) -> nn.Module:
    """Give every meta-device parameter and buffer of ``model`` uninitialized storage on ``device``, in place.

    ``dtypes``: the dtype of each parameter or buffer, by qualified name, where it should differ from the copy's
    (e.g. the model was converted to bfloat16 after the copy was taken); buffers with values are converted too.
    Tied parameters stay tied. Returns ``model``.
    """
    dtypes = dtypes or {}
    made: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = dtypes.get(f"{prefix}.{name}" if prefix else name, param.dtype)
            if id(param) not in made and (param.is_meta or param.dtype != dtype):
                made[id(param)] = nn.Parameter(
                    torch.empty_like(param, device=device, dtype=dtype) if param.is_meta else param.detach().to(dtype),
                    requires_grad=param.requires_grad,
                )
            if id(param) in made:
                module.register_parameter(name, made[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            dtype = dtypes.get(f"{prefix}.{name}" if prefix else name, buffer.dtype)
            if id(buffer) not in made and (buffer.is_meta or buffer.dtype != dtype):
                made[id(buffer)] = (
                    torch.empty_like(buffer, device=device, dtype=dtype) if buffer.is_meta else buffer.to(dtype)
                )
            if id(buffer) in made:
                setattr(module, name, made[id(buffer)])  # an existing buffer: stays (non-)persistent
    return model
