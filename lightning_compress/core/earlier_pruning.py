"""A model pruned before this run (``prune_``, an earlier fit): its zeros as masks to start the schedule from."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .selection import Target

__all__ = ["initialized_zeros", "zeros_as_masks"]


def initialized_zeros(weight: Tensor) -> bool:
    """Whether a weight's zeros are its initialization, not a pruning: all of it zero (a LoRA-style B matrix,
    adaLN-zero), or zeros beside one value (``nn.init.eye_``, ``dirac_``: trial CV's identity layer)."""
    values = weight.detach()
    nonzero = values[values != 0].abs()
    return nonzero.numel() == 0 or bool(nonzero.amin() == nonzero.amax())


def zeros_as_masks(targets: Sequence[Target], min_density: float) -> tuple[dict[str, Tensor], float, list[str]]:
    """The exact zeros of every selected weight as its mask (``True`` = kept), keyed by parameter name; the
    fraction of all selected weights they make; and the weights left unmasked: zeros that are an initialization
    (:func:`initialized_zeros`, a weight zero whole too) or a layer under the ``min_density`` floor (trial CW: one
    kept at 0.06% density was then said to be held at the floor). Dense weights are neither."""
    masks: dict[str, Tensor] = {}
    left: list[str] = []
    zeros = 0
    for target in targets:
        keep = target.param.detach() != 0
        kept = int(keep.sum())
        if kept == target.numel:
            continue
        if kept >= min_density * target.numel and not initialized_zeros(target.param):
            masks[target.param_name] = keep
            zeros += target.numel - kept
        else:
            left.append(target.param_name)
    return masks, zeros / max(1, sum(t.numel for t in targets)), left
