"""What ``QuantizationAwareTraining`` does to quantizers and optimizers between its hooks: reduce observed ranges
across processes, give learned scales an optimizer group, and say which layers never observed."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..core.qat import FakeQuantizer, qat_modules
from ._validation import StrategyCollectives

__all__ = ["check_in_optimizers", "update_observers", "warn_about_idle_layers"]


def warn_about_idle_layers(
    pl_module: nn.Module, epoch: int, layers: list[tuple[str, nn.Module]] | None = None
) -> list[str]:
    """Layers (``layers``: a callback's own; ``None``: every fake-quant layer) whose quantizers observed nothing while
    observers were on: their forward never ran in training. Returns their names."""
    layers = qat_modules(pl_module) if layers is None else layers
    idle = [name for name, layer in layers if not cast(Any, layer).weight_fake_quant.initialized]
    if idle:
        rank_zero_warn(
            f"QuantizationAwareTraining: {idle[:5]}{' ...' if len(idle) > 5 else ''} never ran their forward in epoch "
            f"{epoch}: a branch the training data did not take (as SAM's mask embedding without `input_masks`), or the "
            "model reads their weights directly (as transformers' Mamba does with conv1d), or calls another module "
            "holding them (a copy of the layer, kept where the model's modules do not hold it). They compute in float, "
            "and an export stores them in float. `exclude` them to silence this."
        )
    unseen = [
        name
        for name, layer in layers
        if name not in idle
        and isinstance(q := getattr(layer, "input_fake_quant", None), FakeQuantizer)
        and q.fake_quant_enabled
        and not q.has_range
    ]
    if unseen:
        rank_zero_warn(
            f"QuantizationAwareTraining: the inputs of {unseen[:5]}{' ...' if len(unseen) > 5 else ''} were never "
            f"observed in a training step of epoch {epoch} (the layer runs outside `training_step`, or was given only "
            "empty tensors, as a mixture's expert no token was routed to?): their inputs stay float until a training "
            "step reaches them."
        )
    return idle


def update_observers(activation_quantizers: list[FakeQuantizer], collectives: StrategyCollectives) -> None:
    """Fold pending batch ranges into the EMAs, reduced across processes so every rank agrees."""
    pending: list[tuple[FakeQuantizer, tuple[Tensor, Tensor]]] = []
    for q in activation_quantizers:
        stats = q.pending_batch_stats()
        if stats is not None:
            pending.append((q, stats))
    if not pending:
        return
    # one collective: min(lo) is -max(-lo), so both ends reduce with "max"
    ends = torch.stack([torch.stack([-stats[0], stats[1]]) for _, stats in pending])
    ends = collectives.all_reduce(ends, "max")
    for i, (q, _) in enumerate(pending):
        q.update_from_batch(-ends[i, 0], ends[i, 1])


# an LR scheduler's lists of one value per parameter group (torch's names): a group added after the scheduler was
# built needs its entry, or the scheduler fails at its first step (LambdaLR, CyclicLR, CosineAnnealingWarmRestarts,
# SequentialLR, transformers' warmup schedules: "zip() argument 2 is shorter than argument 1"; trial BR) or leaves
# the group's rate unscheduled (CosineAnnealingLR)
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs", "base_momentums", "max_momentums")


def _extend_schedulers(schedulers: list[Any], optimizer: torch.optim.Optimizer, groups: int) -> None:
    """Give the group ``optimizer`` just received (its ``groups``-th) the first group's entry in every per-group
    list of the schedulers that step ``optimizer`` (and of those a SequentialLR or ChainedScheduler holds)."""
    for scheduler in schedulers:
        _extend_schedulers(list(getattr(scheduler, "_schedulers", [])), optimizer, groups)
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        for attr in _PER_GROUP:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and len(values) == groups - 1 and values:
                values.append(values[0])


def check_in_optimizers(
    params: list[nn.Parameter],
    optimizers: list[torch.optim.Optimizer],
    own_group: bool = False,
    schedulers: list[Any] | None = None,
) -> bool:
    """Learned scales are model Parameters from the conversion on: an optimizer over ``parameters()`` holds them.

    One that filtered them out (e.g. by ``requires_grad``, False until quantization switches on) gets them as a new
    group of its first optimizer, without weight decay, with the first group's other settings (what LR schedulers
    added to it too: OneCycleLR's ``initial_lr``, ``max_lr``; without them it failed at its first step). A run
    resumed from such a fit (``own_group``) rebuilds that group, so the checkpoint's optimizer state fits: its
    optimizer was built with the scales already training, and so holding them. ``schedulers`` (the Trainer's) get
    the new group's entries. Returns whether the scales have a group of their own."""
    if not optimizers or not params:
        return own_group
    ids = {id(p) for p in params}
    known = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in params if id(p) not in known]
    if not missing and not own_group:
        return False
    if own_group:  # a fresh optimizer, before Lightning restores its state: nothing is lost by regrouping
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
    first = optimizers[0]
    settings = {k: v for k, v in first.param_groups[0].items() if k not in ("params", "weight_decay")}
    first.add_param_group({**settings, "params": list(params), "weight_decay": 0.0})
    _extend_schedulers(list(schedulers or []), first, len(first.param_groups))
    if missing and not own_group:
        rank_zero_warn(
            f"QuantizationAwareTraining: {len(missing)} learned scales were not in the optimizer; they were added to "
            "the first one as a new parameter group, with its first group's settings and no weight decay. Build the "
            "optimizer over `self.parameters()` to choose their settings yourself."
        )
    return True
