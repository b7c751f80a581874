"""Channel pruning: score whole channel groups and mask every parameter slice they own.

A :class:`ChannelRule` turns the :class:`~.structure.ChannelGroup` records of a model into the
per-parameter masks the :class:`~.pruner.Pruner` keeps (so gradients, optimizer state, undo,
rewinding and checkpoints work exactly as for unstructured pruning); its unit is a channel.

Channel scores sum an importance over every weight of the channel's group (the producing
layers' filters and biases, the BatchNorm scale and shift, the consuming layers' input
weights): ``"magnitude"`` sums ``w**2`` (the group's squared L2 norm), ``"taylor"`` sums the
accumulated ``|w * dL/dw|``, ``"bn_scale"`` sums ``|gamma|`` of the group's BatchNorms (Liu
et al. 2017, network slimming). With global scope each group's scores are divided by their
mean over its live channels, so one threshold can compare layers of different scale.

With a :class:`~.channel_cost.ChannelCost` the rule's unit is a multiply-accumulate instead of a
channel (``measure="macs"``): ``sparsity`` is the fraction of the dense model's MACs removed. Global
scope then ranks channels by normalized score per MAC their removal saves (a channel of a wide,
high-resolution layer costs more, so it must be worth more to stay) and prunes in that order until
the MACs fit; layer scope prunes the same fraction of channels in every group, the smallest that
fits (the uniform allocation of Torch-Pruning at the same compute).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from .channel_cost import ChannelCost
from .collectives import Collectives, TorchDistributed
from .groups import ChannelGroup, nonzero_channels, param_slices, per_position, unshifted_mean
from .importance import Importance, MagnitudeImportance, nonfinite_error
from .mask_counts import pruned_count
from .masks import floor_count
from .quant_blocks import channel_blocks
from .selection import Target
from .sharding import is_sharded, row_range
from .wrappers import modules_by_name

__all__ = ["ChannelRule"]


class _Part:
    """One parameter's share of a group: positions along ``dim`` and their channels.

    ``local_index``/``local_channel``: the positions this process's shard holds (in the shard) and their
    channels; for a parameter that is not sharded, or cut along another dim than its rows, all of them.
    """

    def __init__(self, target: Target, dim: int, index: Tensor, channel: Tensor) -> None:
        self.target = target
        self.dim = dim
        self.index = index
        self.channel = channel
        self.local_index, self.local_channel = index, channel
        if dim == 0 and is_sharded(target.param):
            start, stop = row_range(target.param)
            held = (index >= start) & (index < stop)
            self.local_index, self.local_channel = index[held] - start, channel[held]


class ChannelRule:
    """Mask rule of ``granularity="channel"``: the pruned unit is a channel group's channel.

    Args:
        model: the model the groups were traced on.
        groups: its prunable channel groups (:func:`~.structure.build_channel_groups`).
        importance: scores channels through :meth:`~.importance.Importance.channel_contribution`
            (default: magnitude, the squared L2 norm of the group's slices).
        scope: ``"global"`` (one threshold over mean-normalized scores) or ``"layer"``.
        min_density: every group keeps at least this fraction of its channels (and at least one).
        cost: count multiply-accumulates instead of channels (``measure="macs"``).
        collectives: the processes sharing sharded (FSDP2) parameters (default: ``torch.distributed``'s).
        round_to: every group of output channels (not heads, not groups a group-wise quantized layer reads in
            blocks) keeps a multiple of this many channels, rounded down (more pruned, so the target or the MACs
            budget still holds), at least one multiple or all it has: compacted widths that fast convolution
            layouts take whole (onnxruntime's wants multiples of 8 or 16). ``None``: any count.
    """

    exchanges_weights: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        importance: Importance | None = None,
        scope: str = "global",
        min_density: float = 0.0,
        cost: ChannelCost | None = None,
        collectives: Collectives | None = None,
        round_to: int | None = None,
    ) -> None:
        if not groups:
            raise ValueError("no prunable channel group: nothing for granularity='channel' to prune.")
        modules = modules_by_name(model)  # (traced before `configure_model` wrapped blocks: trial GD)
        self.groups = list(groups)
        self.importance = MagnitudeImportance() if importance is None else importance
        self.scope = scope
        self.min_density = min_density
        self.cost = cost
        self.round_to = round_to
        self.targets: list[Target] = []
        by_param: dict[int, Target] = {}
        self._parts: list[list[_Part]] = []
        for group in self.groups:
            parts = []
            for s in group.slices:
                module = modules[s.module]
                for attr, dim in param_slices(module, s.kind):
                    param = getattr(module, attr)
                    target = by_param.get(id(param))
                    if target is None:
                        target = by_param[id(param)] = Target(s.module, module, param, attr)
                        self.targets.append(target)
                    parts.append(_Part(target, dim, s.index, s.channel))
            self._parts.append(parts)
        # norms without a shift whose running mean a pruned channel would turn into a nonzero constant
        self._means = [
            [(modules[s.module], s.index, s.channel) for s in group.slices if unshifted_mean(modules[s.module])]
            for group in self.groups
        ]
        self.total_channels = sum(g.size for g in self.groups)
        self._model = model
        self.collectives: Collectives = collectives or TorchDistributed()
        self.sharded = any(is_sharded(t.param) for t in self.targets)
        self._check(self.importance)
        self._short_of_budget = False  # warned that the MACs budget cannot be met

    # ------------------------------------------------------------------ state of the masks
    def alive(self, masks: dict[str, Tensor]) -> list[Tensor]:
        """Per group, a bool tensor of the channels still kept under ``masks``."""
        if self.sharded:
            return self._alive_sharded(masks)
        out = []
        for group, parts in zip(self.groups, self._parts, strict=True):
            kept = torch.ones(group.size, dtype=torch.bool)
            for part in parts:
                mask = masks.get(part.target.param_name)
                if mask is None:
                    continue
                kept &= nonzero_channels(mask, part.dim, part.index, part.channel, group.size)
                break  # every part of a channel is masked together: one is enough
            out.append(kept)
        return out

    def zero_statistics(self, masks: dict[str, Tensor]) -> None:
        """The running mean of a pruned channel in a norm without a shift (``BatchNorm2d(affine=False)``) is set to
        zero, so the channel's output is zero in eval mode too, as its masked filter makes it in training (trial FN:
        kornia's HardNet, whose pruned channels gave ``-running_mean / sqrt(running_var)``, up to 0.66, into its
        final L2 normalization: the model validated was not the zeroed one, and ``compact()`` kept 64 zero filters).
        Training then keeps it at zero: the batch mean of a zero channel is zero. Not for weights sharded by FSDP2,
        whose channels are counted across processes."""
        if self.sharded or not any(self._means):
            return
        for kept, norms in zip(self.alive(masks), self._means, strict=True):
            for module, index, channel in norms:
                dead = ~kept[channel]
                if bool(dead.any()):
                    mean = module.running_mean
                    mean[index[dead].to(mean.device)] = 0

    def at_floor(self, masks: dict[str, Tensor]) -> list[str]:
        """The groups that keep no more channels than their floor (``min_density``, and at least one) under
        ``masks`` (a collective when sharded: every process calls it)."""
        blocks = channel_blocks(modules_by_name(self._model), self.groups)
        held = []
        for group, kept, block in zip(self.groups, self.alive(masks), blocks, strict=True):
            floor, count = max(1, floor_count(self.min_density, group.size)), int(kept.sum())
            if block is not None and count:  # channels leave a quantization block at a time (trial CA)
                sizes = torch.bincount(block[kept])
                smallest = int(sizes[sizes > 0].min())
                count -= smallest - 1
            elif self.round_to is not None and group.attention is None and count:  # they leave a multiple at a time
                count -= _unit_step(self.round_to, group) - 1
            if count <= floor:
                held.append(group.name)
        return held

    def _alive_sharded(self, masks: dict[str, Tensor]) -> list[Tensor]:
        """:meth:`alive` from this process's shards of the masks: kept entries per channel, summed over processes."""
        counts = []
        for group, parts in zip(self.groups, self._parts, strict=True):
            count = torch.zeros(group.size, dtype=torch.float64)
            for part in parts:
                mask = masks.get(part.target.param_name)
                if mask is None:  # not masked yet: all kept
                    kept = torch.ones(part.local_channel.numel(), dtype=torch.float64)
                else:
                    kept = per_position(mask.double(), part.dim, part.local_index).cpu()
                count.index_add_(0, part.local_channel, kept)
            counts.append(count)
        return [c > 0 for c in self._sum_over_processes(counts)]

    def _sum_over_processes(self, values: list[Tensor]) -> list[Tensor]:
        """Every group's per-channel values summed over the processes (one collective for all groups)."""
        device = self.targets[0].local.device
        flat = self.collectives.all_reduce(torch.cat(values).to(device), "sum").cpu()
        return list(flat.split([v.numel() for v in values]))

    def units(self, masks: dict[str, Tensor]) -> tuple[int, int]:
        """(pruned channels, prunable channels); with a cost, (MACs removed, dense MACs)."""
        if self.cost is not None:
            removed = self.cost.dense - self.cost.remaining(self.alive(masks)) if masks else 0.0
            return round(removed), self.cost.dense
        pruned = sum(int((~a).sum()) for a in self.alive(masks)) if masks else 0
        return pruned, self.total_channels

    # ------------------------------------------------------------------ scoring
    def _check(self, importance: Importance) -> None:
        """Raise if ``importance`` cannot score every group (e.g. BatchNorm scales without a BatchNorm)."""
        reasons: dict[str, list[str]] = {}
        for group, parts in zip(self.groups, self._parts, strict=True):
            why = importance.cannot_score([p.target.module for p in parts])
            if why is not None:
                reasons.setdefault(why, []).append(group.name)
        if reasons:
            raise ValueError(
                "; ".join(f"`importance`={importance!r} {why}; {names} have none" for why, names in reasons.items())
                + ". `exclude` those layers or use importance='magnitude'/'taylor'."
            )

    def scores(self) -> list[Tensor]:
        """One float64 score per channel of every group (higher = more important)."""
        out = []
        for group, parts in zip(self.groups, self._parts, strict=True):
            score = torch.zeros(group.size, dtype=torch.float64)
            for part in parts:
                target = part.target
                if self.sharded and not is_sharded(target.param) and self.collectives.rank != 0:
                    continue  # a whole (replicated) parameter among sharded ones: counted once, by rank 0
                if self.sharded:
                    values = self.importance.shard_channel_contribution(
                        target.key, target.local, target.module, target.offset
                    )
                else:
                    values = self.importance.channel_contribution(target.key, target.param, target.module)
                if values is None:
                    continue
                per = per_position(values.detach().double(), part.dim, part.local_index).cpu()
                score.index_add_(0, part.local_channel, per)
            out.append(score)
        if self.sharded:
            out = self._sum_over_processes(out)
        for group, score in zip(self.groups, out, strict=True):
            if not bool(torch.isfinite(score).all()):
                raise nonfinite_error(f"channel group {group.name!r}")
        return out

    # ------------------------------------------------------------------ selection
    def compute(self, sparsity: float, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """Bool masks (True = kept) for every target, with ``sparsity`` of the channels pruned (or more: channels
        that share a quantization block of a layer they feed, QAT's ``group_size``, go together, so a block the
        selection cuts into goes whole; trials AW and BC: scattered over the blocks, ``compact`` removed none)."""
        alive = self.alive(current)
        # read now: QAT may convert the layers after the rule is built (trial CA: the rule's own modules were the
        # float layers conversion replaced)
        blocks = channel_blocks(modules_by_name(self._model), self.groups)
        scores = [s if b is None else _pooled(s, b) for s, b in zip(self.scores(), blocks, strict=True)]
        floors = [max(1, floor_count(self.min_density, g.size)) for g in self.groups]
        kept = self._whole(self._select(sparsity, alive, scores, floors, blocks), alive, blocks, scores, floors)
        self._warn_if_short(sparsity, kept)
        return self.masks_for(kept)

    def _whole(
        self, kept: list[Tensor], alive: list[Tensor], blocks: list[Tensor | None], scores: list[Tensor],
        floors: list[int],
    ) -> list[Tensor]:  # fmt: skip
        """``kept`` with every quantization block the selection cut into removed whole (:func:`_whole_blocks`), and
        with ``round_to``, every other group's count a multiple (:func:`_aligned`)."""
        out = []
        for group, k, live, b, score, floor in zip(self.groups, kept, alive, blocks, scores, floors, strict=True):
            if b is not None:
                k = _whole_blocks(k, live, b, score, floor)
            elif self.round_to is not None and group.attention is None:
                k = _aligned(k, live, score, floor, _unit_step(self.round_to, group))
            out.append(k)
        return out

    def _select(
        self,
        sparsity: float,
        alive: list[Tensor],
        scores: list[Tensor],
        floors: list[int],
        blocks: list[Tensor | None],
    ) -> list[Tensor]:
        """Per group, the channels kept at ``sparsity`` (of the channels, or of the MACs with a cost)."""
        if self.cost is not None:
            return self._fit_macs(sparsity, alive, scores, floors, self.cost, blocks)
        new_alive: list[Tensor] = []
        if self.scope == "layer":
            for score, live, group, floor in zip(scores, alive, self.groups, floors, strict=True):
                k = min(pruned_count(sparsity, group.size), group.size - floor)
                new_alive.append(_keep_top(score, live, k))
        else:
            ranked = []
            for g, (score, live, floor) in enumerate(zip(scores, alive, floors, strict=True)):
                mean = score[live].mean() if bool(live.any()) else torch.tensor(1.0, dtype=torch.float64)
                normalized = score / mean if float(mean) > 0 else score
                normalized = torch.where(live, normalized, torch.full_like(normalized, -math.inf))
                order = torch.sort(normalized, stable=True).indices[: self.groups[g].size - floor]
                ranked.append((normalized[order], torch.full_like(order, g), order))
            values = torch.cat([r[0] for r in ranked])
            owner = torch.cat([r[1] for r in ranked])
            position = torch.cat([r[2] for r in ranked])
            pruned_before = sum(int((~live).sum()) for live in alive)
            k = min(max(pruned_count(sparsity, self.total_channels), pruned_before), values.numel())
            chosen = torch.sort(values, stable=True).indices[:k]
            for g, group in enumerate(self.groups):
                keep = torch.ones(group.size, dtype=torch.bool)
                keep[position[chosen[owner[chosen] == g]]] = False
                new_alive.append(keep & alive[g])  # pruned channels stay pruned
        return new_alive

    def _fit_macs(
        self,
        sparsity: float,
        alive: list[Tensor],
        scores: list[Tensor],
        floors: list[int],
        cost: ChannelCost,
        blocks: list[Tensor | None],
    ) -> list[Tensor]:
        """Kept channels whose MACs are at most ``1 - sparsity`` of the dense model's (or as close as floors allow),
        counted after whole quantization blocks (trial CA: counted before, blocks that came back missed the budget)."""
        budget = (1.0 - sparsity) * cost.dense
        if self.scope == "layer":
            # each group's channels from the lowest score up (pruned ones first), sorted once
            orders = [_ascending(score, live) for score, live in zip(scores, alive, strict=True)]
            before = [int((~live).sum()) for live in alive]

            def uniform(fraction: float) -> list[Tensor]:
                keep = []
                for order, g, floor, pruned in zip(orders, self.groups, floors, before, strict=True):
                    kept = torch.ones(g.size, dtype=torch.bool)
                    kept[order[: max(min(pruned_count(fraction, g.size), g.size - floor), pruned)]] = False
                    keep.append(kept)
                return self._whole(keep, alive, blocks, scores, floors)

            low, high = 0.0, 1.0
            for _ in range(40):  # the smallest uniform fraction that fits
                middle = (low + high) / 2
                low, high = (low, middle) if cost.remaining(uniform(middle)) <= budget else (middle, high)
            return uniform(high)
        per_channel = cost.per_channel()
        mean_cost = float(torch.cat(per_channel).mean()) or 1.0
        ranked = []
        for g, (score, live, floor, costs) in enumerate(zip(scores, alive, floors, per_channel, strict=True)):
            mean = score[live].mean() if bool(live.any()) else torch.tensor(1.0, dtype=torch.float64)
            normalized = score / mean if float(mean) > 0 else score
            normalized = torch.where(live, normalized, torch.full_like(normalized, -math.inf))
            order = torch.sort(normalized, stable=True).indices[: self.groups[g].size - floor]
            per_mac = normalized[order] / (costs[order] / mean_cost).clamp_min(1e-12)
            ranked.append((per_mac, torch.full_like(order, g), order))
        chosen = torch.sort(torch.cat([r[0] for r in ranked]), stable=True).indices  # pruned channels (-inf) first
        owner = torch.cat([r[1] for r in ranked])[chosen]
        position = torch.cat([r[2] for r in ranked])[chosen]

        def after(k: int) -> list[Tensor]:
            keep = [live.clone() for live in alive]
            for g, kept in enumerate(keep):
                kept[position[:k][owner[:k] == g]] = False
            return self._whole(keep, alive, blocks, scores, floors)

        low, high = 0, chosen.numel()  # the fewest channels, in priority order, whose removal fits
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if cost.remaining(after(middle)) <= budget else (middle + 1, high)
        return after(low)

    def _warn_if_short(self, sparsity: float, kept: list[Tensor]) -> None:
        """Say once when the channels this rule may prune cannot bring the model down to the target (of the MACs, or
        of the channels: trial CL, `prune_(..., round_to=8)` pruned 55% of 60% without a word)."""
        if self._short_of_budget:
            return
        cost = self.cost
        if cost is not None:
            left = cost.remaining(kept) / cost.dense
            if left <= (1.0 - sparsity) + 1e-9:
                return
        else:
            left = sum(int(k.sum()) for k in kept) / self.total_channels
            # a group's count is rounded (layer scope): short only by more than that, with a group at its floor
            if left * self.total_channels <= (1.0 - sparsity) * self.total_channels + len(self.groups) / 2 + 1e-9:
                return
            if not self.at_floor(self.masks_for(kept)):
                return
        self._short_of_budget = True
        what = "MACs" if cost is not None else "channels"
        groups = ", ".join(  # in channels: a GroupNorm's group is a unit of several (trial FG: "4/4" for 16)
            f"{g.name} {int(k.sum()) * g.unit_channels}/{g.size * g.unit_channels}"
            for g, k in zip(self.groups, kept, strict=True)
        )
        rounded = (
            f"one multiple of `round_to`={self.round_to} (counts go down to a multiple), " if self.round_to else ""
        )
        warnings.warn(
            f"measure={'macs' if cost is not None else 'channels'!r}: the schedule asks for {1.0 - sparsity:.1%} of "
            f"the dense {what} at this event, but the channel groups that can be pruned are at their floors "
            f"({groups} channels kept; {rounded}`min_density`, at least one channel, whole quantization groups) "
            f"with {left:.1%} left"
            + (": the rest is in layers left whole (see the channel groups' log)" if cost is not None else "")
            + ". Pruning goes no further than the floors.",
            UserWarning,
            stacklevel=2,
        )

    def masks_for(self, alive: Sequence[Tensor]) -> dict[str, Tensor]:
        """Bool parameter masks that keep exactly the ``alive`` channels of every group (this process's shards of
        them for sharded parameters)."""
        masks = {t.param_name: torch.ones_like(t.local, dtype=torch.bool) for t in self.targets}
        for parts, keep in zip(self._parts, alive, strict=True):
            for part in parts:
                dead = ~keep[part.local_channel]
                if bool(dead.any()):
                    mask = masks[part.target.param_name]
                    mask.index_fill_(part.dim, part.local_index[dead].to(mask.device), False)
        return masks


def _unit_step(round_to: int, group: ChannelGroup) -> int:
    """The units of ``group`` that make a multiple of ``round_to`` channels (a GroupNorm's group is a unit of several
    channels: 8 channels with groups of 4 are 2 units)."""
    return round_to // math.gcd(round_to, group.unit_channels)


def _pooled(score: Tensor, blocks: Tensor) -> Tensor:
    """Every channel scored by the mean of its block's (``blocks``: a label per channel), so a block's channels
    rank together."""
    n = int(blocks.max()) + 1
    total = torch.zeros(n, dtype=score.dtype).index_add_(0, blocks, score)
    count = torch.zeros(n, dtype=score.dtype).index_add_(0, blocks, torch.ones_like(score))
    return (total / count.clamp_min(1))[blocks]


def _whole_blocks(keep: Tensor, live: Tensor, blocks: Tensor, score: Tensor, floor: int) -> Tensor:
    """``keep`` with every block the selection cut into this time (a channel of ``live`` not kept) removed whole;
    blocks come back, best scored first, while fewer than ``floor`` channels stay."""
    n = int(blocks.max()) + 1
    cut = torch.zeros(n, dtype=torch.bool)
    cut[blocks[live & ~keep]] = True
    out = keep & ~cut[blocks]
    if int(out.sum()) < floor:
        for block in sorted(cut.nonzero().flatten().tolist(), key=lambda b: -float(score[blocks == b][0])):
            out |= (blocks == block) & live
            if int(out.sum()) >= floor:
                break
    return out


def _aligned(keep: Tensor, live: Tensor, score: Tensor, floor: int, multiple: int) -> Tensor:
    """``keep`` with its count rounded down to a multiple of ``multiple`` (its lowest-scored channels go too), or up
    to the smallest multiple at or above ``floor`` (the best-scored live channels come back), or all ``live``."""
    count, available = int(keep.sum()), int(live.sum())
    want = count // multiple * multiple
    if want < max(1, floor):
        want = min(available, -(-max(1, floor) // multiple) * multiple)
    if want == count:
        return keep
    out = keep.clone()
    if want < count:
        drop = torch.where(keep, score, torch.full_like(score, math.inf))
        out[torch.sort(drop, stable=True).indices[: count - want]] = False
    else:
        back = torch.where(live & ~keep, score, torch.full_like(score, -math.inf))
        out[torch.sort(back, descending=True, stable=True).indices[: want - count]] = True
    return out


def _ascending(score: Tensor, live: Tensor) -> Tensor:
    """Channel positions from the lowest score up; already pruned ones (``~live``) first."""
    return torch.sort(torch.where(live, score, torch.full_like(score, -math.inf)), stable=True).indices


def _keep_top(score: Tensor, live: Tensor, k: int) -> Tensor:
    """Keep all but the ``k`` lowest-scored channels; already pruned ones count first."""
    keep = torch.ones_like(live)
    keep[_ascending(score, live)[: max(k, int((~live).sum()))]] = False
    return keep
