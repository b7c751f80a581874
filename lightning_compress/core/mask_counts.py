"""Counting masked and zero weights, shards of a sharded (FSDP2) weight summed across processes.

Run-time masks are 0/1 in the weight's dtype; reading them through an integer view of the same bytes
(:func:`mask_bits`) makes comparing and counting about 5x faster on CPU than on the floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .collectives import Collectives
from .selection import Target
from .sharding import is_sharded

__all__ = ["kept_count", "mask_bits", "pruned_count", "pruned_counts", "weight_units", "zero_counts"]


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_bits(mask: Tensor) -> Tensor:
    """A 0/1 float mask seen as integers of the same width (0 stays 0): comparing or counting those is
    about 5x faster on CPU than on the floats."""
    if not mask.is_floating_point():
        return mask
    return mask.view(_SAME_WIDTH_INT[mask.element_size()])


def kept_count(mask: Tensor) -> int:
    """Entries of a mask (bool, or 0/1 in any dtype) that are kept."""
    return int(mask_bits(mask).count_nonzero())


def pruned_count(sparsity: float, n: int) -> int:
    """Units pruned of ``n`` at ``sparsity``: the nearest count, a half rounded up (Python's ``round`` rounds halves
    to even: at 0.5 it pruned 2 of 3 heads and 2 of 5, a trial). Rounded to 9 places first, so that floating point
    (``0.7 * 5`` is ``3.4999999999999996``) does not decide a half."""
    return math.floor(round(sparsity * n, 9) + 0.5)


def pruned_counts(
    targets: Sequence[Target], masks: dict[str, Tensor], collectives: Collectives | None = None
) -> dict[str, int]:
    """Pruned weights per masked parameter name, the shards of a sharded weight summed (one collective)."""
    chosen = [t for t in targets if t.param_name in masks]
    local = [masks[t.param_name].numel() - kept_count(masks[t.param_name]) for t in chosen]
    return _summed(chosen, local, collectives)


def weight_units(
    targets: Sequence[Target], masks: dict[str, Tensor], collectives: Collectives | None = None
) -> tuple[int, int]:
    """(pruned, total) weights over ``targets``: the units of the rules that prune single weights."""
    return sum(pruned_counts(targets, masks, collectives).values()), sum(t.numel for t in targets)


def zero_counts(targets: Sequence[Target], collectives: Collectives | None = None) -> dict[str, int]:
    """Exact zeros in each selected weight, keyed by parameter name, the shards of a sharded weight summed.

    ``numel - count_nonzero``: about 4x faster on CPU than summing ``weight == 0`` (no bool tensor), and ``-0.0``
    counts as zero."""
    return _summed(targets, [t.local.numel() - int(t.local.detach().count_nonzero()) for t in targets], collectives)


def _summed(targets: Sequence[Target], local: list[int], collectives: Collectives | None) -> dict[str, int]:
    names = [t.param_name for t in targets]
    sharded = [is_sharded(t.param) for t in targets]
    if collectives is None or collectives.world_size == 1 or not any(sharded):
        return dict(zip(names, local, strict=True))
    counts = torch.tensor([c if s or collectives.rank == 0 else 0 for c, s in zip(local, sharded, strict=True)])
    return dict(zip(names, collectives.all_reduce(counts, "sum").tolist(), strict=True))
