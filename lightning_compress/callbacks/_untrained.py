"""Selected weights that the training loss never reaches: pruned by their scores alone, with nothing to recover."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..core.selection import Target

__all__ = ["UnreachedWeights"]


class UnreachedWeights:
    """Which selected, trainable weights have had no gradient at any optimizer step of the fit's first epoch.

    A layer the training forward does not call (a branch the data never takes: SAM's mask embedding without
    ``input_masks``; a head only used outside ``training_step``) gets no gradient: pruning it still counts toward
    ``target_sparsity``, but no training can recover what it removes (trial EW: BLIP's unused projections ended 21%
    zero, unsaid). Said once, after the first epoch; the check costs nothing once every weight has had a gradient.
    """

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[str, Tensor]] = {}
        self._said = True
        self._steps = 0

    def start(self, targets: Sequence[Target]) -> None:
        """Watch ``targets``' trainable weights (frozen ones are said at the start of training)."""
        self._waiting = {id(t.param): (t.name, t.param) for t in targets if t.is_weight and t.param.requires_grad}
        self._said, self._steps = False, 0

    def observe(self) -> None:
        """Before an optimizer step: the weights whose gradient is there, and not all zero, have been reached (an
        expert of a mixture the router sent no token gets a zero gradient, not ``None``: trial EZ)."""
        self._steps += 1
        if self._waiting:
            self._waiting = {k: v for k, v in self._waiting.items() if not _reached(v[1].grad)}

    def say(self, epoch: int) -> None:
        """At the end of the first epoch this fit trained: name the weights still unreached, once. Not when no
        optimizer step was seen at all (an optimizer Lightning does not wrap, said at the next validation: trial EZ),
        nor for weights frozen now (a warm-up that trains the head first: they train later, with their masks)."""
        if self._said:
            return
        self._said = True
        waiting, self._waiting = self._waiting, {}
        names = list(dict.fromkeys(name for name, param in waiting.values() if param.requires_grad))
        if names and self._steps:
            rank_zero_warn(
                f"IterativePruning: {names[:5]}{' ...' if len(names) > 5 else ''} got no gradient (or only zeros) in "
                f"any optimizer step of epoch {epoch}: the training loss does not reach them (a branch the data does "
                "not take, as SAM's mask embedding without `input_masks`; an expert the router sends no token; a "
                "layer used only outside `training_step`, or under "
                "`torch.no_grad()`, as a distillation's teacher). They are pruned by their scores alone, with no "
                "training to recover what is removed, and count toward `target_sparsity`. `exclude` them to keep "
                "them dense."
            )


def _reached(grad: Tensor | None) -> bool:
    return grad is not None and bool(grad.any())
