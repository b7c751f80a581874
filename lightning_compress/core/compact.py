"""Physically remove pruned channels: a plain, smaller, dense model with the same outputs.

A channel is removable when every parameter slice of its group is exactly zero (what channel
pruning leaves); removing it then cannot change any output, because whatever it produced
reaches the rest of the model only through input weights that are zero. :func:`compact` checks
that on the example inputs before it touches the model (on a copy), then resizes the layers in
place, keeping the same module objects and names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_float, check_module
from .heads import AttentionBlock, set_head_counts
from .layers import weight_axes
from .macs import count_macs
from .model_config import describe_in_config
from .quant_blocks import cut_quant_groups, keep_whole_blocks, quant_group_size
from .skeleton import deep_copy, meta_copy
from .structure import ChannelGroup, build_channel_groups, is_conv1d, is_depthwise, nonzero_channels, param_slices
from .tracing import call_model, check_example_inputs, eval_mode, output_tensors, plain_float

__all__ = [
    "COMPACTED_FLAG",
    "CompactReport",
    "CompactionError",
    "compact",
    "is_compacted",
    "mark_compacted",
    "removable_groups",
    "resize_module",
]

COMPACTED_FLAG = "_lightning_compress_compacted"  # set on a compacted model; save_compressed records it


def mark_compacted(model: nn.Module) -> None:
    """Flag ``model`` and every module in it as compacted: a file saved from any part of it (a LightningModule's
    inner network) then records that its shapes may differ from a fresh instance's."""
    for module in model.modules():
        setattr(module, COMPACTED_FLAG, True)


def is_compacted(model: nn.Module) -> bool:
    """Whether ``model`` or a module in it was compacted (a compacted ``transformers`` model inside a
    LightningModule, or one ``lightning_compress.from_pretrained`` rebuilt): its shapes may differ from a fresh
    instance's."""
    return any(getattr(module, COMPACTED_FLAG, False) for module in model.modules())


_CONV = nn.modules.conv._ConvNd
_NORM = nn.modules.batchnorm._BatchNorm


class CompactionError(RuntimeError):
    """Removing the zero channels would change the model's outputs; the model is left as it was."""


@dataclass
class CompactReport:
    """What :func:`compact` removed: channels per group (before, after) and parameter counts."""

    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float = 0.0
    macs_before: int = 0  # multiply-accumulates of one forward on the example inputs (Linear/Conv layers)
    macs_after: int = 0
    config_describes: bool | None = None  # a transformers model: whether its config's fields now give the sizes
    kept_for_quant_groups: dict[str, int] = field(default_factory=dict)  # zero channels kept, per group

    def __str__(self) -> str:
        lines = [f"{'group':<32}{'channels':>16}"]
        lines += [f"{name:<32}{f'{a} -> {b}':>16}" for name, (a, b) in self.channels.items()]
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(1, self.params_before):.1%}); max |output change| {self.max_abs_diff:.2e}"
        )
        lines.append(
            f"MACs per forward of the example inputs: {self.macs_before:,} -> {self.macs_after:,} "
            f"({self.macs_after / max(1, self.macs_before):.1%})"
        )
        if self.kept_for_quant_groups:
            kept = ", ".join(f"{name}: {n}" for name, n in self.kept_for_quant_groups.items())
            lines.append(
                f"zero channels kept (they share a group of input weights under one int4/group scale with inputs "
                f"that stay; removing them would move the groups): {kept}"
            )
        if self.config_describes is not None:
            how = "its fields" if self.config_describes else "a `lightning_compress` entry"
            load = "from_pretrained" if self.config_describes else "lightning_compress.from_pretrained"
            lines.append(f"config: the new sizes are described by {how} (reload with {load})")
        return "\n".join(lines)


def _zero_channels(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Channels of ``group`` whose every parameter slice is exactly zero."""
    modules = dict(model.named_modules())
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
    modules = dict(model.named_modules())
    removed: dict[str, dict[str, set[int]]] = {}
    result = Plan()
    for i, group in enumerate(groups):
        gone_channels = _zero_channels(model, group) if dead is None else dead[i].clone()
        if bool(gone_channels.all()):
            gone_channels[0] = False  # a layer keeps at least one channel
        result.channels[group.name] = (group.size, group.size - int(gone_channels.sum()))
        if group.attention is not None and bool(gone_channels.any()):
            result.heads[group.attention.module] = (group.attention, result.channels[group.name][1])
        for s in group.slices:
            gone = s.index[gone_channels[s.channel]].tolist()
            if not gone:
                continue
            kind = "out" if isinstance(modules[s.module], _NORM) or is_depthwise(modules[s.module]) else s.kind
            removed.setdefault(s.module, {}).setdefault(kind, set()).update(gone)
    for name, kinds in removed.items():
        module = modules[name]
        for kind, dropped in kinds.items():
            kept = [i for i in range(_size(module, kind)) if i not in dropped]
            result.keep.setdefault(name, {})[kind] = torch.tensor(kept, dtype=torch.long)
    return result


def _to_meta(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return torch.empty_like(inputs, device="meta")
    if isinstance(inputs, dict):
        return {k: _to_meta(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_meta(v) for v in inputs)
    return inputs


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in output_tensors(out)]


def removable_groups(
    model: nn.Module, example_inputs: Any, groups: list[ChannelGroup]
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Keep the groups whose channels can really be removed: one forward with half of the group's channels
    removed, at scattered positions (:func:`_probe`).

    Catches what a dependency graph cannot see: a residual addition with the model's own input, or
    attention that reshapes projections into heads (removing one Q/K/V row breaks the reshape). The
    forwards run on a meta-device copy (shapes only, no data); a model whose forward needs data
    (e.g. ``.item()`` in a ``transformers`` mask builder) is checked on the real model instead, with
    copies of only the layers a group touches swapped in and the originals put back.
    """
    meta = meta_copy(model)
    with plain_float(meta):  # shapes only: the float data flow (the copy is thrown away)
        try:
            with torch.no_grad():
                shapes = _shapes(call_model(meta, _to_meta(example_inputs)))
        except Exception:  # data-dependent code: check on the real model
            shapes = None
        if shapes is not None:
            return _removable(meta, _to_meta(example_inputs), groups, shapes, in_place=False)
    with plain_float(model), torch.no_grad():
        shapes = _shapes(call_model(model, example_inputs))
        return _removable(model, example_inputs, groups, shapes, in_place=True)


def _removable(
    model: nn.Module, inputs: Any, groups: list[ChannelGroup], shapes: list[tuple[int, ...]], in_place: bool
) -> tuple[list[ChannelGroup], dict[str, str]]:
    ok: list[ChannelGroup] = []
    rejected: dict[str, str] = {}
    for i, group in enumerate(groups):
        dead = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
        dead[i][_probe(group.size)] = True
        with _trial(model, group, in_place) as trial:
            _apply(trial, plan(trial, groups, dead), shapes_only=True)  # the forward runs with quantizers off
            try:
                with torch.no_grad():
                    trial_shapes = _shapes(call_model(trial, inputs))
            except Exception:  # any failure: these channels cannot go
                rejected[group.name] = "its channels also feed an operation the dependency graph does not see"
                continue
        if trial_shapes != shapes:
            rejected[group.name] = "its channels reach one of the model's outputs"
        else:
            ok.append(group)
    return ok, rejected


def _probe(size: int) -> Tensor:
    """The channels a removability trial removes: half of them (one of one), at scattered positions, so that a
    dependency the graph maps wrongly (a stride or a slice read as a channel map) shows as a count that differs;
    a fixed pattern such as every other channel can line up with a stride and pass."""
    generator = torch.Generator().manual_seed(size)
    return torch.randperm(size, generator=generator)[: max(1, size // 2)]


@contextlib.contextmanager
def _trial(model: nn.Module, group: ChannelGroup, in_place: bool) -> Iterator[nn.Module]:
    """A model to remove ``group``'s channels from: a whole copy, or ``model`` with copies of the group's layers."""
    if not in_place:
        yield deep_copy(model)
        return
    names = group.modules()
    if group.attention is not None:  # its counts change too; a copy of it holds copies of its own projections
        inside = f"{group.attention.module}."
        names = [group.attention.module, *(n for n in names if not n.startswith(inside))]
    originals = {name: model.get_submodule(name) for name in names}
    try:
        for name, module in originals.items():
            _swap(model, name, deep_copy(module))
        yield model
    finally:
        for name, module in originals.items():
            _swap(model, name, module)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _size(layer: nn.Module, kind: str) -> int:
    module: Any = layer
    if isinstance(module, _NORM):
        return int(module.num_features)
    if is_conv1d(module):
        return int(module.weight.shape[1 if kind == "out" else 0])
    if isinstance(module, nn.Linear):
        return int(module.out_features if kind == "out" else module.in_features)
    return int(module.out_channels if kind == "out" else module.in_channels)


def _cut(tensor: Tensor, dim: int, keep: Tensor) -> Tensor:
    return tensor.detach().index_select(dim, keep.to(tensor.device)).clone()


def _set(module: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)


def resize_module(
    layer: nn.Module, out_keep: Tensor | None = None, in_keep: Tensor | None = None, *, shapes_only: bool = False
) -> None:
    """Keep only ``out_keep`` output and ``in_keep`` input channels of a Linear, Conv1D, Conv or BatchNorm.

    Parameters become new (smaller) Parameters; a QAT layer's per-channel weight scale is cut too, and so are
    group-wise scales, whose groups ``in_keep`` must keep whole (``shapes_only``: left as they are, for a
    forward with the quantizers off that only checks shapes).
    """
    module: Any = layer
    if isinstance(module, _NORM):
        if out_keep is None:
            return
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, attr, None) is not None:
                _set(module, attr, _cut(getattr(module, attr), 0, out_keep))
        module.num_features = out_keep.numel()
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


def _apply(model: nn.Module, planned: Plan, shapes_only: bool = False) -> None:
    modules = dict(model.named_modules())
    for name, kinds in planned.keep.items():
        resize_module(modules[name], kinds.get("out"), kinds.get("in"), shapes_only=shapes_only)
    for name, (block, kv_heads) in planned.heads.items():
        set_head_counts(modules[name], block, kv_heads)


def _outputs(model: nn.Module, inputs: Any) -> list[Tensor]:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, inputs)
    return [t.detach().float() for t in output_tensors(out)]


def compact(model: nn.Module, example_inputs: Any = None, *, atol: float = 1e-4) -> CompactReport:
    """Remove every channel that channel pruning zeroed, in place, and return what changed.

    Works through Conv -> BatchNorm -> activation -> Conv, Linear -> Linear, flatten, residual
    additions and concatenations; the result is a plain dense model with the same modules and
    names, smaller layers and the same eval-mode outputs (checked on ``example_inputs`` before the
    model is changed; :class:`CompactionError` and an unchanged model if they would differ by more
    than ``atol`` relative to the output scale).

    Args:
        model: a model whose pruned channels are exactly zero (after ``IterativePruning(granularity="channel")``).
        example_inputs: a tensor, tuple or dict as the model's ``forward`` takes it;
            ``None``: the model's ``example_input_array`` (a LightningModule's).
        atol: tolerance of the output check.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_compress import compact
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[:4] = 0; model[0].bias[:4] = 0; model[2].weight[:, :4] = 0
        >>> compact(model, torch.randn(3, 4)).channels
        {'0': (8, 4)}
        >>> model[0]
        Linear(in_features=4, out_features=4, bias=True)
    """
    check_module(model)
    check_float(atol, "atol", finite=True)
    given = example_inputs is not None
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "compact() traces the model and needs `example_inputs` (a tensor, tuple or dict), or a "
                "LightningModule with `example_input_array` set."
            )
    check_example_inputs(model, example_inputs, "example_inputs" if given else "example_input_array")
    groups, _ = build_channel_groups(model, example_inputs)
    groups, _ = removable_groups(model, example_inputs, groups)
    dead = [_zero_channels(model, group) for group in groups]
    kept_for_quant_groups = keep_whole_blocks(model, groups, dead)
    planned = plan(model, groups, dead)
    keep = planned.keep
    report = CompactReport(channels=planned.channels, params_before=sum(p.numel() for p in model.parameters()))
    report.kept_for_quant_groups = kept_for_quant_groups
    report.macs_before = count_macs(model, example_inputs)
    if keep:
        trial = deep_copy(model)
        _apply(trial, planned)
        before = _outputs(model, example_inputs)
        try:
            after = _outputs(trial, example_inputs)
        except RuntimeError as err:
            raise CompactionError(f"the compacted model does not run ({err}); the model is unchanged.") from err
        same_shapes = len(before) == len(after) and all(a.shape == b.shape for a, b in zip(before, after, strict=True))
        diff = max((float((a - b).abs().max()) for a, b in zip(before, after, strict=True)), default=0.0)
        scale = max((float(a.abs().max()) for a in before), default=1.0)
        if not same_shapes or diff > atol * max(1.0, scale):
            raise CompactionError(
                f"removing the zero channels would change the outputs (max |diff| {diff:.3g}); an operation "
                "in the model mixes channels in a way the dependency graph does not see. The model is unchanged."
            )
        del trial
        _apply(model, planned)
        report.config_describes = describe_in_config(model, groups, planned.channels)
        report.max_abs_diff = diff
        mark_compacted(model)
    report.params_after = sum(p.numel() for p in model.parameters())
    report.macs_after = count_macs(model, example_inputs) if keep else report.macs_before
    return report
