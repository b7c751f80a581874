"""N:M semi-structured masks: at most N of every M consecutive input weights survive.

Blocks run along the input dimension (``in_features`` of a Linear, axis 0 of a ``transformers``
Conv1D; input channels of a Conv, at every output channel and kernel position), the layout of
NVIDIA's 2:4 sparse tensor cores.
The schedule ramps up to ``1 - N/M``: at an intermediate event the lowest-scored weights that
are not among the N best of their block are pruned (so no block ever loses a weight it will
need), and the last event prunes every such weight, which gives exactly N per block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .collectives import Collectives
from .importance import Importance, nonfinite_error
from .mask_counts import pruned_count, pruned_counts, weight_units
from .masks import compute_masks, target_ranking
from .selection import Target

__all__ = ["NMRule", "parse_nm"]

_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_nm(spec: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` if ``spec`` is not of that form. Raises on 0 < N < M violations."""
    match = _PATTERN.match(spec)
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m or m > 64:
        raise ValueError(f"`granularity`={spec!r}: N:M needs 0 < N < M <= 64, e.g. '2:4'.")
    return n, m


def dense_layers_note(layers: Sequence[str], m: int, granularity: str) -> str:
    """Why ``layers`` stay dense under N:M ``granularity`` (the warning of ``prune_`` and ``IterativePruning``)."""
    return (
        f"layer(s) {list(layers)} stay dense: their input size is not a multiple of {m}, so "
        f"`granularity`={granularity!r} cannot apply. `exclude` them to silence this."
    )


def block_view(tensor: Tensor, m: int, in_axis: int = 1) -> Tensor:
    """``tensor`` (a weight) as ``[..., blocks, m]`` with blocks along its input axis."""
    moved = tensor.movedim(in_axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def from_block_view(blocks: Tensor, like: Tensor, in_axis: int = 1) -> Tensor:
    moved = like.movedim(in_axis, -1)
    return blocks.reshape(moved.shape).movedim(-1, in_axis)


def eligible(param: Tensor, m: int, in_axis: int = 1) -> bool:
    """Whether ``param`` has an input axis that splits into blocks of ``m``."""
    return param.dim() >= 2 and param.shape[in_axis] % m == 0 and param.shape[in_axis] > 0


def is_nm(mask: Tensor, n: int, m: int, in_axis: int = 1) -> bool:
    """Whether at most ``n`` of every block of ``m`` along the input axis are kept."""
    return bool((block_view(mask != 0, m, in_axis).sum(-1) <= n).all())


class NMRule:
    """Mask rule of ``granularity="N:M"``; the unit is one weight.

    Args:
        targets: weights whose input size is a multiple of ``m`` (see :func:`eligible`).
        importance: how weights are ranked inside their blocks and across blocks.
        n, m: at most ``n`` of every ``m`` consecutive input weights survive.
        scope: ``"global"`` (intermediate events rank candidates across layers) or ``"layer"``.
        collectives: the processes holding the shards of sharded (FSDP2) weights. A shard holds whole rows,
            so the blocks of a weight whose input axis is its second one stay inside a shard; intermediate
            events select across shards exactly (:func:`~.masks.compute_masks`).
    """

    exchanges_weights: ClassVar[bool] = False
    min_density = 0.0

    def __init__(
        self,
        targets: Sequence[Target],
        importance: Importance,
        n: int,
        m: int,
        scope: str = "global",
        collectives: Collectives | None = None,
    ) -> None:
        self.targets = list(targets)
        self.importance = importance
        self.n = n
        self.m = m
        self.scope = scope
        self.collectives = collectives

    def units(self, masks: dict[str, Tensor]) -> tuple[int, int]:
        return weight_units(self.targets, masks, self.collectives)

    def zero_statistics(self, masks: dict[str, Tensor]) -> None:
        """Nothing: a pruned weight's zero is all there is."""

    def _scores(self, target: Target) -> Tensor:
        values, by_magnitude = target_ranking(self.importance, target)
        score = values.detach()
        # |w| before float: a complex weight's modulus (trial GM: 2:4 kept the smallest moduli, by the real part)
        score = (score.abs() if by_magnitude or score.is_complex() else score).float()
        if not bool(torch.isfinite(score).all()):
            raise nonfinite_error(f"layer {target.name!r}")
        return score

    def compute(self, sparsity: float, current: dict[str, Tensor]) -> dict[str, Tensor]:
        final = sparsity >= 1.0 - self.n / self.m - 1e-9
        candidates: dict[str, Tensor] = {}  # alive weights outside the N best of their block
        masks: dict[str, Tensor] = {}
        for target in self.targets:
            weight = target.local.detach()
            score = self._scores(target)
            previous = current.get(target.param_name)
            alive = torch.ones_like(weight, dtype=torch.bool) if previous is None else previous.to(torch.bool)
            axis = target.in_axis
            blocks = block_view(score, self.m, axis)
            live = block_view(alive, self.m, axis)
            ranked = torch.where(live, blocks, torch.full_like(blocks, -torch.inf))
            protected = torch.zeros_like(live)
            protected.scatter_(-1, ranked.topk(self.n, dim=-1).indices, True)
            protected &= live
            if final:
                masks[target.param_name] = from_block_view(protected, weight, axis)
            else:
                candidates[target.param_name] = from_block_view(live & ~protected, weight, axis)
                masks[target.param_name] = alive.clone()
        if final:
            return masks
        groups = [self.targets] if self.scope == "global" else [[t] for t in self.targets]
        for group in groups:
            total = sum(t.numel for t in group)
            k = pruned_count(sparsity, total) - sum(pruned_counts(group, masks, self.collectives).values())
            if k <= 0:
                continue
            chosen = {t.param_name: candidates[t.param_name] for t in group}
            others = sum(pruned_counts(group, chosen, self.collectives).values())  # all but the candidates
            if k >= total - others:  # every candidate goes
                kept = {name: torch.zeros_like(c) for name, c in chosen.items()}
            else:  # the k lowest-scored candidates go: an exact selection, across shards too
                kept = compute_masks(
                    group, self.importance, (others + k) / total, "global", 0.0, chosen, apply=False,
                    collectives=self.collectives,
                )  # fmt: skip
            for name, candidate in chosen.items():
                masks[name] = masks[name] & ~(candidate & ~kept[name].view(candidate.shape))
        return masks
