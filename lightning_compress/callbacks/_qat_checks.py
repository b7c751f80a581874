"""What ``QuantizationAwareTraining`` checks against the Trainer, the module and the other callbacks before it
converts anything."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .._lightning import overrides
from ..core.checks import is_integer
from ..core.fake_quant import FakeQuantizer
from ..core.qat import QuantConfig, qat_modules, settings_differ
from ._validation import weight_averaging
from ._validation_plan import validates_in_epoch, validation_enabled

__all__ = [
    "check_averaging",
    "check_converted_alike",
    "check_no_overlap",
    "check_search_data",
    "check_state",
    "check_switch_reached",
    "check_validation_at",
]


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
    """``shift_search=True`` needs a validation in epoch ``start_epoch``: a fit with no validation data is told so
    first (trial GD: told to make `check_val_every_n_epoch` divide 1, it was then refused for having no data)."""
    if not validation_enabled(trainer):
        _refuse_no_search_data(start_epoch)
    every = trainer.check_val_every_n_epoch or 1
    runs = trainer.limit_val_batches != 0 and overrides("validation_step", pl_module) and (start_epoch + 1) % every == 0
    if not runs:
        raise ValueError(
            "`shift_search=True` evaluates shifts on the validation batches of epoch "
            f"`start_epoch`={start_epoch}, but no validation runs then (needs a `validation_step`, "
            f"`limit_val_batches` > 0 and `check_val_every_n_epoch` dividing {start_epoch + 1})."
        )


def check_search_data(trainer: pl.Trainer, start_epoch: int) -> None:
    """As training starts, where the shift search is still ahead: the fit has validation batches for it, and (before
    ``start_epoch``) validates in that epoch."""
    # Lightning loads the validation loaders here only when the first epoch validates or a sanity check ran
    # (trial CR: `check_val_every_n_epoch=2` without a sanity check was refused as having no validation data);
    # otherwise the end of `start_epoch` says it if none ran
    first_validates = trainer.check_val_every_n_epoch in (None, 1)  # the loaders would be loaded by now
    if not validation_enabled(trainer) or (trainer.val_dataloaders is None and first_validates):
        _refuse_no_search_data(start_epoch)
    if trainer.current_epoch <= start_epoch and validates_in_epoch(trainer, start_epoch) is False:
        raise ValueError(
            "`shift_search=True` evaluates shifts on the validation batches of epoch "
            f"`start_epoch`={start_epoch}, but the Trainer's `val_check_interval`="
            f"{trainer.val_check_interval} batches, counted over the fit (`check_val_every_n_epoch`=None), runs "
            f"no validation in that epoch ({trainer.num_training_batches} batches per epoch): choose an interval "
            "that validates in it, or another `start_epoch`, or set `shift_search=False`."
        )


def _refuse_no_search_data(start_epoch: int) -> NoReturn:
    raise ValueError(
        "`shift_search=True` evaluates shifts on the validation batches of epoch "
        f"`start_epoch`={start_epoch}, but this fit has no validation data: pass `val_dataloaders` to "
        "`fit` (or a datamodule's `val_dataloader`), or set `shift_search=False`."
    )


def check_switch_reached(trainer: pl.Trainer, start_epoch: int, per_epoch: int, inside: bool) -> None:
    """Refuse a fit whose ``max_steps`` ends before quantization switches on, after ``start_epoch`` of ``per_epoch``
    steps: one ending before that epoch, or (``inside``) a shift search's in it, which chooses on the validations of
    the whole epoch. ``max_steps`` is counted as batches: with several optimizers under manual optimization it counts
    every one's steps (trial FR: a GAN's LLM recipe trained in float to the end), how often each steps is not known."""
    switch_on = (start_epoch + 1) * per_epoch
    if switch_on <= trainer.max_steps:
        return
    epochs = "epochs" if start_epoch else "the first epoch"
    if inside:
        raise ValueError(
            f"`shift_search=True` chooses the shifts on the validation at the end of `start_epoch`="
            f"{start_epoch}, but the Trainer's `max_steps`={trainer.max_steps} ends the fit inside that epoch "
            f"({per_epoch} optimizer steps): set `shift_search=False` (the observers then calibrate on the first "
            f"tenth of the steps, and quantization switches on after them), or make {epochs} shorter: "
            "`limit_train_batches=N` gives epochs of N batches (from a shuffled loader)."
        )
    raise ValueError(
        f"`start_epoch`={start_epoch}: quantization switches on after {switch_on} "
        f"optimizer steps ({per_epoch} per epoch), but the Trainer's `max_steps`={trainer.max_steps} ends the fit "
        "before: quantization would never switch on. "
        + ("Lower `start_epoch`, raise `max_steps`, or " if start_epoch else "Raise `max_steps`, or ")
        + f"make {epochs} shorter (`limit_train_batches=N`: epochs of N batches), so that the fit reaches "
        "`start_epoch`: where `max_steps` ends the fit inside it, its quantizers calibrate on its first steps."
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
