"""What ``QuantizationAwareTraining`` checks against the Trainer, the module and the other callbacks before it
converts anything."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .._lightning import overrides
from ..core.checks import is_integer
from ..core.fake_quant import FakeQuantizer
from ..core.qat import QuantConfig, qat_modules, settings_differ
from ._validation import weight_averaging

__all__ = ["check_averaging", "check_converted_alike", "check_no_overlap", "check_state", "check_validation_at"]


def check_averaging(trainer: pl.Trainer, scale: str) -> None:
    """Weight averaging that would average what quantizes: ``WeightAveraging`` (EMA) averages buffers too, so
    the quantizers' scales, ranges and flags (a model at chance, or a shape error with BatchNorm); SWA averages
    Parameters, so learned scales (``scale="learned"``) with their values from before calibration."""
    for callback in weight_averaging(trainer):
        swa = isinstance(callback, StochasticWeightAveraging)
        if swa and scale != "learned":
            continue  # Parameters only: the weights, which the weight quantizers observe again
        if swa:
            what, fix = "learned scales, with their values from before calibration", "use minmax or power of two"
        else:
            what = "scales, ranges and flags: it averages buffers"
            fix = "use StochasticWeightAveraging (Parameters only) with minmax"
        raise ValueError(
            f"QuantizationAwareTraining cannot run beside {type(callback).__name__}: it would average the "
            f"quantizers' state ({what}) into the model it returns. Quantize without weight averaging, or {fix}."
        )


def check_no_overlap(mine: set[str], others: Iterable[set[str]]) -> None:
    """A layer keeps the settings of the first callback that converts it: a second callback on the same layers
    would silently change nothing, so it is refused before the first one converts anything (as two pruning
    callbacks are). ``mine``, ``others``: the layers this callback and each other QAT callback select."""
    for theirs in others:
        shared = sorted(mine & theirs)
        if shared:
            raise ValueError(
                f"Two QuantizationAwareTraining callbacks select the same layers {shared[:5]}"
                f"{' ...' if len(shared) > 5 else ''}: a layer keeps the first one's settings, so give them "
                "disjoint `include`/`exclude` patterns."
            )


def check_converted_alike(model: nn.Module, selected: set[str], config: QuantConfig) -> None:
    """Layers this callback selects that are fake-quant layers already (an earlier fit's) must have its settings: the
    conversion keeps a layer's own, while the checkpoints of this fit would record the callback's (a trial: a second
    fit with 4-bit settings kept the 8-bit layers, and its checkpoint reloaded 4-bit quantizers holding 8-bit
    scales: 9.3% against 81.7%)."""
    differ = {
        name: d for name, layer in qat_modules(model) if name in selected and (d := settings_differ(layer, config))
    }
    if differ:
        names = sorted(differ)
        raise ValueError(
            f"QuantizationAwareTraining: {names[:5]}{' ...' if len(names) > 5 else ''} are fake-quant layers already, "
            f"converted with other settings ({', '.join(differ[names[0]])}). Call `convert_to_float(model)` before "
            "this fit to quantize them again with this callback's settings, or give the callback the settings they "
            "have."
        )


def check_validation_at(trainer: pl.Trainer, pl_module: pl.LightningModule, start_epoch: int) -> None:
    """``shift_search=True`` needs a validation in epoch ``start_epoch``."""
    every = trainer.check_val_every_n_epoch or 1
    runs = trainer.limit_val_batches != 0 and overrides("validation_step", pl_module) and (start_epoch + 1) % every == 0
    if not runs:
        raise ValueError(
            "`shift_search=True` evaluates shifts on the validation batches of epoch "
            f"`start_epoch`={start_epoch}, but no validation runs then (needs a `validation_step`, "
            f"`limit_val_batches` > 0 and `check_val_every_n_epoch` dividing {start_epoch + 1})."
        )


def check_state(state: dict[str, Any], version: int) -> tuple[dict[str, tuple[int, int | None]], bool]:
    """The shifts and the scales-group flag of a saved callback state, refused when it is not what the callback saves
    (a trial: `bool("no")` is True, and the optimizer restore failed)."""
    if state.get("version") != version:
        raise ValueError(f"QuantizationAwareTraining state version {repr(state.get('version'))[:40]} is not supported.")
    shifts, group = state.get("shifts", {}), state.get("scales_group", False)
    good = isinstance(shifts, dict) and all(
        isinstance(name, str)
        and isinstance(pair, (list, tuple))
        and len(pair) == 2
        and is_integer(pair[0])
        and (pair[1] is None or is_integer(pair[1]))
        for name, pair in shifts.items()
    )
    if not good or not isinstance(group, bool):
        raise ValueError(
            f"The checkpoint's QuantizationAwareTraining state has shifts={str(shifts)[:80]}, "
            f"scales_group={repr(group)[:20]}: not what it saves ({{layer: [weight shift, input shift or None]}}, "
            "a bool); the checkpoint is damaged."
        )
    return {k: (int(w), None if a is None else int(a)) for k, (w, a) in shifts.items()}, group


def warn_if_already_quantizing(
    trainer: pl.Trainer, start_epoch: int, converted_now: list[str], own: list[tuple[str, FakeQuantizer]]
) -> None:
    """Layers converted before this fit (an earlier fit, a `fast_dev_run`, ``convert_to_qat``) whose quantizers already
    fake-quantize keep doing so from the first step, with the ranges they hold: the schedule cannot switch on what is
    on (trial CT: a smoke run's one-batch calibration quantized every epoch of the next fit, said nowhere). Called at
    the start of training, after Lightning restored a checkpoint (a resumed fit's quantizers are its own)."""
    # the calibration epoch still ahead or now (trial EA: the default `start_epoch=0` was never warned about)
    if trainer.ckpt_path is not None or start_epoch < trainer.current_epoch:
        return
    fresh = {f"{name}." for name in converted_now}
    on = sorted(
        {name.rsplit(".", 1)[0] for name, q in own if q.fake_quant_enabled and not name.startswith(tuple(fresh))}
    )
    if on:
        rank_zero_warn(
            f"QuantizationAwareTraining: {on[:3]}{' ...' if len(on) > 3 else ''} already fake-quantize (converted "
            f"and switched on before this fit: an earlier fit, a fast_dev_run, or your own code), so they quantize "
            f"from the first step with the ranges they hold, not from `start_epoch`={start_epoch} after a "
            "calibration. To follow the schedule with the trained weights, switch them off first "
            "(`enable_fake_quant(model, False)`, or `convert_to_float(model)`), or fit a fresh instance"
            + ("." if start_epoch == trainer.current_epoch else "; set `start_epoch=0` to go on quantizing.")
        )
