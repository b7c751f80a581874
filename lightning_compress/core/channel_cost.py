"""What channels cost: a model's multiply-accumulates as a function of the channels its groups keep.

One forward on the example inputs counts each layer's MACs (:func:`~.macs.layer_macs`).
A layer's MACs are proportional to its output channels times its input channels per group (a
depthwise conv: to its channels), so after removing channels they are
``dense * kept_out / out * kept_in / in``: exact for every layer whose channels are removed as
channel groups remove them. :class:`ChannelCost` evaluates that for any choice of kept channels
(what ``compact()`` would leave), and gives each channel the MACs its removal saves on its own.
Attention products, norms and activations are not counted (see :mod:`.macs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .groups import ChannelGroup, is_depthwise
from .layers import weight_axes
from .macs import layer_macs, uncalled_layers
from .tracing import call_model, forward_state_kept, plain_float
from .wrappers import modules_by_name

__all__ = ["ChannelCost"]

_NORM = nn.modules.batchnorm._BatchNorm


class _Axis:
    """One side (``"out"``/``"in"``) of one layer: its size and which group positions live on it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: list[tuple[int, Tensor, Tensor]] = []  # (group, index, channel)


class ChannelCost:
    """MACs of ``model``'s Linear/Conv layers for the channels that ``groups`` keep.

    Args:
        model: the model the groups were traced on.
        example_inputs: what its ``forward`` takes (one eval-mode forward with the float data flow).
        groups: its channel groups.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, groups: Sequence[ChannelGroup]) -> None:
        macs: dict[nn.Module, int] = {}

        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            macs[module] = macs.get(module, 0) + layer_macs(module, output, args, kwargs)

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if not isinstance(m, _NORM)]
        try:
            with plain_float(model), torch.no_grad(), forward_state_kept(model):
                call_model(model, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
        modules = modules_by_name(model)
        self.dense = sum(macs.values())
        self.uncalled = uncalled_layers(model, {id(m) for m in macs})  # layers whose MACs are not counted
        self._layers: dict[str, tuple[int, dict[str, _Axis]]] = {}
        seen: set[tuple[str, str, int]] = set()
        for g, group in enumerate(groups):
            for s in group.slices:
                module = modules[s.module]
                if module not in macs or not macs[module]:
                    continue  # a BatchNorm, or a layer the forward did not call
                weight = module.weight
                assert isinstance(weight, Tensor)
                _, axes = self._layers.setdefault(s.module, (macs[module], {}))
                kind = "out" if is_depthwise(module) else s.kind  # a depthwise conv's inputs are its outputs
                if (s.module, kind, g) in seen:
                    continue
                seen.add((s.module, kind, g))
                size = _size(module, weight, kind)
                axis = axes.setdefault(kind, _Axis(size))
                axis.parts.append((g, s.index, s.channel))
        self._sizes = [g.size for g in groups]
        self._per_channel: list[Tensor] | None = None

    def remaining(self, alive: Sequence[Tensor]) -> float:
        """MACs of the model when every group keeps its ``alive`` channels (bool tensors, one per group)."""
        total = float(self.dense)
        for dense, axes in self._layers.values():
            fraction = 1.0
            for axis in axes.values():
                dead = torch.zeros(axis.size, dtype=torch.bool)
                for g, index, channel in axis.parts:
                    dead[index[~alive[g][channel]]] = True
                fraction *= 1.0 - float(dead.sum()) / axis.size
            total -= dense * (1.0 - fraction)
        return total

    def per_channel(self) -> list[Tensor]:
        """Per group, the MACs removing each channel saves on its own (float64; computed once)."""
        if self._per_channel is None:
            costs = [torch.zeros(size, dtype=torch.float64) for size in self._sizes]
            for dense, axes in self._layers.values():
                for axis in axes.values():
                    for g, _, channel in axis.parts:
                        each = torch.full((channel.numel(),), dense / axis.size, dtype=torch.float64)
                        costs[g].index_add_(0, channel, each)
            self._per_channel = costs
        return self._per_channel


def _size(module: nn.Module, weight: Tensor, kind: str) -> int:
    out_axis, in_axis = weight_axes(module)
    if kind == "out":
        return int(weight.shape[out_axis])
    groups = getattr(module, "groups", 1)
    return int(weight.shape[in_axis]) * int(groups)
