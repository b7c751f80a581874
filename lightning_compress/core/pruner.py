"""Mask bookkeeping for iterative pruning, independent of any training framework.

A :class:`Pruner` owns the masks of a set of :class:`~.selection.Target` weights. At run time
each mask is kept in the weight's dtype and device (multiplying by a float mask is ~10x faster
than by a bool mask on CPU); in :meth:`Pruner.state_dict` masks are bool, on CPU.

Under FSDP2 a weight is a ``DTensor`` sharded by rows: its mask, saved values and gradient statistics
are those of this process's shard (:attr:`~.selection.Target.local`), and :meth:`Pruner.state_dict`
gathers them whole (every process must call it), so a checkpoint looks the same as an unsharded run's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .collectives import Collectives
from .importance import Importance
from .mask_counts import mask_bits, pruned_count, pruned_counts
from .masks import compute_masks, zero_pruned_
from .rules import MaskRule
from .selection import Target
from .sharding import gather_flat, is_sharded, local, local_part

__all__ = ["Pruner"]

MaskSync = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class Pruner:
    """Keeps the masks of one :class:`~.rules.MaskRule`'s weights: prunes to a sparsity, keeps pruned
    weights at zero, undoes the last step.

    Args:
        rule: the mask pattern with its weights, importance, scope and floor (:func:`~.rules.rule_for`).
        regrow: fraction of the kept weights swapped at an event (rules that exchange single
            weights only): the lowest-scored kept weights are pruned and as many pruned weights with
            the largest gradient magnitude since the last event come back, at zero (GraNet's
            neuroregeneration, Liu et al. 2021); across layers with global scope, inside each
            layer with layer scope. The sparsity is unchanged; ``0`` turns it off.
        collectives: the processes that hold the shards of sharded (FSDP2) weights.
    """

    def __init__(self, rule: MaskRule, regrow: float = 0.0, collectives: Collectives | None = None) -> None:
        self.rule = rule
        if not 0.0 <= regrow < 1.0:
            raise ValueError(f"`regrow` must be in [0, 1), got {regrow!r}.")
        if regrow > 0 and not rule.exchanges_weights:
            raise ValueError(
                f"`regrow`={regrow} exchanges single weights: it needs the element rule, not {type(rule).__name__}."
            )
        self.targets = list(rule.targets)
        self.regrow = regrow
        self._grads: dict[str, Tensor] = {}  # |dL/dw| summed since the last event, when regrowing
        self._masks: dict[str, Tensor] = {}
        self._counts: dict[str, int] | None = None  # cached pruned weights per masked parameter
        self._units: tuple[int, int] | None = None  # cached (pruned, total) in the rule's units
        self._rollback: dict[str, tuple[Tensor, Tensor]] | None = None  # name -> (previous mask, revived values)
        self._rewind: dict[str, Tensor] | None = None
        self._overflowed = 0  # steps since the last event whose gradients were not all finite (none observed)
        self._observed = False  # an importance that accumulates observed a step since the last event
        self._by_name = {t.param_name: t for t in self.targets}
        self.collectives = collectives
        self.sharded = any(is_sharded(t.param) for t in self.targets)

    @property
    def importance(self) -> Importance:
        return self.rule.importance

    @property
    def scope(self) -> str:
        return self.rule.scope

    @property
    def min_density(self) -> float:
        return self.rule.min_density

    # ------------------------------------------------------------------ queries
    @property
    def total(self) -> int:
        return sum(t.numel for t in self.targets)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Run-time masks in each weight's dtype (1 = kept, 0 = pruned), keyed by parameter name."""
        return self._masks

    @masks.setter
    def masks(self, value: dict[str, Tensor]) -> None:
        self._masks = value
        self._counts = self._units = None

    def pruned_counts(self) -> dict[str, int]:
        """Pruned weights per masked parameter, whole (the shards of a sharded weight summed)."""
        if self._counts is None:
            self._counts = pruned_counts(self.targets, self._masks, self.collectives)
        return self._counts

    def units(self) -> tuple[int, int]:
        """(pruned, total) in the rule's unit: weights, or channels with a channel rule."""
        if self._units is None:
            self._units = self.rule.units(self._masks)
        return self._units

    def masked_sparsity(self) -> float:
        """Fraction of the selected units (weights or channels) under a mask (0 before the first event)."""
        pruned, total = self.units()
        return pruned / total if total else 0.0

    def bool_masks(self) -> dict[str, Tensor]:
        return {name: mask_bits(m).bool() for name, m in self.masks.items()}

    # ------------------------------------------------------------------ pruning
    def prune_to(
        self,
        sparsity: float,
        *,
        keep_undo: bool = False,
        sync: MaskSync | None = None,
        regrow: float | None = None,
        join_undo: bool = False,
    ) -> bool:
        """Prune to ``sparsity`` (never below the current one). Returns whether anything changed.

        ``sync`` may replace the computed masks (e.g. by rank 0's under DDP) before they are applied.
        ``regrow``: the fraction to regrow at this event instead of :attr:`regrow` (``0``: none, as
        at the callback's last event, which is an exact top-k). ``join_undo`` (with ``keep_undo``): :meth:`undo`
        then undoes this event and the last one together, back to the masks before that one.
        """
        pruned, total = self.units()
        if pruned_count(sparsity, total) <= pruned and self.scope == "global":
            return False
        if self._overflowed and not self._observed and self.importance.accumulates:
            return False  # every step since the last event overflowed: no scores yet, the next event prunes for both
        fraction = self.regrow if regrow is None else regrow
        in_place = getattr(self.rule, "compute_into", None)
        if in_place is not None and not keep_undo and sync is None and not (fraction > 0 and self._grads):
            return self._prune_in_place(in_place, sparsity, pruned)
        current = self.bool_masks()
        new = self.rule.compute(sparsity, current)
        if fraction > 0 and self._grads:
            self._regrow(new, current, fraction)
        self._grads.clear()
        if sync is not None:
            new = sync(new)
        changed = any(name not in current or not torch.equal(mask, current[name]) for name, mask in new.items())
        group = self._group()
        if group is not None:  # a shard may be unchanged where another changed: decide together
            changed = bool(group.all_reduce(torch.tensor([int(changed)]), "max").item())
        if not changed:
            return False
        if keep_undo:
            self._rollback = self._undo_record(new, current, self._rollback if join_undo else None)
        for name in list(new):
            mask = new.pop(name)  # free each bool mask once converted
            existing = self._masks.get(name)
            if existing is not None:
                existing.copy_(mask)  # reuse the buffer: no new allocation at later events
            else:
                self._masks[name] = mask.to(self._by_name[name].local.dtype)
        self._after_event()
        return True

    def _undo_record(
        self, new: dict[str, Tensor], current: dict[str, Tensor], last: dict[str, tuple[Tensor, Tensor]] | None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per weight: the masks an undo goes back to, and the values of the weights it revives, in position order
        (``current`` before this event; ``last``: the record of the event before it, joined to this one's)."""
        record = {}
        for name, mask in new.items():
            weight = self._by_name[name].local.detach()
            previous = current.get(name, torch.ones_like(mask))
            if last is not None and name in last:
                earlier, values = last[name]
                whole = weight.clone()  # this event's revived weights hold their values now, the last one's its own
                whole[earlier & ~previous] = values.to(whole.dtype)
                previous, weight = earlier, whole
            record[name] = (previous, weight[previous & ~mask].clone())
        return record

    def _prune_in_place(self, compute_into: Callable[[float, dict[str, Tensor]], None], sparsity: float,
                        pruned: int) -> bool:  # fmt: skip
        """An event that keeps no undo record and needs no agreement step: the rule writes the run-time masks
        directly and zeroes the weights it prunes, in one pass. Its unit is one weight, and masks only lose
        weights here, so the pruned count tells whether anything changed."""
        for target in self.targets:
            if target.param_name not in self._masks:
                self._masks[target.param_name] = torch.ones_like(
                    target.local.detach(), memory_format=torch.contiguous_format
                )
        compute_into(sparsity, self._masks)
        self._grads.clear()
        self._counts = None
        now = sum(self.pruned_counts().values())
        self._units = (now, self.total)
        if now == pruned:
            return False
        self._new_interval()
        return True

    def _after_event(self) -> None:
        self._counts = self._units = None
        self.apply()
        self._new_interval()

    def _new_interval(self) -> None:
        """After an event: survivors rewound, and importance statistics gathered afresh."""
        self.rewind()
        self.importance.reset()
        self._overflowed, self._observed = 0, False

    def _regrow(self, new: dict[str, Tensor], current: dict[str, Tensor], fraction: float) -> None:
        """Swap ``regrow`` of the kept weights for pruned ones with the largest gradient sums.

        With global scope the exchange is global (density moves between layers, never below a
        layer's ``min_density`` floor); with layer scope it happens inside every layer.
        """
        targets = [t for t in self.targets if t.param_name in self._grads and t.param_name in current]
        groups = [targets] if self.scope == "global" else [[t] for t in targets]
        for group in groups:
            if group:
                self._regrow_group(group, new, fraction)

    def _regrow_group(self, targets: list[Target], new: dict[str, Tensor], fraction: float) -> None:
        """Two exact selections (:func:`~.masks.compute_masks`, so sharded weights work as whole ones): the
        lowest-scored kept weights go, within the floors (at least one weight per layer), then as many pruned
        ones with the largest gradient sums come back."""
        masks = {t.param_name: new[t.param_name] for t in targets}
        total = sum(t.numel for t in targets)
        pruned = sum(pruned_counts(targets, masks, self.collectives).values())
        # only pruned weights with a gradient can come back: one with none would stay at zero, kept by its mask
        # (a trial: the sparsity overshot the target and a layer fell under its `min_density` floor)
        movable = {
            t.param_name: mask_bits(masks[t.param_name]).bool() | (self._grads[t.param_name] == 0) for t in targets
        }
        candidates = sum(pruned_counts(targets, movable, self.collectives).values())
        count = min(int(fraction * (total - pruned)), candidates)
        if count <= 0:
            return
        dropped = compute_masks(
            targets, self.importance, (pruned + count) / total, "global", self.min_density, masks, apply=False,
            collectives=self.collectives, floor=1,
        )  # fmt: skip
        removed = sum(pruned_counts(targets, dropped, self.collectives).values()) - pruned
        if removed <= 0:
            return
        gradients = _Statistic({t.key: self._grads[t.param_name] for t in targets})
        was_pruned = {name: ~mask for name, mask in masks.items()}  # candidates: the weights pruned before
        grown = compute_masks(
            targets, gradients, (total - removed) / total, "global", 0.0, was_pruned, apply=False,
            collectives=self.collectives,
        )  # fmt: skip
        for name in masks:
            new[name] = dropped[name] | grown[name]

    def undo(self) -> bool:
        """Restore the masks before the last :meth:`prune_to` and revive the weights it zeroed."""
        if not self._rollback:
            return False
        with torch.no_grad():
            for name, (previous, values) in self._rollback.items():
                weight = self._by_name[name].local
                current = mask_bits(self.masks[name]).bool()
                revived = previous & ~current
                weight.detach()[revived] = values.to(weight.dtype)
                self._masks[name] = previous.to(weight.dtype)
        self._counts = self._units = None
        self._rollback = None
        self.apply()  # weights regrown by the undone event go back to zero
        return True

    def apply(self) -> None:
        """Zero every pruned weight (e.g. after something outside the optimizer wrote weights), on the device the
        weights are on now (:meth:`follow_weights`)."""
        if not self.masks:
            return
        self.follow_weights()
        with torch.no_grad():
            for name, mask in self.masks.items():
                zero_pruned_(self._by_name[name].local, mask)
            self.rule.zero_statistics(self.masks)

    def revived(self) -> list[str]:
        """Masked weights (this process's shards) nonzero where their mask prunes: written by something the pruner
        did not see, such as an optimizer stepped outside the training framework's hooks."""
        if not self.masks:
            return []
        self.follow_weights()
        with torch.no_grad():
            return [name for name, mask in self.masks.items() if _revived(self._by_name[name].local, mask)]

    def follow_weights(self) -> None:
        """Move the masks, the undo record, regrowth's sums, the rewind point and the importance's statistics to the
        device of their weights, where the model was moved since they were made: Lightning trains on the accelerator
        and moves the model back to the CPU before ``on_fit_end``, so a mask made in training is on the GPU there.
        """

        def moved(name: str, tensor: Tensor) -> Tensor:
            device = self._by_name[name].local.device
            return tensor if tensor.device == device else tensor.to(device)

        if any(mask.device != self._by_name[name].local.device for name, mask in self._masks.items()):
            self._masks = {name: moved(name, mask) for name, mask in self._masks.items()}
        if self._rollback is not None:
            self._rollback = {n: (moved(n, previous), moved(n, v)) for n, (previous, v) in self._rollback.items()}
        self._grads = {name: moved(name, total) for name, total in self._grads.items()}
        if self._rewind is not None:
            self._rewind = {name: moved(name, saved) for name, saved in self._rewind.items()}
        if self.targets:
            self.importance.to(self.targets[0].local.device)

    # ------------------------------------------------------------------ training step
    def observe_gradients(self, params: set[int] | None = None) -> None:
        """Feed the current gradients to importances that accumulate them (Taylor).

        ``params``: ids of the parameters to consider (those of one optimizer); ``None``: all. A step whose gradients
        are not all finite adds nothing: under fp16 mixed precision the GradScaler's first steps, and one in each of
        its growth intervals, overflow, and it skips them (trial ED: their infinities made every score NaN, and zeroed
        they left all-zero sums that pruned whole layers in index order). Under FSDP2 each process decides on its
        shards.
        """
        accumulates = self.importance.accumulates
        track = self.regrow > 0 and bool(self._masks)
        if not accumulates and not track:
            return
        observed = []
        for target in self.targets:
            grad = target.param.grad
            if grad is not None and (params is None or id(target.param) in params):
                observed.append((target, local(grad)))
        if not observed:
            return
        if not all_finite([grad for _, grad in observed]):
            self._overflowed += 1
            return
        self._observed = self._observed or accumulates
        for target, grad in observed:
            if accumulates:
                self.importance.observe(target.key, target.local, grad)
            if track:
                acc = self._grads.get(target.param_name)
                if acc is None:
                    self._grads[target.param_name] = grad.detach().abs().float()
                else:
                    acc.add_(grad.detach().abs())

    def mask_gradients(self, params: set[int] | None = None) -> None:
        """Zero the gradients of pruned weights so no optimizer moves them (``params``: ids to consider)."""
        if not self.masks:
            return
        wanted = params
        grads: list[Tensor] = []
        masks: list[Tensor] = []
        for name, mask in self.masks.items():
            param = self._by_name[name].param
            if param.grad is None or (wanted is not None and id(param) not in wanted):
                continue
            grad = local(param.grad)
            grads.append(grad)
            masks.append(mask if mask.dtype == grad.dtype else mask.to(grad.dtype))
        if grads:
            torch._foreach_mul_(grads, masks)

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero momentum-like state of pruned weights (any tensor shaped like the weight)."""
        if not self.masks:
            return
        with torch.no_grad():
            for name, mask in self.masks.items():
                param = self._by_name[name].param
                state = optimizer.state.get(param)
                if not state:
                    continue
                for value in state.values():
                    # complex too: Adam's moments of a complex weight (trial GK: they regrew FNO's spectral weights)
                    floating = isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())
                    if floating and value.shape == param.shape:
                        zero_pruned_(local(value), mask)

    # ------------------------------------------------------------------ lottery-ticket rewinding
    def save_rewind_point(self) -> None:
        """Remember the current weights; after every later event survivors go back to them."""
        self._rewind = {t.param_name: t.local.detach().clone() for t in self.targets}

    @property
    def has_rewind_point(self) -> bool:
        return self._rewind is not None

    @property
    def rewind_point(self) -> dict[str, Tensor] | None:
        return self._rewind

    def rewind(self) -> None:
        if self._rewind is None or not self.masks:
            return
        with torch.no_grad():
            for name, saved in self._rewind.items():
                weight = self._by_name[name].local
                weight.copy_(saved.to(weight.device, weight.dtype))
                zero_pruned_(weight, self.masks[name])

    # ------------------------------------------------------------------ checkpoints and earlier runs
    def matches(self, masks: dict[str, Tensor], whole: bool = True) -> bool:
        """Whether ``masks`` fit these targets (names and shapes: of the whole weights, or with ``whole=False``
        of this process's shards)."""
        return set(masks) <= set(self._by_name) and all(
            tuple(m.shape) == tuple((target.param if whole else target.local).shape)
            for n, m in masks.items()
            for target in (self._by_name[n],)
        )

    def adopt(self, masks: dict[str, Tensor]) -> bool:
        """Take the run-time ``masks`` of an earlier run if they fit these targets and the model still carries
        them (every process must call it when weights are sharded)."""
        if not masks or not self.matches(masks, whole=False):
            return False
        self.masks = {n: m.to(self._by_name[n].local.device, self._by_name[n].local.dtype) for n, m in masks.items()}
        if self.carries_masks():
            return True
        self.masks = {}  # the model was reloaded or changed: start over
        return False

    def carries_masks(self) -> bool:
        """Whether every masked weight of the model is zero (the model still carries the masks)."""
        carried = not any(_revived(self._by_name[n].local.detach(), m) for n, m in self.masks.items())
        if self._group() is None:
            return carried
        return bool(self._group().all_reduce(torch.tensor([int(carried)]), "min").item())  # type: ignore[union-attr]

    def _group(self) -> Collectives | None:
        """The collectives to use when weights are sharded over several processes, else ``None``."""
        if self.sharded and self.collectives is not None and self.collectives.world_size > 1:
            return self.collectives
        return None

    # ------------------------------------------------------------------ persistence
    def _whole(self, name: str, part: Tensor) -> Tensor:
        """``part`` (shaped like this process's shard of weight ``name``) made whole, on CPU."""
        target, group = self._by_name[name], self._group()
        if group is None or not is_sharded(target.param):
            return part.cpu()
        return gather_flat(part.reshape(-1), group).view(target.param.shape).cpu()

    def _part(self, name: str, whole: Tensor) -> Tensor:
        """This process's part of ``whole`` (shaped like weight ``name``), on the weight's device."""
        target = self._by_name[name]
        if not is_sharded(target.param):
            return whole.to(target.local.device)
        return local_part(target.param, whole).to(target.local.device).clone()  # not a view that holds it whole

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool), undo, rewind and statistics, whole and on CPU. When weights are sharded every process
        must call it (the shards are gathered)."""
        state: dict[str, Any] = {"masks": {n: self._whole(n, mask_bits(m).bool()) for n, m in self.masks.items()}}
        if self._rollback is not None:
            state["rollback"] = {n: self._rollback_whole(n, p, v) for n, (p, v) in self._rollback.items()}
        if self._rewind is not None:
            state["rewind"] = {n: self._whole(n, w) for n, w in self._rewind.items()}
        if self._grads:
            state["grads"] = {n: self._whole(n, g) for n, g in self._grads.items()}
        importance_state = self._map_weight_tensors(self.importance.state_dict(), self._whole)
        if importance_state:
            state["importance"] = importance_state
        return state

    def _rollback_whole(self, name: str, previous: Tensor, values: Tensor) -> list[Tensor]:
        """The undo record of weight ``name`` whole: the previous mask, and the revived values in position
        order (the shards' values one after the other)."""
        group = self._group()
        if group is None or not is_sharded(self._by_name[name].param):
            return [previous.cpu(), values.cpu()]
        return [self._whole(name, previous), gather_flat(values, group).cpu()]

    def _rollback_part(self, name: str, previous: Tensor, values: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        """This process's part of a whole undo record, ``current`` being the whole mask it undoes."""
        target = self._by_name[name]
        if not is_sharded(target.param):
            return previous.to(target.local.device), values.to(target.local.device)
        revived = (previous & ~current).reshape(-1)
        start = target.offset
        before = int(revived[:start].sum())
        mine = int(revived[start : start + target.local.numel()].sum())
        return self._part(name, previous), values[before : before + mine].to(target.local.device)

    def _map_weight_tensors(self, state: Any, fn: Callable[[str, Tensor], Tensor]) -> Any:
        """``state`` with ``fn(param_name, tensor)`` applied to each tensor stored under a selected weight's
        module or parameter name: an importance's per-weight statistics (e.g. Taylor sums), when sharded."""
        if not self.sharded or not isinstance(state, dict):
            return state
        names = {t.key: t.param_name for t in self.targets} | {n: n for n in self._by_name}
        return {
            k: fn(names[k], v) if isinstance(v, Tensor) and k in names else self._map_weight_tensors(v, fn)
            for k, v in state.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (whole tensors: each process keeps the parts of its shards)."""
        masks = state.get("masks", {})
        check_mask_shapes(masks, {n: tuple(t.param.shape) for n, t in self._by_name.items()})
        self.masks = {n: self._part(n, m).to(self._by_name[n].local.dtype).contiguous() for n, m in masks.items()}
        rollback = state.get("rollback")
        self._rollback = (
            None if rollback is None else {n: self._rollback_part(n, p, v, masks[n]) for n, (p, v) in rollback.items()}
        )
        self._grads = {n: self._part(n, g) for n, g in state.get("grads", {}).items()}
        rewind = state.get("rewind")
        self._rewind = None if rewind is None else {n: self._part(n, w) for n, w in rewind.items()}
        if "importance" in state:
            self.importance.load_state_dict(self._map_weight_tensors(state["importance"], self._part))
            if self.targets:
                self.importance.to(self.targets[0].local.device)


def _revived(weight: Tensor, mask: Tensor) -> bool:
    """Whether ``weight`` is nonzero anywhere ``mask`` prunes."""
    return bool(((weight != 0) & (mask == 0)).any())


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, read off their sums (a NaN or an infinity makes a sum so; about
    5x cheaper on CPU than ``isfinite().all()``, which writes a tensor-sized result): one host synchronization for
    all of them (the GradScaler makes one per step as well). Sums that overflow float32 read as not finite too."""
    device = tensors[0].device
    # a complex tensor's real and imaginary parts (trial GK: a sum in float32 dropped the imaginary part, warned)
    sums = [(torch.view_as_real(t) if t.is_complex() else t).sum(dtype=torch.float32).to(device) for t in tensors]
    return bool(torch.stack(sums).isfinite().all())


def check_mask_shapes(masks: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse masks that do not fit weights of ``shapes`` (name -> whole shape), naming every layer that differs at
    once: a checkpoint of another width, or of another selection."""
    differ = {
        n: (tuple(m.shape), shapes.get(n))
        for n, m in masks.items()
        if isinstance(m, Tensor) and shapes.get(n) != tuple(m.shape)  # what is not a tensor: its check says so
    }
    if differ:
        raise ValueError(
            "the checkpoint's pruning masks do not fit this model: (saved shape, this model's shape) of "
            f"{dict(list(differ.items())[:5])}{' ...' if len(differ) > 5 else ''} (None: no such selected weight)."
        )


class _Statistic(Importance):
    """Scores read from per-weight statistics (regrowth's gradient sums), keyed like importances."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        self.values = values

    def score(self, name: str, weight: Tensor) -> Tensor:
        return self.values[name]
