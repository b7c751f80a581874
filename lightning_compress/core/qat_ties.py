"""Layers tied to one weight, quantized as one. Pure torch.

A weight two layers use (a language model's output head tied to its token embedding, as GPT-2's ``lm_head`` and
``transformer.wte``; two Linear layers given one Parameter) is selected once, under its first module's name. Each of
its other layers whose weight lies the same way (output channels along the same axis: an ``nn.Embedding``'s rows
are an ``nn.Linear`` head's output channels) is converted too and **shares the first layer's weight quantizer**
(one module): both compute with the same integer weight, a compressed file stores its codes once, and the ONNX
graph holds one int8 matrix. A tied layer whose weight lies the other way (``transformers``' Conv1D, a transposed
convolution) has no such sharing and stays float, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .layers import weight_axes
from .qat_layers import QATLayer
from .selection import Target, stored_weight
from .wrappers import is_compiled

__all__ = ["say_unshared_partners", "shared_partners"]


def shared_partners(
    model: nn.Module, targets: Sequence[Target], class_of: Callable[[nn.Module], Any]
) -> dict[str, list[tuple[str, nn.Module]]]:
    """``{target name: [(name, layer), ...]}``: the other layers of each target's weight that share its weight
    quantizer (a fake-quantizable layer, not compiled by itself, whose weight's output axis is the target's). A
    layer that is already fake-quantized with a quantizer of its own is not among them."""
    by_weight = {id(t.param): t for t in targets}
    shared: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        target = by_weight.get(id(stored_weight(module)))
        if target is None or module is target.module or not _shareable(module, target.module, class_of):
            continue
        shared.setdefault(target.name, []).append((name, module))
    return shared


def _shareable(module: nn.Module, first: nn.Module, class_of: Callable[[nn.Module], Any]) -> bool:
    if isinstance(module, QATLayer):  # converted before: shared already, or its own quantizer (kept as it is)
        return module.weight_fake_quant is getattr(first, "weight_fake_quant", None)
    if class_of(module) is None or is_compiled(module):
        return False
    return weight_axes(module)[0] == weight_axes(first)[0]


def say_unshared_partners(
    model: nn.Module,
    targets: Sequence[Target],
    include: Sequence[str] | str | None,
    class_of: Callable[[nn.Module], Any],
    shared: dict[str, list[tuple[str, nn.Module]]],
) -> None:
    """Layers that use a selected layer's weight but cannot share its quantizer stay float: one that stores the weight
    the other way round is refused when named, and said otherwise; one with no fake-quantized form (a scaled word
    embedding with a forward of its own, as BART's and Gemma3's; trial DS: left float unsaid) is said."""
    chosen = {id(t.param): t.name for t in targets}
    picked = {t.name for t in targets} | {name for partners in shared.values() for name, _ in partners}
    crossed: dict[str, str] = {}
    formless: dict[str, str] = {}
    for name, module in model.named_modules():
        first = chosen.get(id(stored_weight(module)))
        if first is None or name in picked or isinstance(module, QATLayer):
            continue
        (crossed if class_of(module) is not None else formless)[name] = first
    named = [n for n in crossed if include is not None and n in include]
    if named:
        raise ValueError(
            f"`include` names {named}, but {_described(crossed)}, stored the other way round (output channels along "
            "another axis), so the two cannot share one weight quantizer. Leave the tied layer out of `include`, or "
            "untie the weights to quantize both."
        )
    if crossed:
        warnings.warn(
            f"quantization-aware training leaves a tied layer float: {_described(crossed)}, stored the other way round "
            "(output channels along another axis), so it cannot share that layer's weight quantizer and computes with "
            "the float weight (and a compressed file stores that weight in float). Untie the weights to quantize both.",
            UserWarning,
            stacklevel=4,
        )
    if formless:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in formless})
        warnings.warn(
            f"quantization-aware training leaves a tied layer float: {_described(formless)}, and {kinds} have no "
            "fake-quantized form (a subclass with a forward or method of its own, such as a scaled word embedding), "
            "so they compute with the float weight: a compressed file stores that weight in float, and the ONNX holds "
            "it in float besides the quantized layer's copy (int8, or int4 groups). Leave the tied layer out of "
            "`include` to keep one float weight, or untie the weights.",
            UserWarning,
            stacklevel=4,
        )


def _described(partners: dict[str, str]) -> str:
    return ", ".join(f"{n!r} shares {first!r}'s weight" for n, first in list(partners.items())[:3]) + (
        " ..." if len(partners) > 3 else ""
    )
