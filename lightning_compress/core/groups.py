"""Channel groups as plain records, and what a module's channels are.

Pure torch. A :class:`ChannelGroup` names the slices of parameters that are kept or removed together (built by
:func:`~.structure.build_channel_groups` from the model's data flow); the functions here say which modules can be
cut along their channels, and which of their parameters a cut reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .heads import AttentionBlock
from .layers import is_linear, transformers_conv1d, weight_axes

__all__ = [
    "ChannelGroup",
    "LayerSlice",
    "cut_with_channels",
    "is_conv1d",
    "is_depthwise",
    "is_group_norm",
    "nonzero_channels",
    "param_slices",
    "per_channel",
    "per_position",
    "slice_bound",
    "supported",
    "unshifted_mean",
]

_CONV = nn.modules.conv._ConvNd
_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def is_group_norm(module: nn.Module) -> bool:
    """A GroupNorm with a scale and shift (``affine=True``, its default): whole groups of its channels can be removed
    (a compacted file's size is read from its weight)."""
    return isinstance(module, nn.GroupNorm) and module.affine


def cut_with_channels(module: nn.Module) -> bool:
    """A norm or activation whose entries are cut with the channels it reads (:func:`per_channel`, a GroupNorm's
    whole groups): its input channels are its output channels."""
    return per_channel(module) or is_group_norm(module)


def per_channel(module: nn.Module) -> bool:
    """A module that treats each channel on its own, with (at most) one value per channel in each parameter or
    buffer: BatchNorm, InstanceNorm, a PReLU with one slope per channel."""
    return isinstance(module, _NORM) or (isinstance(module, nn.PReLU) and module.num_parameters > 1)


def unshifted_mean(module: nn.Module) -> bool:
    """A per-channel norm with a running mean and no shift to mask (``BatchNorm2d(affine=False)``): a channel zeroed
    before it gives ``-running_mean / sqrt(running_var + eps)`` in eval mode, unless its running mean is zeroed too."""
    return (
        per_channel(module)
        and not isinstance(getattr(module, "bias", None), nn.Parameter)
        and isinstance(getattr(module, "running_mean", None), Tensor)
    )


@dataclass(frozen=True)
class LayerSlice:
    """Positions along one module's output (``"out"``) or input (``"in"``) dimension.

    ``index[i]`` belongs to channel ``channel[i]`` of its group (a flatten maps one channel to
    several input features of the next Linear).
    """

    module: str
    kind: str
    index: Tensor
    channel: Tensor


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, named after the layer whose outputs they are."""

    name: str
    size: int
    slices: list[LayerSlice] = field(default_factory=list)
    attention: AttentionBlock | None = None  # set for a group of attention heads
    unit_channels: int = 1  # the root layer's channels in one unit: a GroupNorm's group (:func:`_norm_group_units`)

    def modules(self) -> list[str]:
        return sorted({s.module for s in self.slices})


def is_depthwise(module: nn.Module) -> bool:
    if not isinstance(module, _CONV) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` Conv1D (weight stored as ``(in, out)``)."""
    conv1d = transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def supported(module: nn.Module) -> bool:
    """Modules whose channels can be removed exactly: Linear, Conv1D, dense or depthwise Conv, dense transposed
    Conv, :func:`per_channel` ones (BatchNorm, InstanceNorm, per-channel PReLU), and a GroupNorm's whole groups
    (:func:`is_group_norm`)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.groups == 1
    if isinstance(module, _CONV):
        return module.groups == 1 or is_depthwise(module)
    return is_linear(module) or cut_with_channels(module) or is_conv1d(module)


def param_slices(module: nn.Module, kind: str) -> list[tuple[str, int]]:
    """``(attribute, dim)`` of the parameters that a slice of ``kind`` cuts in ``module``."""
    if cut_with_channels(module):
        return [(a, 0) for a in ("weight", "bias") if isinstance(getattr(module, a, None), nn.Parameter)]
    out_axis, in_axis = weight_axes(module)  # (1, 0) for Conv1D and transposed convs: weights are (in, out, ...)
    if kind == "out" or is_depthwise(module):  # a depthwise conv's input channel is its output channel: its filter
        # and bias go with it (a trial: they were never masked, and only `compact()` removed them)
        present = [a for a in ("weight", "bias") if isinstance(getattr(module, a, None), nn.Parameter)]
        return [(a, out_axis if a == "weight" else 0) for a in present]
    return [("weight", in_axis)]


def per_position(values: Tensor, dim: int, index: Tensor) -> Tensor:
    """Sum of ``values`` over each slice ``index[i]`` along ``dim`` (one number per position)."""
    index = index.to(values.device)
    return values.index_select(dim, index).movedim(dim, 0).reshape(index.numel(), -1).sum(1)


def nonzero_channels(values: Tensor, dim: int, index: Tensor, channel: Tensor, size: int) -> Tensor:
    """Which of a group's ``size`` channels have a nonzero entry in ``values`` at the slice's positions."""
    nonzero = (per_position(values != 0, dim, index) > 0).cpu()
    out = torch.zeros(size, dtype=torch.bool)
    out.index_put_((channel,), nonzero, accumulate=True)
    return out


def slice_bound(module: nn.Module, kind: str) -> int:
    """How many positions ``module`` has along its outputs (``"out"``) or inputs (``"in"``)."""
    if isinstance(module, nn.PReLU):
        return int(module.num_parameters)
    if isinstance(module, _NORM):
        return int(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, _CONV):
        return int(module.out_channels if kind == "out" else module.in_channels)
    out_axis, in_axis = weight_axes(module)
    return int(module.weight.shape[out_axis if kind == "out" else in_axis])  # type: ignore[index]
