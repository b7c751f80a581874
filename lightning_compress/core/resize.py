"""Removing channels from layers: the plan of what each layer keeps, and cutting its parameters to it.

Pure mechanics, no checks: :func:`~.compact.compact` decides what may go (every slice of a channel exactly zero, the
outputs unchanged) and :mod:`.group_check` which channel groups can go at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import copies_beside
from .groups import (
    ChannelGroup,
    cut_with_channels,
    is_conv1d,
    is_depthwise,
    nonzero_channels,
    param_slices,
    per_channel,
    slice_bound,
)
from .heads import AttentionBlock, set_head_counts
from .layers import weight_axes
from .quant_blocks import cut_quant_groups, quant_group_size
from .wrappers import modules_by_name

__all__ = ["Plan", "apply_plan", "plan", "resize_module", "zero_channels"]


def zero_channels(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Channels of ``group`` whose every parameter slice is exactly zero."""
    modules = modules_by_name(model)
    dead = torch.ones(group.size, dtype=torch.bool)
    for s in group.slices:
        module = modules[s.module]
        for attr, dim in param_slices(module, s.kind):
            dead &= ~nonzero_channels(getattr(module, attr).detach(), dim, s.index, s.channel, group.size)
    return dead


@dataclass
class Plan:
    """What compaction does: per module, the sorted positions kept along ``"out"``/``"in"``; per
    attention block, its key/value heads kept; per group, its channels (before, after)."""

    keep: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    heads: dict[str, tuple[AttentionBlock, int]] = field(default_factory=dict)
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)


def plan(model: nn.Module, groups: list[ChannelGroup], dead: list[Tensor] | None = None) -> Plan:
    """The :class:`Plan` that removes ``dead`` channels (per group; default: those whose slices are all zero)."""
    modules = modules_by_name(model)
    removed: dict[str, dict[str, set[int]]] = {}
    result = Plan()
    for i, group in enumerate(groups):
        gone_channels = zero_channels(model, group) if dead is None else dead[i].clone()
        if bool(gone_channels.all()):
            gone_channels[0] = False  # a layer keeps at least one channel
        unit = group.unit_channels  # a GroupNorm's group is one unit: counted in channels
        result.channels[group.name] = (group.size * unit, (group.size - int(gone_channels.sum())) * unit)
        if group.attention is not None and bool(gone_channels.any()):
            result.heads[group.attention.module] = (group.attention, result.channels[group.name][1])
        for s in group.slices:
            gone = s.index[gone_channels[s.channel]].tolist()
            if not gone:
                continue
            module = modules[s.module]
            kind = "out" if cut_with_channels(module) or is_depthwise(module) else s.kind
            removed.setdefault(s.module, {}).setdefault(kind, set()).update(gone)
    for name, kinds in removed.items():
        module = modules[name]
        for kind, dropped in kinds.items():
            size = slice_bound(module, kind)
            if max(dropped) >= size:  # a group traced wrongly: cutting would silently drop other positions
                raise IndexError(f"{name}: position {max(dropped)} of its {kind}puts is beyond its {size}")
            kept = [i for i in range(size) if i not in dropped]
            result.keep.setdefault(name, {})[kind] = torch.tensor(kept, dtype=torch.long)
    return result


def _cut(tensor: Tensor, dim: int, keep: Tensor) -> Tensor:
    """``keep``'s slices of ``tensor`` along ``dim``, in the memory format the tensor had (a convolution's weight in
    `channels_last` stays so: trial FB, compact() gave them back contiguous)."""
    cut = tensor.detach().index_select(dim, keep.to(tensor.device))
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    if layout is not None and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=layout):
        return cut.clone(memory_format=layout)
    return cut.clone()


def _cut_group_norm(module: nn.GroupNorm, keep: Tensor) -> None:
    """Keep the channels ``keep`` of a GroupNorm: whole groups of it (one fewer group per group removed)."""
    width = module.num_channels // module.num_groups
    groups = keep.reshape(-1, width) if keep.numel() % width == 0 else None
    offsets = torch.arange(width, device=keep.device)
    if groups is None or not bool((groups == groups[:, :1] + offsets).all()) or bool((groups[:, 0] % width).any()):
        raise ValueError(
            f"a GroupNorm ({module.num_groups} groups of {width} channels) keeps whole groups: the kept channels "
            f"{keep.tolist()[:16]} are not."
        )
    for attr in ("weight", "bias"):
        if getattr(module, attr, None) is not None:
            _set(module, attr, _cut(getattr(module, attr), 0, keep))
    module.num_channels, module.num_groups = keep.numel(), keep.numel() // width


def _set(module: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)


def resize_module(
    layer: nn.Module, out_keep: Tensor | None = None, in_keep: Tensor | None = None, *, shapes_only: bool = False
) -> None:
    """Keep only ``out_keep`` output and ``in_keep`` input channels of a Linear, Conv1D, Conv, BatchNorm,
    InstanceNorm, per-channel PReLU, or GroupNorm (``out_keep``: whole groups of its channels).

    Parameters become new (smaller) Parameters; a QAT layer's per-channel weight scale is cut too, and so are
    group-wise scales, whose groups ``in_keep`` must keep whole (``shapes_only``: left as they are, for a
    forward with the quantizers off that only checks shapes).
    """
    module: Any = layer
    if per_channel(module):
        if out_keep is None:
            return
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, attr, None) is not None:
                _set(module, attr, _cut(getattr(module, attr), 0, out_keep))
        if isinstance(module, nn.PReLU):
            module.num_parameters = out_keep.numel()
        else:
            module.num_features = out_keep.numel()
        return
    if isinstance(module, nn.GroupNorm):
        if out_keep is not None:
            _cut_group_norm(module, out_keep)
        return
    conv1d = is_conv1d(module)
    quantizer = getattr(module, "weight_fake_quant", None)
    group_size = quant_group_size(module) if in_keep is not None and not shapes_only else None
    if group_size is not None and in_keep is not None:
        cut_quant_groups(quantizer, in_keep, group_size)
    out_axis, in_axis = weight_axes(module)  # (1, 0) for Conv1D and transposed convs
    if out_keep is not None:
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                _set(module, attr, _cut(getattr(module, attr), out_axis if attr == "weight" else 0, out_keep))
        if quantizer is not None and getattr(quantizer, "per_channel", False):
            _set(quantizer, "scale", _cut(quantizer.scale, 0, out_keep))
            for attr in ("min_val", "max_val"):
                value = getattr(quantizer, attr, None)
                if isinstance(value, Tensor) and value.dim() == 1:
                    _set(quantizer, attr, _cut(value, 0, out_keep))
        if isinstance(module, nn.Linear):
            module.out_features = out_keep.numel()
        elif conv1d:
            module.nf = out_keep.numel()
        else:
            depthwise = is_depthwise(module)
            module.out_channels = out_keep.numel()
            if depthwise:
                module.in_channels = module.groups = out_keep.numel()
    if in_keep is not None:
        if conv1d:
            _set(module, "weight", _cut(module.weight, 0, in_keep))
            module.nx = in_keep.numel()
        elif isinstance(module, nn.Linear):
            _set(module, "weight", _cut(module.weight, 1, in_keep))
            module.in_features = in_keep.numel()
        elif not is_depthwise(module):
            _set(module, "weight", _cut(module.weight, in_axis, in_keep))
            module.in_channels = in_keep.numel()


def apply_plan(model: nn.Module, planned: Plan, shapes_only: bool = False) -> None:
    """Cut every layer to what ``planned`` keeps, and (not for ``shapes_only``: the checks' forwards of the active
    path, which may run on the model itself with only a group's modules swapped for copies, trial FQ) the copies of it
    a ``peft`` ``modules_to_save`` wrapper keeps beside the active one, where they have its shapes
    (:func:`~.adapters.copies_beside`)."""
    modules = modules_by_name(model)
    for name, kinds in planned.keep.items():
        module = modules[name]
        shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
        beside = [] if shapes_only else copies_beside(modules, name)
        twins = [c for c in beside if [tuple(p.shape) for p in c.parameters(recurse=False)] == shapes]
        for layer in (module, *twins):
            resize_module(layer, kinds.get("out"), kinds.get("in"), shapes_only=shapes_only)
    for name, (block, kv_heads) in planned.heads.items():
        set_head_counts(modules[name], block, kv_heads)
