"""What ``IterativePruning`` logs through the LightningModule: the sparsity of every selected weight and of all of
them after each event, and the guard's decisions after the validation that took them."""

from __future__ import annotations

import lightning.pytorch as pl

from ..core.iterative import IterativePruner
from ..core.mask_counts import zero_counts

__all__ = ["layer_values", "log_values", "sparsity_values", "writes_step_values"]


def sparsity_values(pruner: IterativePruner, channels: bool) -> dict[str, float]:
    """``compress/sparsity/<layer>`` and ``compress/sparsity`` (the fraction of zeros, counted over every shard of a
    sharded weight), plus ``compress/channel_sparsity`` when ``channels`` are pruned. The weights pruning selects
    (as ``sparsity(model)`` counts them), not the biases and norms channel pruning cuts with them."""
    # every selected weight: with channels, also those no group reaches (trial BW: 0.50 logged, 0.47 in the model)
    # a 1-d weight `include` names is counted, as `sparsity(model)` counts it (trial FN: e3nn's flat weights)
    weights = [t for t in pruner.selected if t.is_weight]
    zeros = zero_counts(weights, pruner.collectives)
    values = {f"compress/sparsity/{t.key}": zeros[t.param_name] / t.numel for t in weights}
    values["compress/sparsity"] = sum(zeros.values()) / max(1, sum(t.numel for t in weights))
    if channels:
        values["compress/channel_sparsity"] = pruner.masked_sparsity()
    return values


def log_values(pl_module: pl.LightningModule, values: dict[str, float], step_level: bool) -> None:
    """Log through the module, per step (``step_level``) or per epoch, averaged over processes."""
    for name, value in values.items():
        pl_module.log(
            name, value, on_step=step_level, on_epoch=not step_level, sync_dist=pl_module.trainer.world_size > 1,
            batch_size=1,
        )  # fmt: skip


def layer_values(values: dict[str, float]) -> dict[str, float]:
    """The per-layer entries of :func:`sparsity_values`."""
    return {k: v for k, v in values.items() if k.startswith("compress/sparsity/")}


def writes_step_values(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the step-level values logged in this batch to the loggers (called at the end of a
    batch that made an optimizer step: it writes every ``log_every_n_steps`` steps, and when the fit stops)."""
    every = getattr(trainer, "log_every_n_steps", 50)  # set by the Trainer at init (no annotation)
    return bool(every) and (trainer.global_step % every == 0 or trainer.should_stop)
