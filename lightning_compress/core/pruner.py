"""Mask bookkeeping for iterative pruning, independent of any training framework.

A :class:`Pruner` owns the masks of a set of :class:`~.selection.Target` weights. At run time
each mask is kept in the weight's dtype and device (multiplying by a float mask is ~10x faster
than by a bool mask on CPU); in :meth:`Pruner.state_dict` masks are bool, on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .importance import Importance
from .masks import floor_count, zero_pruned_
from .rules import MaskRule
from .selection import Target

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
    """

    def __init__(self, rule: MaskRule, regrow: float = 0.0) -> None:
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
        self._pruned: int | None = None  # cached count of masked weights
        self._units: tuple[int, int] | None = None  # cached (pruned, total) in the rule's units
        self._rollback: dict[str, tuple[Tensor, Tensor]] | None = None  # name -> (previous mask, revived values)
        self._rewind: dict[str, Tensor] | None = None
        self._by_name = {t.param_name: t for t in self.targets}

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
        self._pruned = self._units = None

    def pruned_count(self) -> int:
        if self._pruned is None:
            self._pruned = sum(int(m.numel() - m.count_nonzero()) for m in self._masks.values())
        return self._pruned

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
        return {name: m != 0 for name, m in self.masks.items()}

    # ------------------------------------------------------------------ pruning
    def prune_to(
        self,
        sparsity: float,
        *,
        keep_undo: bool = False,
        sync: MaskSync | None = None,
        regrow: float | None = None,
    ) -> bool:
        """Prune to ``sparsity`` (never below the current one). Returns whether anything changed.

        ``sync`` may replace the computed masks (e.g. by rank 0's under DDP) before they are applied.
        ``regrow``: the fraction to regrow at this event instead of :attr:`regrow` (``0``: none, as
        at the callback's last event, which is an exact top-k).
        """
        pruned, total = self.units()
        if round(sparsity * total) <= pruned and self.scope == "global":
            return False
        current = self.bool_masks()
        new = self.rule.compute(sparsity, current)
        fraction = self.regrow if regrow is None else regrow
        if fraction > 0 and self._grads:
            self._regrow(new, current, fraction)
        self._grads.clear()
        if sync is not None:
            new = sync(new)
        changed = any(name not in current or not torch.equal(mask, current[name]) for name, mask in new.items())
        if not changed:
            return False
        if keep_undo:
            self._rollback = {}
            for name, mask in new.items():
                target = self._by_name[name]
                previous = current.get(name, torch.ones_like(mask))
                revived = previous & ~mask
                self._rollback[name] = (previous, target.param.detach()[revived].clone())
        for name in list(new):
            mask = new.pop(name)  # free each bool mask once converted
            existing = self._masks.get(name)
            if existing is not None:
                existing.copy_(mask)  # reuse the buffer: no new allocation at later events
            else:
                self._masks[name] = mask.to(self._by_name[name].param.dtype)
        self._pruned = self._units = None
        self.apply()
        self.rewind()
        self.importance.reset()
        return True

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
        flats = [new[t.param_name].view(-1) for t in targets]
        mask = torch.cat([f.to(self._grads[t.param_name].device) for t, f in zip(targets, flats, strict=True)])
        kept = int(mask.sum())
        count = min(int(fraction * kept), mask.numel() - kept)
        if count <= 0:
            return
        score = torch.cat([self.importance.score(t.key, t.param).detach().reshape(-1).float() for t in targets])
        score = torch.where(mask, score.to(mask.device), torch.full_like(score, float("inf"), device=mask.device))
        drop = torch.topk(score, count, largest=False).indices
        owner = torch.repeat_interleave(
            torch.arange(len(targets), device=mask.device),
            torch.tensor([f.numel() for f in flats], device=mask.device),
        )
        keep_back = []  # drops that would take a layer below its min_density floor
        for i, (target, flat) in enumerate(zip(targets, flats, strict=True)):
            mine = drop[owner[drop] == i]
            room = int(flat.sum()) - max(1, floor_count(self.min_density, target.numel))
            if mine.numel() > max(room, 0):
                order = torch.argsort(score[mine], descending=True, stable=True)
                keep_back.append(mine[order[: mine.numel() - max(room, 0)]])
        if keep_back:
            cancelled = torch.zeros_like(mask)
            cancelled[torch.cat(keep_back)] = True
            drop = drop[~cancelled[drop]]
        if drop.numel() == 0:
            return
        grads = torch.cat([self._grads[t.param_name].reshape(-1) for t in targets])
        grow = torch.topk(torch.where(mask, torch.full_like(grads, -1.0), grads), drop.numel()).indices
        mask[drop] = False
        mask[grow] = True
        offset = 0
        for flat in flats:
            flat.copy_(mask[offset : offset + flat.numel()].to(flat.device))
            offset += flat.numel()

    def undo(self) -> bool:
        """Restore the masks before the last :meth:`prune_to` and revive the weights it zeroed."""
        if not self._rollback:
            return False
        with torch.no_grad():
            for name, (previous, values) in self._rollback.items():
                target = self._by_name[name]
                current = self.masks[name] != 0
                revived = previous & ~current
                target.param.detach()[revived] = values.to(target.param.dtype)
                self._masks[name] = previous.to(target.param.dtype)
        self._pruned = self._units = None
        self._rollback = None
        self.apply()  # weights regrown by the undone event go back to zero
        return True

    def apply(self) -> None:
        """Zero every pruned weight (e.g. after something outside the optimizer wrote weights)."""
        if not self.masks:
            return
        with torch.no_grad():
            for name, mask in self.masks.items():
                zero_pruned_(self._by_name[name].param, mask)

    # ------------------------------------------------------------------ training step
    def observe_gradients(self, params: set[int] | None = None) -> None:
        """Feed the current gradients to importances that accumulate them (Taylor).

        ``params``: ids of the parameters to consider (those of one optimizer); ``None``: all.
        """
        accumulates = self.importance.accumulates
        track = self.regrow > 0 and bool(self._masks)
        if not accumulates and not track:
            return
        for target in self.targets:
            grad = target.param.grad
            if grad is None or (params is not None and id(target.param) not in params):
                continue
            if accumulates:
                self.importance.observe(target.key, target.param, grad)
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
            grads.append(param.grad)
            masks.append(mask if mask.dtype == param.grad.dtype else mask.to(param.grad.dtype))
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
                    if isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point():
                        zero_pruned_(value, mask)

    # ------------------------------------------------------------------ lottery-ticket rewinding
    def save_rewind_point(self) -> None:
        """Remember the current weights; after every later event survivors go back to them."""
        self._rewind = {t.param_name: t.param.detach().clone() for t in self.targets}

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
                param = self._by_name[name].param
                param.copy_(saved.to(param.device, param.dtype))
                zero_pruned_(param, self.masks[name])

    # ------------------------------------------------------------------ persistence
    def matches(self, masks: dict[str, Tensor]) -> bool:
        """Whether ``masks`` fit these targets (names and shapes)."""
        return set(masks) <= set(self._by_name) and all(
            tuple(m.shape) == tuple(self._by_name[n].param.shape) for n, m in masks.items()
        )

    def adopt(self, masks: dict[str, Tensor]) -> bool:
        """Take ``masks`` of an earlier run if they fit these targets and the model still carries them."""
        if not masks or not self.matches(masks):
            return False
        self.masks = {n: m.to(self._by_name[n].param.device, self._by_name[n].param.dtype) for n, m in masks.items()}
        if self.carries_masks():
            return True
        self.masks = {}  # the model was reloaded or changed: start over
        return False

    def carries_masks(self) -> bool:
        """Whether every masked weight of the model is zero (the model still carries the masks)."""
        return all(bool((self._by_name[n].param.detach()[m == 0] == 0).all()) for n, m in self.masks.items())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"masks": {n: (m != 0).cpu() for n, m in self.masks.items()}}
        if self._rollback is not None:
            state["rollback"] = {n: [p.cpu(), v.cpu()] for n, (p, v) in self._rollback.items()}
        if self._rewind is not None:
            state["rewind"] = {n: w.cpu() for n, w in self._rewind.items()}
        if self._grads:
            state["grads"] = {n: g.cpu() for n, g in self._grads.items()}
        importance_state = self.importance.state_dict()
        if importance_state:
            state["importance"] = importance_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state.get("masks", {})
        if not self.matches(masks):
            raise ValueError(
                "the checkpoint's pruning masks do not fit this model: masks for "
                f"{sorted(masks)} vs selected weights {sorted(self._by_name)}."
            )
        self.masks = {n: m.to(self._by_name[n].param.device, self._by_name[n].param.dtype) for n, m in masks.items()}
        device_of = {n: t.param.device for n, t in self._by_name.items()}
        rollback = state.get("rollback")
        self._rollback = (
            None
            if rollback is None
            else {n: (p.to(device_of[n]), v.to(device_of[n])) for n, (p, v) in rollback.items()}
        )
        self._grads = {n: g.to(device_of[n]) for n, g in state.get("grads", {}).items()}
        rewind = state.get("rewind")
        self._rewind = None if rewind is None else {n: w.to(device_of[n]) for n, w in rewind.items()}
        if "importance" in state:
            self.importance.load_state_dict(state["importance"])
            if self.targets:
                self.importance.to(self.targets[0].param.device)
