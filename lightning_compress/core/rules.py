"""The mask rule of a granularity, and the weights it applies to (shared by the callback and ``prune_``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .channels import ChannelRule
from .compact import removable_groups
from .importance import Importance
from .nm import NMRule, eligible
from .pruner import MaskRule
from .selection import Target
from .structure import build_channel_groups

__all__ = ["rule_for"]


def rule_for(
    model: nn.Module,
    targets: list[Target],
    granularity: str,
    nm: tuple[int, int] | None,
    importance: Importance,
    example_inputs: Any = None,
) -> tuple[list[Target], MaskRule | None, dict[str, str]]:
    """Return the targets to mask, the rule (``None``: element-wise) and what is left alone, and why.

    Args:
        model: the model the selected ``targets`` belong to.
        targets: the selected weights (:func:`~.selection.select_targets`).
        granularity: ``"element"``, ``"channel"`` or ``"N:M"`` (validated, with ``nm`` its ``(N, M)``).
        importance: checked against the channel groups (``bn_scale`` needs a BatchNorm in each).
        example_inputs: for ``"channel"``: what the model's ``forward`` takes.

    Raises:
        ValueError: nothing the granularity can prune.
    """
    if nm is not None:
        m = nm[1]
        kept = [t for t in targets if eligible(t.param, m)]
        if not kept:
            raise ValueError(
                f"`granularity`={granularity!r} needs layers whose input size is a multiple of {m}; "
                f"none of the selected layers {[t.name for t in targets]} has one."
            )
        left = {t.name: f"its input size is not a multiple of {m}" for t in targets if not eligible(t.param, m)}
        return kept, NMRule(*nm), left
    if granularity != "channel":
        return targets, None, {}
    groups, left = build_channel_groups(model, example_inputs, producers={t.name for t in targets})
    groups, rejected = removable_groups(model, example_inputs, groups)
    left.update(rejected)
    if not groups:
        raise ValueError(
            "`granularity`='channel' found no channel group it can prune: "
            + "; ".join(f"{name}: {why}" for name, why in left.items())
        )
    rule = ChannelRule(model, groups)
    rule.check(importance)
    return rule.targets, rule, left
