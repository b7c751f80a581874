"""Rebuilding a compacted model: shrink a freshly built one to saved tensors' sizes and head counts.

:func:`~.compact.compact` removes channels and heads in place; a saved compacted model (a compressed
file, or ``save_pretrained``) holds smaller tensors than its class builds. Loading builds the
original architecture, cuts every layer to the saved sizes (the kept channels are the first ones:
their order is what was saved) and sets the head counts compaction set on attention modules, so
the saved state dict then loads strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .groups import is_depthwise, per_channel, supported
from .heads import COUNT_ATTRIBUTES, HEADS_ATTRIBUTE
from .layers import weight_axes
from .resize import resize_module
from .wrappers import modules_by_name

__all__ = ["check_shapes", "set_head_record", "shrink_like", "sized_tensor"]


def shrink_like(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], before: Callable[[str], None] | None = None
) -> None:
    """Cut every Linear/Conv1D/Conv/BatchNorm of ``model`` whose saved weight (``shapes["<name>.weight"]``; a norm
    without one: its ``running_mean``) is smaller, keeping its first channels. ``before(name)`` is called before a
    module is changed."""
    for name, module in model.named_modules():
        attr, weight = sized_tensor(module)
        want = shapes.get(f"{name}.{attr}" if name else attr)
        if want is None or weight is None or not supported(module):
            continue
        have, want = tuple(weight.shape), tuple(int(w) for w in want)
        if have == want or len(have) != len(want) or any(w > h for w, h in zip(want, have, strict=True)):
            continue
        if before is not None:
            before(name)
            if getattr(module, "weight_fake_quant", None) is not None:
                before(f"{name}.weight_fake_quant")
        out_axis, in_axis = weight_axes(module)
        # on the CPU, also where transformers' from_pretrained builds the model under a meta default device (a
        # GroupNorm checks that the kept channels are whole groups, which a meta tensor cannot say)
        out_keep = torch.arange(want[out_axis], device="cpu")
        in_keep = torch.arange(want[in_axis], device="cpu") if len(want) > 1 and not is_depthwise(module) else None
        resize_module(module, out_keep, in_keep)


def sized_tensor(module: nn.Module) -> tuple[str, torch.Tensor | None]:
    """The tensor whose saved shape records ``module``'s compacted size, and its attribute: the weight, or for a
    norm without one (``BatchNorm2d(affine=False)``, ``InstanceNorm2d(track_running_stats=True)``) its running
    mean (a trial: such a norm, cut by ``compact()``, was not cut on loading, and the file loaded into nothing)."""
    weight = getattr(module, "weight", None)
    running_mean = getattr(module, "running_mean", None)
    if weight is None and per_channel(module) and isinstance(running_mean, torch.Tensor):
        return "running_mean", running_mean
    return "weight", weight if isinstance(weight, torch.Tensor) else None


def check_shapes(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse a record of compacted sizes that :func:`shrink_like` could not apply whole: every entry must name the
    weight of a layer it cuts (Linear/Conv1D/Conv/BatchNorm), with the weight's rank and no larger size.

    Raises:
        ValueError: naming the entries that do not fit.
    """
    modules = modules_by_name(model)
    bad = []
    for key, want in shapes.items():
        name, _, attr = key.rpartition(".") if "." in key else ("", "", key)
        module = modules.get(name)
        sized, weight = sized_tensor(module) if module is not None else ("weight", None)
        have = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        fits = (
            attr == sized
            and module is not None
            and supported(module)
            and have is not None
            and len(want) == len(have)
            and all(int(w) <= h for w, h in zip(want, have, strict=True))
            and _whole_groups(module, want)
        )
        if not fits:
            bad.append(f"{key}: {list(want)} (the model: {list(have) if have is not None else 'no such layer weight'})")
    if bad:
        raise ValueError(f"compacted sizes that do not fit {type(model).__name__}: {bad[:5]}")


def _whole_groups(module: nn.Module, want: Sequence[int]) -> bool:
    """Whether ``want`` keeps whole groups of a GroupNorm (anything else: no condition)."""
    if not isinstance(module, nn.GroupNorm) or len(want) != 1:
        return True
    width = module.num_channels // module.num_groups
    return int(want[0]) > 0 and int(want[0]) % width == 0


def set_head_record(model: nn.Module, record: Any, before: Callable[[str], None] | None = None) -> None:
    """Set the head counts of ``record`` (``{module: {attribute: count}}``, from a file or a config).

    Raises:
        ValueError: a module that does not exist, an attribute that is not a head count of that
            module, or a count that is not an integer between 1 and the module's current one
            (checked for every entry before anything is set).
    """
    if not isinstance(record, dict):
        raise ValueError(f"head counts must be a mapping of module names, got {type(record).__name__}.")
    modules = modules_by_name(model)
    checked: list[tuple[str, nn.Module, str, int]] = []
    for name, attrs in record.items():
        module = modules.get(name) if isinstance(name, str) else None
        if module is None or not isinstance(attrs, dict):
            raise ValueError(f"head counts name {name!r}, which is not an attention module of {type(model).__name__}.")
        for attr, value in attrs.items():
            current = getattr(module, attr, None) if attr in COUNT_ATTRIBUTES else None
            if not isinstance(current, int) or isinstance(current, bool):
                raise ValueError(f"{attr!r} is not a head count of {name!r}.")
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= current:
                raise ValueError(f"head count {name}.{attr}={value!r} is not between 1 and {current}.")
            checked.append((name, module, attr, value))
    for name, module in {name: module for name, module, _, _ in checked}.items():
        _check_head_width(name, module, {a: v for n, _, a, v in checked if n == name})
    for name, module, attr, value in checked:
        if before is not None:
            before(name)
        setattr(module, attr, value)
        setattr(module, HEADS_ATTRIBUTE, {**getattr(module, HEADS_ATTRIBUTE, {}), attr: value})


_HEADS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_WIDTHS = ("all_head_size", "inner_dim", "split_size")  # split_size: GPT-2
_HEAD_SIZES = ("attention_head_size", "head_dim", "head_size")


def _check_head_width(name: str, module: nn.Module, new: dict[str, int]) -> None:
    """A module that keeps a head count, a head size and the width of all heads must keep them consistent (a trial:
    `num_attention_heads=1` with `all_head_size=24` and heads of 8 loaded)."""
    sizes = {
        a: getattr(module, a) for a in (*_HEADS, *_WIDTHS, *_HEAD_SIZES) if isinstance(getattr(module, a, None), int)
    }
    sizes.update(new)
    heads = next((sizes[a] for a in _HEADS if a in sizes), None)
    width = next((sizes[a] for a in _WIDTHS if a in sizes), None)
    size = next((sizes[a] for a in _HEAD_SIZES if a in sizes), None)
    if heads is not None and width is not None and size is not None and heads * size != width:
        raise ValueError(
            f"head counts of {name!r} do not fit: {heads} heads of {size} make {heads * size}, not {width}."
        )
