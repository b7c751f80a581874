"""Physically remove pruned channels: a plain, smaller, dense model with the same outputs.

A channel is removable when every parameter slice of its group is exactly zero (what channel
pruning leaves); removing it then cannot change any output, because whatever it produced
reaches the rest of the model only through input weights that are zero. :func:`compact` checks
that on the example inputs before it touches the model (on a copy), then resizes the layers in
place, keeping the same module objects and names.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .checks import caller_level, check_float, check_module
from .group_check import faithful_groups, output_change, removable_groups
from .groups import ChannelGroup
from .macs import count_macs, uncalled_note, uncounted_experts, uncounted_note
from .model_config import describe_in_config, unchanged_configs
from .qat import quantizers
from .quant_blocks import keep_whole_blocks
from .resize import apply_plan, plan, zero_channels
from .sharding import is_sharded, model_class_name
from .skeleton import deep_copy
from .structure import build_channel_groups
from .tracing import (
    call_model,
    check_example_inputs,
    eval_mode,
    forward_state_kept,
    like_model,
    noisy_checks,
    output_tensors,
    quiet_norm_widths,
    seeded,
)
from .wrappers import uncompiled

__all__ = [
    "COMPACTED_FLAG",
    "CompactReport",
    "CompactionError",
    "compact",
    "is_compacted",
    "mark_compacted",
    "stateless_norms_read_their_width",
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


class CompactionError(RuntimeError):
    """Removing the zero channels would change the model's outputs; the model is left as it was."""


@dataclass
class CompactReport:
    """What :func:`compact` removed: channels per group (before, after) and parameter counts."""

    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float = 0.0  # largest change of an output entry, on the example inputs or noisy ones
    max_relative_change: float = 0.0  # the same, relative to the largest entry of its output (what `atol` bounds)
    macs_before: int = 0  # multiply-accumulates of one forward on the example inputs (Linear/Conv layers)
    macs_after: int = 0
    config_describes: bool | None = None  # a transformers model: whether its config's fields now give the sizes
    unchanged_configs: list[str] = field(default_factory=list)  # modules whose other `config` still gives old sizes
    kept_for_quant_groups: dict[str, int] = field(default_factory=dict)  # zero channels kept, per group
    uncounted: list[str] = field(default_factory=list)  # modules whose 3-d weights (experts) the MACs leave out
    uncounted_note: str = ""  # what they hold, said
    uncalled: list[str] = field(default_factory=list)  # Linear/Conv layers the forward did not call: MACs uncounted
    left: dict[str, str] = field(default_factory=dict)  # with no channel group found: why each layer was left whole

    def __str__(self) -> str:
        changed = {name: sizes for name, sizes in self.channels.items() if sizes[0] != sizes[1]}
        width = max([32, *(len(name) + 2 for name in changed)])  # trial EA: longer names pushed the column out
        lines = [f"{'group':<{width}}{'channels':>16}"] if self.channels else []
        lines += [f"{name:<{width}}{f'{a} -> {b}':>16}" for name, (a, b) in changed.items()]
        unchanged = sum(a == b for a, b in self.channels.values())  # trial DV: listed as if cut ("2 -> 2")
        if unchanged:
            lines.append(f"({unchanged} group(s) unchanged: `channels` lists every group)")
        if not self.channels:  # trial GJ: a report of nothing read as a success ("MACs 0 -> 0 (0.0%)")
            lines.append(f"no channel group found, nothing removed{_reasons(self.left)}")
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(1, self.params_before):.1%}); max |output change| {self.max_abs_diff:.2e} "
            f"({self.max_relative_change:.2e} of the largest output)"
        )
        counted = (
            f"{self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / self.macs_before:.1%})"
            if self.macs_before
            else "none counted (no Linear, Conv, recurrent or attention layer ran)"
        )
        lines.append(
            f"MACs per forward of the example inputs: {counted}"
            + (f", not counting {self.uncounted_note} (left whole)" if self.uncounted else "")
            + (f", not counting {uncalled_note(self.uncalled)}" if self.uncalled else "")
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
        if self.unchanged_configs:
            owners = ", ".join(f"`{name}.config`" if name else "`config`" for name in self.unchanged_configs)
            lines.append(
                f"config: {owners} is not rewritten (not a `transformers` config): sizes it gives are the dense "
                "ones; rebuild the compacted model with load_compressed into a fresh instance, not from that config"
            )
        return "\n".join(lines)


def _reasons(left: dict[str, str]) -> str:
    """The first reasons layers were left whole, for a message."""
    if not left:
        return ""
    shown = "; ".join(f"{name or 'the model'}: {why}" for name, why in list(left.items())[:3])
    return f" ({shown}{'; ...' if len(left) > 3 else ''})"


def _outputs(model: nn.Module, inputs: Any) -> list[Tensor]:
    """The outputs with weights quantized as they are and activations in float: a layer with fewer inputs sums in
    another order, and a quantized activation a rounding away can flip a step (a trial: 3.4e-4 of a Llama's logits
    with int8 per-token activations), a change of the rounding, not of what the channels carry."""
    with (
        eval_mode(model),
        torch.no_grad(),
        _float_activations(model),
        seeded(model),
        forward_state_kept(model),
        quiet_norm_widths(),  # a compacted stateless InstanceNorm's width is set after these forwards
    ):
        out = call_model(model, inputs)  # the same random draws; a cache the forward fills is taken back
    return [t.detach().float() for t in output_tensors(out)]


@contextlib.contextmanager
def _float_activations(model: nn.Module) -> Iterator[None]:
    """Activation quantizers off (weight quantizers as they are); restored afterwards."""
    saved = [(q, q.fake_quant_enabled) for _, q in quantizers(model) if q.role == "activation"]
    for q, _ in saved:
        q.fake_quant_enabled = False
    try:
        yield
    finally:
        for q, enabled in saved:
            q.fake_quant_enabled = enabled


_BATCHED_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def stateless_norms_read_their_width(model: nn.Module, inputs: Any) -> None:
    """An InstanceNorm without affine weights or running statistics holds no tensor a plan cuts, and the trace can
    lose it (an in-place ``out += residual`` after it: MONAI's UNETR), so its ``num_features`` may still be the old
    width: it computes the same, but torch warned on every compacted model's forward. Each takes the channel count
    of its input on ``inputs`` (after ``compact()``, and after ``load_compressed`` of a compacted file given inputs)."""
    norms: dict[nn.Module, int] = {
        module: batched
        for module in model.modules()
        for kind, batched in _BATCHED_DIMS.items()
        if isinstance(module, kind) and not module.affine and not module.track_running_stats
    }
    if not norms:
        return
    seen: dict[nn.Module, int] = {}

    def read(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() in (norms[module] - 1, norms[module]):
            seen[module] = int(x.shape[0 if x.dim() < norms[module] else 1])

    hooks = [module.register_forward_pre_hook(read) for module in norms]
    try:
        _outputs(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for module, width in seen.items():
        cast(Any, module).num_features = width


def _warn_zero_channels_kept(model: nn.Module, groups: list[ChannelGroup], why: dict[str, str]) -> None:
    """Say which zeroed channels stay, as their groups cannot be removed (:func:`~.group_check.faithful_groups`)."""
    kept = {g.name: int(zero_channels(model, g).sum()) for g in groups}
    kept = {name: n for name, n in kept.items() if n}
    if kept:
        warnings.warn(
            "compact() keeps these zero channels: "
            + "; ".join(f"{name}: {n} ({why[name]})" for name, n in kept.items()),
            UserWarning,
            stacklevel=3,
        )


def compact(model: nn.Module, example_inputs: Any = None, *, atol: float | None = None) -> CompactReport:
    """Remove every channel that channel pruning zeroed, in place, and return what changed.

    Works through Conv -> BatchNorm -> activation -> Conv, Linear -> Linear, flatten, residual
    additions and concatenations; the result is a plain dense model with the same modules and
    names, smaller layers and the same eval-mode outputs (checked before the model is changed, on
    ``example_inputs`` and on a noisy copy of their floating-point tensors, as zeros can hide a change;
    :class:`CompactionError` and an unchanged model if an output would change by more than ``atol`` of
    its largest entry). Groups whose zeroed channels are not the same as removed ones (an operation
    that moves channels, which the dependency graph reads as element-wise) are left whole.

    The layers it cuts get new, smaller Parameters: an optimizer made before holds the old ones, and a step of it
    trains none of them (trial FP: skorch's `partial_fit` after `compact()` ran, logged a loss, and left the weights
    as they were). Make the optimizer anew after it (a Lightning ``fit`` does, through ``configure_optimizers``).

    Args:
        model: a model whose pruned channels are exactly zero (after ``IterativePruning(granularity="channel")``);
            its ``torch.compile``d submodules are compacted as the modules they compiled (names without
            ``_orig_mod``).
        example_inputs: a tensor, tuple or dict as the model's ``forward`` takes it;
            ``None``: the model's ``example_input_array`` (a LightningModule's).
        atol: tolerance of the output check, relative to each output's largest entry; ``None``: ``1e-4``, or in a
            float16/bfloat16 model 8 steps of its precision (removing channels changes the order of its sums, and
            float16 rounds that to about 5e-4: trial ED's GPT-2 after a ``16-true`` fit was refused).

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
    if atol is not None:
        check_float(atol, "atol", finite=True)
    sharded = next((name for name, p in model.named_parameters() if is_sharded(p)), None)
    if sharded is not None:  # a trial: FSDP's own AssertionError from the copy the check takes
        raise ValueError(
            f"compact removes channels of whole layers, but {model_class_name(model)}'s parameters are sharded (FSDP2; "
            f"{sharded!r}): set the callback's `export_path='model.lcz'` (it gathers and compacts the model), or call "
            "save_compressed(model, 'model.lcz') on every process, then load_compressed it into an unsharded instance "
            "of the model and compact that."
        )
    with uncompiled(model) as plain:  # trial DD: a compiled submodule hid its layers (MACs 0 -> 0, zeros kept)
        return _compact(plain, example_inputs, atol)


def default_atol(model: nn.Module) -> float:
    """:func:`compact`'s output tolerance for ``model``: ``1e-4``, or 8 steps of a 16-bit floating dtype's precision."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return 8 * torch.finfo(dtype).eps if torch.finfo(dtype).bits == 16 else 1e-4


def _compact(model: nn.Module, example_inputs: Any, atol: float | None) -> CompactReport:
    atol = default_atol(model) if atol is None else atol
    given = example_inputs is not None
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "compact() traces the model and needs `example_inputs` (a tensor, tuple or dict), or a "
                "LightningModule with `example_input_array` set."
            )
    # a bfloat16/float16 model's float32 `example_input_array` (trial EF: refused after a `bf16-true` fit)
    example_inputs = like_model(example_inputs, model)
    with forward_state_kept(model):  # the trace's forwards leave no cache behind (PyG's cached GCNConv: trial FE)
        check_example_inputs(model, example_inputs, "example_inputs" if given else "example_input_array")
        groups, left = build_channel_groups(model, example_inputs)
        groups, removed = removable_groups(model, example_inputs, groups)
        traced = groups
        groups, unfaithful = faithful_groups(model, example_inputs, groups)
    _warn_zero_channels_kept(model, [g for g in traced if g.name in unfaithful], unfaithful)
    dead = [zero_channels(model, group) for group in groups]
    kept_for_quant_groups = keep_whole_blocks(model, groups, dead)
    planned = plan(model, groups, dead)
    keep = planned.keep
    report = CompactReport(channels=planned.channels, params_before=sum(p.numel() for p in model.parameters()))
    report.kept_for_quant_groups = kept_for_quant_groups
    if not traced:
        report.left = {**left, **removed}
        warnings.warn(
            f"compact() found no channel group in {type(model).__name__} it could remove channels from"
            f"{_reasons(report.left)}: the model is unchanged.",
            stacklevel=caller_level(),
        )
    report.macs_before = count_macs(model, example_inputs, report.uncalled)
    report.uncounted = uncounted_experts(model)
    report.uncounted_note = uncounted_note(model, report.uncounted) if report.uncounted else ""
    if keep:
        # the example inputs, and noisy ones: zeros can hide a change (a network without biases keeps them zero)
        checks = noisy_checks(example_inputs, lambda inputs: _outputs(model, inputs))
        trial = deep_copy(model)
        apply_plan(trial, planned)
        before = [_outputs(model, inputs) for inputs in checks]
        try:
            after = [_outputs(trial, inputs) for inputs in checks]
        except RuntimeError as err:
            raise CompactionError(f"the compacted model does not run ({err}); the model is unchanged.") from err
        changes = [output_change(b, a) for b, a in zip(before, after, strict=True)]
        largest, change = max(c[0] for c in changes), max(c[1] for c in changes)
        if change > atol:
            raise CompactionError(
                f"removing the zero channels would change the outputs (by {change:.3g} of their largest value); an "
                "operation in the model mixes channels in a way the dependency graph does not see. The model is "
                "unchanged."
            )
        del trial
        apply_plan(model, planned)
        stateless_norms_read_their_width(model, example_inputs)
        report.config_describes = describe_in_config(model, groups, planned.channels)
        report.unchanged_configs = unchanged_configs(model, groups)
        report.max_abs_diff = largest
        report.max_relative_change = change
        mark_compacted(model)
    report.params_after = sum(p.numel() for p in model.parameters())
    report.macs_after = count_macs(model, example_inputs) if keep else report.macs_before
    return report
