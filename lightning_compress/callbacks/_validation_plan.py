"""When will the Trainer validate? What the accuracy guard needs to never apply a pruning event that no
validation judges before ``fit`` ends.

Batches are counted over the whole fit from 0 (epoch ``e``, batch ``b`` is ``e * N + b`` with ``N``
training batches per epoch). This follows the Trainer's own rule: validation runs after batch ``b``
when the epoch validates (``check_val_every_n_epoch``) and ``b + 1`` (or the fit's batch count when
``check_val_every_n_epoch=None``) is a multiple of ``val_check_batch``; with ``val_check_interval=1.0``
that is the last batch of every epoch. Time-based validation and data without a length cannot be
planned: the answer is then ``None`` and the callback falls back to its end-of-fit check.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl

__all__ = ["last_validation_batch", "steps_done_after"]


def _per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if isinstance(batches, float) and not math.isfinite(batches):
        return None
    return int(batches)


def _batches_for_steps(steps: int, batches: int, accumulate: int) -> int:
    """How many batches the fit runs to make ``steps`` optimizer steps (the last batch of an epoch always steps)."""
    per_epoch = max(1, math.ceil(batches / accumulate))
    epochs, rest = divmod(steps, per_epoch)
    return epochs * batches + min(batches, rest * accumulate)


def last_validation_batch(trainer: pl.Trainer) -> int | None:
    """Index of the last batch of the fit after which validation runs; ``-1``: none; ``None``: cannot be known."""
    batches = _per_epoch(trainer)
    every = trainer.val_check_batch
    max_epochs = trainer.max_epochs
    if batches is None or batches <= 0 or every is None or max_epochs is None or max_epochs < 0:
        return None
    if not trainer.enable_validation:
        return -1
    horizon = max_epochs * batches
    if trainer.max_steps >= 0:
        horizon = min(horizon, _batches_for_steps(trainer.max_steps, batches, trainer.accumulate_grad_batches))
    every_n_epochs = trainer.check_val_every_n_epoch
    for epoch in range(max_epochs - 1, -1, -1):
        if every_n_epochs is not None and (epoch + 1) % every_n_epochs:
            continue
        first = epoch * batches
        reached = min(batches, horizon - first)  # batches of this epoch the fit runs
        if reached <= 0:
            continue
        if math.isinf(every):
            if reached == batches:
                return first + batches - 1
            continue
        offset = first if every_n_epochs is None else 0  # the Trainer counts over the fit, or within the epoch
        last = (offset + reached) // int(every) * int(every) - 1 - offset
        if last >= 0:
            return first + last
    return -1


def steps_done_after(batch: int, trainer: pl.Trainer) -> int:
    """Optimizer steps made once batch ``batch`` (counted over the fit) has run."""
    batches = _per_epoch(trainer) or 1
    accumulate = trainer.accumulate_grad_batches
    per_epoch = max(1, math.ceil(batches / accumulate))
    epoch, index = divmod(batch, batches)
    within = per_epoch if index == batches - 1 else (index + 1) // accumulate
    return epoch * per_epoch + within
