"""What a ``ModelCheckpoint`` that keeps the best-scoring checkpoints ends up holding beside a pruning schedule.

The metric usually falls as sparsity rises, so the best-scoring checkpoint is often an early, less pruned one, and code
that loads it after ``fit`` (``ckpt_path="best"``, GluonTS's estimators, which always do) gets that model (trial FX:
DeepAR returned at 0.563 of 0.8, said nowhere). The sparsity at each value a monitored checkpoint callback could have
saved is noted, and the end of fit says where the best one is short of the sparsity the fit ends at.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["BestCheckpoints"]

_SHORT = 0.01  # a best checkpoint this much less sparse than the fit's end is worth a word


class BestCheckpoints:
    """The sparsity noted at each value of every monitored ``ModelCheckpoint``'s metric, in one fit."""

    def __init__(self) -> None:
        self._seen: dict[int, list[tuple[float, float, int]]] = {}  # id(callback) -> (value, sparsity, step)

    def reset(self) -> None:
        self._seen = {}

    def note(self, trainer: pl.Trainer, sparsity: Callable[[], float]) -> None:
        """Note ``sparsity()`` against each monitored checkpoint callback's metric as it is now (at a validation's
        end, or an epoch's: where such a callback saves, after this one's hooks); not counted without one."""
        now: float | None = None
        for callback in _monitored(trainer):
            value = trainer.callback_metrics.get(callback.monitor or "")
            if value is not None and value.numel() == 1:
                now = sparsity() if now is None else now
                self._seen.setdefault(id(callback), []).append((float(value), now, trainer.global_step))

    def say_if_short(self, trainer: pl.Trainer, final: float) -> None:
        """At the end of fit: say which monitored checkpoint callback's best checkpoint holds a model pruned less than
        ``final`` (the value it kept first noted with its sparsity then)."""
        for callback in _monitored(trainer):
            best = callback.best_model_score
            if best is None or not callback.best_model_path:
                continue
            seen = self._seen.get(id(callback), [])
            found = [(sparsity, step) for value, sparsity, step in seen if value == float(best)]
            if not found or final - found[0][0] <= _SHORT:
                continue
            sparsity, step = found[0]
            rank_zero_warn(
                f"IterativePruning: ModelCheckpoint(monitor={callback.monitor!r})'s best checkpoint holds the model at "
                f"sparsity {sparsity:.4f} (step {step}), short of the {final:.4f} this fit ends at: the metric falls "
                "as sparsity rises, so its best is an early, less pruned model, and code that loads the best "
                "checkpoint after `fit` (`ckpt_path='best'`, GluonTS's estimators) gets that one. To keep the pruned "
                "model, save the last too: a `ModelCheckpoint()` without `monitor`, or `trainer.save_checkpoint(...)` "
                "after `fit`."
            )


def _monitored(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None]
