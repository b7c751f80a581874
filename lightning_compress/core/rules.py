"""Mask rules: how a granularity turns importance scores into masks.

A rule is built once with everything that does not change during a run (its weights, the
importance, the scope and the ``min_density`` floor); at each event it is only asked for a
sparsity: ``rule.compute(sparsity, current_masks)``. :func:`rule_for` builds the rule of a
granularity; the callback, :class:`~.iterative.IterativePruner` and ``prune_`` all use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from .channel_cost import ChannelCost
from .channels import ChannelRule
from .collectives import Collectives
from .group_check import faithful_groups, removable_groups
from .groups import ChannelGroup
from .importance import Importance
from .layers import class_label, linear_like_types, weight_axes
from .macs import uncalled_note, uncounted_experts, uncounted_note
from .mask_counts import weight_units
from .masks import compute_masks
from .nm import NMRule, eligible
from .selection import Target, is_experts
from .sharding import check_row_sharded, is_sharded
from .structure import build_channel_groups
from .tracing import check_example_inputs, forward_state_kept
from .wrappers import is_compiled

__all__ = ["ChannelStructure", "ElementRule", "MaskRule", "channel_structure", "rule_for"]


class MaskRule(Protocol):
    """The pattern of a granularity, configured once."""

    targets: list[Target]
    importance: Importance
    scope: str
    min_density: float
    exchanges_weights: ClassVar[bool]  # single weights may be swapped (regrowth)

    def compute(self, sparsity: float, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """Bool masks (True = kept) of every target for ``sparsity`` of the rule's units."""
        ...

    def units(self, masks: dict[str, Tensor]) -> tuple[int, int]:
        """(pruned, total) in the rule's unit: weights, or channels."""
        ...

    def zero_statistics(self, masks: dict[str, Tensor]) -> None:
        """Zero what, beside the masked weights, would make a pruned unit's output nonzero (with channels: the running
        mean of a norm without a shift)."""
        ...


class ElementRule:
    """Unstructured: any weight may go (exact global or per-layer top-k, see :mod:`.masks`).

    ``collectives``: the processes that hold the shards of sharded (FSDP2) weights (masks are then per shard).
    """

    exchanges_weights: ClassVar[bool] = True

    def __init__(
        self,
        targets: Sequence[Target],
        importance: Importance,
        scope: str,
        min_density: float,
        collectives: Collectives | None = None,
    ) -> None:
        self.targets = list(targets)
        self.importance = importance
        self.scope = scope
        self.min_density = min_density
        self.collectives = collectives

    def compute(self, sparsity: float, current: dict[str, Tensor]) -> dict[str, Tensor]:
        return compute_masks(
            self.targets, self.importance, sparsity, self.scope, self.min_density, current, apply=False,
            collectives=self.collectives,
        )  # fmt: skip

    def compute_into(self, sparsity: float, masks: dict[str, Tensor]) -> None:
        """Prune to ``sparsity`` writing into the run-time ``masks`` themselves (0/1 in any dtype, every target
        present) and zeroing the newly pruned weights: no memory beyond a few chunks, for the events that keep
        no copy of the previous masks."""
        compute_masks(
            self.targets, self.importance, sparsity, self.scope, self.min_density, masks, apply=True,
            collectives=self.collectives, out=masks,
        )  # fmt: skip

    def units(self, masks: dict[str, Tensor]) -> tuple[int, int]:
        return weight_units(self.targets, masks, self.collectives)

    def zero_statistics(self, masks: dict[str, Tensor]) -> None:
        """Nothing: a pruned weight's zero is all there is."""


@dataclass(frozen=True)
class ChannelStructure:
    """What ``granularity="channel"`` traces on a model: its prunable channel groups (by module name), the
    groups left alone with why, and what channels cost when counted in MACs.

    Traced on the whole model; it holds names and positions only, so a structure traced before the model is
    sharded (FSDP2) applies to the sharded model with the same module names.
    """

    groups: list[ChannelGroup]
    left: dict[str, str] = field(default_factory=dict)
    cost: ChannelCost | None = None


def channel_structure(
    model: nn.Module,
    targets: list[Target],
    example_inputs: Any,
    measure: str = "channels",
    argument: str = "example_inputs",
) -> ChannelStructure:
    """Trace ``model``'s channel groups among the selected ``targets`` (the dependency graph, then trial forwards that
    removing channels keeps shapes and is zeroing them: :mod:`.group_check`).

    ``argument`` names the example inputs in errors (``"example_input_array"`` for the callback).

    Raises:
        ValueError: ``forward`` fails on the example inputs, or no group can be pruned (each reason given).
    """
    compiled = [n or "the model itself" for n, m in model.named_modules() if is_compiled(m)]
    if compiled:  # trial DD: refused as "never called as a module", the wrong reason (DF: a compiled model too)
        raise ValueError(
            f"`granularity`='channel' traces the model's channels, but {compiled} are `torch.compile`d (sub)modules, "
            "whose layers the trace cannot follow: prune channels on the plain modules and compile after `compact()`, "
            "or prune with granularity='element' or an N:M pattern, which work on compiled submodules."
        )
    with forward_state_kept(model):  # the trace's forwards leave no cache behind (PyG's cached GCNConv: trial FE)
        check_example_inputs(model, example_inputs, argument)
        groups, left = build_channel_groups(model, example_inputs, producers={t.name for t in targets})
        groups, rejected = removable_groups(model, example_inputs, groups)
        left.update(rejected)
        groups, rejected = faithful_groups(model, example_inputs, groups)
        left.update(rejected)
    for target in targets:  # trial EQ: a Qwen3-MoE's experts were not among the layers said to be left whole
        if target.own_name and is_experts(target.module):
            left.setdefault(
                target.name,
                "mixture-of-experts weights stored as 3-d tensors: their channels are not pruned (compact() leaves "
                "them whole too); element or N:M pruning prunes them",
            )
        elif target.own_name:  # trial GN: a KAN layer's coefficients, named exactly, were refused with no reason
            left.setdefault(
                target.name,
                f"the tensors a {class_label(target.module)} multiplies in its own forward ({target.attr}): their "
                "channels are not pruned; element or N:M pruning prunes them",
            )
    in_groups = {module for group in groups for module in group.modules()}
    traced = (*linear_like_types(), nn.Embedding)
    for target in targets:  # trial FI: TabM's ensemble layers, named in `include`, were refused with no reason at all
        if not target.own_name and target.name not in in_groups and not isinstance(target.module, traced):
            left.setdefault(
                target.name,
                f"a {class_label(target.module)} is not a layer the channel trace reads (Linear, Conv, Conv1D, "
                "Embedding): its channels are not pruned; element or N:M pruning prunes its weight",
            )
    if not groups:
        raise ValueError(
            "`granularity`='channel' found no channel group it can prune: "
            + "; ".join(f"{name}: {why}" for name, why in left.items())
        )
    share = reachable_share(model, targets, groups)
    if share < _LOW_REACH:  # trial ES: a diffusers UNet's groups reached 0.2% of its weights, said in an INFO line
        warnings.warn(
            f"`granularity`='channel' can prune channels holding {share:.1%} of the selected weights: the other "
            "layers' channels are left whole (each with its reason, logged at INFO as 'channels left whole'), so "
            "the model stays near its size and speed whatever the target. Element or N:M pruning reaches every "
            "selected weight.",
            UserWarning,
            stacklevel=2,
        )
    cost = ChannelCost(model, example_inputs, groups) if measure == "macs" else None
    experts = uncounted_experts(model) if cost is not None else []
    uncalled = cost.uncalled if cost is not None else []
    if experts or uncalled:
        notes = ([uncounted_note(model, experts)] if experts else []) + ([uncalled_note(uncalled)] if uncalled else [])
        warnings.warn(
            f"`measure`='macs' counts the MACs of Linear/Conv layers a forward calls: {' and '.join(notes)} are not "
            "counted and not channel-pruned, so the budget is a fraction of the other layers' MACs.",
            UserWarning,
            stacklevel=2,
        )
    return ChannelStructure(groups, left, cost)


_LOW_REACH = 0.25  # below this share of the selected weights in prunable channels, channel pruning says so


def reachable_share(model: nn.Module, targets: list[Target], groups: list[ChannelGroup]) -> float:
    """The share of the selected weights that lie in the channels of ``groups`` (rows of the layers whose outputs
    they are, columns of the layers reading them): what removing every prunable channel would remove."""
    total = sum(t.numel for t in targets)
    selected = {t.name: t for t in targets if t.attr == "weight" and not t.own_name}
    reach = 0
    for group in groups:
        for piece in group.slices:
            target = selected.get(piece.module)
            if target is None:
                continue
            out_axis, in_axis = weight_axes(target.module)
            axis = out_axis if piece.kind == "out" else in_axis
            if axis < target.param.dim() and target.param.shape[axis]:
                reach += len(piece.index) * (target.numel // int(target.param.shape[axis]))
    return min(1.0, reach / total) if total else 1.0


def rule_for(
    model: nn.Module,
    targets: list[Target],
    granularity: str,
    nm: tuple[int, int] | None,
    importance: Importance,
    scope: str,
    min_density: float,
    example_inputs: Any = None,
    measure: str = "channels",
    collectives: Collectives | None = None,
    structure: ChannelStructure | None = None,
    round_to: int | None = None,
) -> tuple[MaskRule, dict[str, str]]:
    """Return the rule of ``granularity`` over the selected ``targets``, and what it leaves alone, and why.

    Args:
        model: the model the selected ``targets`` belong to.
        targets: the selected weights (:func:`~.selection.select_targets`).
        granularity: ``"element"``, ``"channel"`` or ``"N:M"`` (validated, with ``nm`` its ``(N, M)``).
        importance: the criterion (checked against the channel groups it must score).
        scope: ``"global"`` or ``"layer"``.
        min_density: the per-layer floor with global scope.
        example_inputs: for ``"channel"``: what the model's ``forward`` takes.
        measure: for ``"channel"``: the unit, ``"channels"`` or ``"macs"`` (:class:`~.channel_cost.ChannelCost`).
        collectives: the processes sharing sharded (FSDP2) weights.
        round_to: for ``"channel"``: kept channels per group in multiples of it (:class:`~.channels.ChannelRule`).
        structure: for ``"channel"``: the groups already traced (:func:`channel_structure`; required when the
            weights are sharded, as a sharded model cannot be traced); else traced here.

    Raises:
        ValueError: nothing the granularity can prune.
    """
    unsupported = [why for t in targets if (why := check_row_sharded(t.param, t.name)) is not None]
    if unsupported:
        raise ValueError(f"cannot prune these sharded weights: {unsupported[0]}.")
    sharded = [t for t in targets if is_sharded(t.param)]
    crossing = [t.name for t in sharded if nm is not None and t.in_axis == 0]
    if crossing:
        raise ValueError(
            f"`granularity`={granularity!r} cannot prune sharded (FSDP2) weights {crossing[:3]}: they are stored "
            "(in, out), so N:M blocks along their input run down the shards' rows. Use granularity='element', or "
            "strategy='ddp'."
        )
    if granularity == "channel" and sharded and structure is None:
        raise ValueError(
            f"`granularity`='channel' cannot trace a sharded (FSDP2) model ({sharded[0].name} is sharded): trace "
            "the whole model before `fully_shard` with `lightning_compress.core.rules.channel_structure(model, "
            "targets, example_inputs)` and pass it as `IterativePruner(..., structure=...)` (the IterativePruning "
            "callback does this at `setup`)."
        )
    if nm is not None:
        m = nm[1]
        kept = [t for t in targets if eligible(t.param, m, t.in_axis)]
        if not kept:
            raise ValueError(
                f"`granularity`={granularity!r} needs layers whose input size is a multiple of {m}; "
                f"none of the selected layers {[t.name for t in targets]} has one."
            )
        left = {
            t.key: f"its input size is not a multiple of {m}" for t in targets if not eligible(t.param, m, t.in_axis)
        }
        return NMRule(kept, importance, nm[0], nm[1], scope, collectives), left
    if granularity != "channel":
        return ElementRule(targets, importance, scope, min_density, collectives), {}
    if structure is None:
        structure = channel_structure(model, targets, example_inputs, measure)
    rule = ChannelRule(model, structure.groups, importance, scope, min_density, structure.cost, collectives, round_to)
    unsupported = [why for t in rule.targets if (why := check_row_sharded(t.param, t.name)) is not None]
    if unsupported:
        raise ValueError(f"cannot prune these sharded weights: {unsupported[0]}.")
    return rule, dict(structure.left)
