"""Multiply-accumulates of one forward, counted on the model itself (forward hooks on the layers).

Counted: ``nn.Linear`` and ``transformers``' Conv1D (``output elements x input features``), every
``nn.ConvNd`` (``output elements x input channels per group x kernel size``). Attention products,
norms and activations are not counted: on the models this package compacts, the layers hold
almost all of the compute, and the count is what channel pruning changes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .layers import linear_like_types, weight_axes
from .tracing import call_model, eval_mode

__all__ = ["count_macs", "layer_macs"]


def layer_macs(module: nn.Module, output: Tensor, inputs: Any = ()) -> int:
    """MACs ``module`` spent producing ``output`` from ``inputs`` (its positional arguments; 0 for a module that
    is not a linear-like layer). A transposed convolution spreads every input element over a kernel of every
    output channel (of its group): counted from its input."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and inputs and isinstance(inputs[0], Tensor):
        kernel = math.prod(module.kernel_size)
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, linear_like_types()):
        weight: Tensor = module.weight  # type: ignore[assignment]
        return output.numel() * int(weight.shape[weight_axes(module)[1]])
    return 0


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one eval-mode forward of ``model`` on ``example_inputs`` (a tensor, tuple or dict)."""
    total = 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += layer_macs(module, output, args)

    layers = [m for m in model.modules() if isinstance(m, linear_like_types())]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total
