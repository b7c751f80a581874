"""``QuantizationAwareTraining``: fake quantization that switches on at an epoch end."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..checkpoint import saved_quantization
from ..core.adapters import lora_note
from ..core.qat import (
    FakeQuantizer,
    QuantConfig,
    convert_listed,
    convert_to_float,
    convert_to_qat,
    enable_fake_quant,
    qat_modules,
    quantizable_layers,
    quantizers,
    read_weight_ranges,
)
from ..core.qat_schedule import QATSchedule, calibration_steps, needs_calibration
from ..core.selection import normalize_patterns
from ..core.sharding import full, is_sharded
from ..core.wrappers import plain_name
from ..export.report import CompressionReport
from ..metrics.quant_error import QuantizationError
from ._export import (
    ValidationInputs,
    check_export_path,
    check_export_ready,
    check_export_template,
    export_at_fit_end,
    export_template,
)
from ._qat_checks import (
    check_averaging,
    check_converted_alike,
    check_no_overlap,
    check_search_data,
    check_state,
    check_switch_reached,
    check_validation_at,
    warn_if_already_quantizing,
)
from ._qat_resume import (
    attached_trainer,
    check_learned_resume,
    check_resumed_layers,
    check_saved_settings,
    quantized_keys,
    read_checkpoint_quantization,
)
from ._quantizers import check_in_optimizers, update_observers, warn_about_idle_layers
from ._settings import log_settings
from ._shift_capture import ShiftCapture
from ._validation import (
    StrategyCollectives,
    check_int,
    check_strategy,
    fast_dev_run_note,
    noting_layers_built_late,
    runs_in_spawned_processes,
    warn_if_saved_under_another_key,
)
from ._validation_plan import (
    clock_max_steps,
    optimizer_count,
    steps_per_epoch,
    validation_ahead,
    warn_if_max_steps_counts_several_optimizers,
)

__all__ = ["QuantizationAwareTraining"]

_STATE_VERSION = 1

_LEARNED_UNDER_FSDP2 = (
    "under FSDP2 needs its learned scales whole on every process: in configure_model, pass "
    "`ignored_params=lightning_compress.learned_scales(self)` to every `fully_shard` call (their gradients are "
    "averaged across processes by the callback)."
)


def _groups_note(group_size: int | None, grouped: int, layers: int) -> str:
    """How the weights are scaled, as the switch-on message says it: a layer whose input ``group_size`` does not
    divide keeps per-channel scales (a trial: the message said groups of 48 when no layer had them)."""
    if group_size is None:
        return ""
    if grouped == layers:
        return f" in groups of {group_size}"
    if grouped == 0:
        return f" per channel: `group_size`={group_size} divides no layer's input"
    return f" in groups of {group_size} in {grouped} of the {layers} layers, per channel in the others"


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training without touching the model's ``forward``.

    At ``setup`` the selected ``nn.Linear``/``nn.Conv{1,2,3}d`` layers are swapped for subclasses
    that share the same Parameters and fake-quantize their weight and input activation
    (:mod:`lightning_compress.core.qat`); until quantization switches on they compute exactly what
    the float layers compute. During epoch ``start_epoch`` the observers calibrate; fake quantization
    switches on when the next epoch starts (after the end of ``start_epoch``: its validation and its
    checkpoints score and hold the model they see, in float), or at the end of ``fit`` if
    ``start_epoch`` is the last epoch. All quantization state (on/off, scales, zero points, observer
    ranges, shifts) lives in the model's buffers, so it is in every checkpoint.

    Args:
        weight_bits: 2..8. Weights are symmetric, per output channel (per layer for ``power_of_two``).
        activation_bits: 2..8, or ``None`` for weight-only quantization.
        scale: ``"minmax"``, ``"power_of_two"`` (scale ``2**-p``, ``W_int = round(W * 2**p)``:
            fixed point with ``p`` fractional bits) or ``"learned"`` (LSQ, trained step sizes).
        shift_search: with ``power_of_two``, choose ``p`` per layer by trying shifts on the
            validation batches of epoch ``start_epoch`` (layer output error against float).
        start_epoch: the observers calibrate during this epoch (0-indexed); fake quantization is on from the
            next. In a fit that ``max_steps`` ends inside this epoch, they calibrate on its first tenth of optimizer
            steps and quantization switches on after them (quantizers with nothing to calibrate: at its first step).
        freeze_observers_epoch: ranges stop moving after this epoch (``None``: never).
        freeze_bn_epoch: BatchNorm statistics freeze after this epoch (``None``: never).
        include: glob patterns over module names (Linear/Conv layers; see ``IterativePruning``).
        exclude: glob patterns over module names to keep in float.
        shift_search_batches: validation batches used by ``shift_search`` (``None``: 4).
        export_path: at the end of ``fit``, write the model there (``.onnx``: an int8 ONNX model, which
            needs ``example_input_array``; otherwise :func:`~lightning_compress.save_compressed`).
            The model itself is not changed; the report is in :attr:`export_report`.
        group_size: ``None``: per-output-channel weight scales. An int (e.g. 32): one scale per group of
            that many consecutive input weights of each output row, the LLM recipe (with
            ``weight_bits=4``); layers whose input size it does not divide stay per channel.
        activation_granularity: ``"per_tensor"`` (observed ranges) or ``"per_token"`` (a dynamic
            asymmetric scale per row, from each batch; no observers): with ``group_size=32``,
            ``weight_bits=4`` and ``activation_bits=8``, torchao's 8da4w recipe.
        quantize_bias: also put each quantized layer's bias on its accumulator's grid (weight scale times
            input scale, the int32 bias of integer kernels), fake-quantized with the weights (from the epoch
            after ``start_epoch``): what an integer runtime adds is then what training used, and a compressed
            file stores the biases as int32 codes. Needs ``activation_bits`` with per-tensor activations, no
            ``group_size``.

    To load a QAT checkpoint for inference without the callback, see
    :func:`lightning_compress.load_qat_checkpoint`.

    Example:
        >>> from lightning_compress import QuantizationAwareTraining
        >>> qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=2)
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        scale: str = "minmax",
        shift_search: bool = False,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        shift_search_batches: int | None = None,
        export_path: str | Path | None = None,
        group_size: int | None = None,
        activation_granularity: str = "per_tensor",
        quantize_bias: bool = False,
    ) -> None:
        super().__init__()
        self.config = QuantConfig(
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            scale=scale,
            group_size=group_size,
            activation_granularity=activation_granularity,
            quantize_bias=quantize_bias,
        )
        if not isinstance(shift_search, bool):
            raise TypeError(f"`shift_search` must be a bool, got {shift_search!r}.")
        if shift_search and scale != "power_of_two":
            raise ValueError(f"`shift_search=True` needs `scale='power_of_two'`, got `scale`={scale!r}.")
        self.shift_search = shift_search
        self.start_epoch = check_int(start_epoch, "start_epoch") or 0
        self.freeze_observers_epoch = check_int(freeze_observers_epoch, "freeze_observers_epoch", optional=True)
        # when the quantizers calibrate, switch on and freeze (its `switch_step` is this callback's state)
        self.schedule = QATSchedule(
            self.start_epoch, self.freeze_observers_epoch, needs_calibration(self.config, shift_search)
        )
        self.freeze_bn_epoch = check_int(freeze_bn_epoch, "freeze_bn_epoch", optional=True)
        self.include = normalize_patterns(include, "include")
        self.exclude = normalize_patterns(exclude, "exclude")
        if shift_search_batches is not None and not shift_search:
            rank_zero_warn(
                f"QuantizationAwareTraining: `shift_search_batches`={shift_search_batches} has no effect without "
                "`shift_search=True`."
            )
        self.shift_search_batches = check_int(4 if shift_search_batches is None else shift_search_batches,
                                              "shift_search_batches", minimum=1) or 1  # fmt: skip
        self.shifts: dict[str, tuple[int, int | None]] = {}
        self._layers: list[str] = []
        self._capture = ShiftCapture(self.shift_search_batches)  # validation inputs the shift search runs on
        self._learned_params: list[nn.Parameter] = []
        self._scales_group = False  # the learned scales were given a parameter group of their own
        self._load_hook: Any = None
        # between `setup` and `teardown`: the load hooks read the module's Trainer (a Trainer held here would be
        # deep-copied with the module's hooks, and under DDP it holds a lock; a trial)
        self._fitting = False
        self._resumed_layers: set[str] | None = None  # the quantized layers a resumed fit's weights hold entries for
        self._template: nn.Module | None = None  # the module without weights, for exporting from shards
        self._converted: list[str] = []  # layers this fit converted: put back if it fails before training
        self._calibrated = False  # `start_epoch` ended in this fit
        self._calibration_epoch = start_epoch  # the epoch whose end switches quantization on
        self._at_start: int | None = None  # `max_steps` of a fit whose quantizers switch on as `start_epoch` starts
        self._trained = False  # this fit's training started (not a tuner's run, which swaps callbacks out)
        self._activation_quantizers: list[FakeQuantizer] = []
        self.export_path = check_export_path(export_path)
        self.export_report: CompressionReport | None = None
        self._validation_inputs = ValidationInputs()  # what an ONNX export measures float convolution outputs on

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.config.to_dict(), include=self.include, exclude=self.exclude)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._fitting:  # here when the load hook could not read the file (evaluating converts as it was saved)
            check_saved_settings(self.config, self._layers, saved_quantization(checkpoint))
        warn_if_saved_under_another_key(checkpoint, self)
        check_learned_resume(self.config, self.state_key, self._layers, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "include": list(self.include) if self.include else None,
            "exclude": list(self.exclude) if self.exclude else None,
            "layers": list(self._layers),
            "shifts": {k: [w, a] for k, (w, a) in self.shifts.items()},
            "scales_group": self._scales_group,
            **self.schedule.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"QuantizationAwareTraining's checkpoint state must be a dict, got {type(state_dict).__name__}."
            )
        if not state_dict:
            return
        shifts, group = check_state(state_dict, _STATE_VERSION)
        layers = state_dict.get("layers")
        missing = sorted(set(layers) - self._resumed_layers) if self._resumed_layers is not None and layers else []
        if missing:  # Lightning loads the weights before the callbacks' states: their load hook noted what they held
            raise ValueError(
                f"QuantizationAwareTraining: the checkpoint's state says it quantized {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, but its weights hold no quantizer entries for them (they were "
                "removed, or the weights come from another file): the scales it trained are lost. Resume from the "
                "checkpoint as it was saved, or start a new fit from its weights without `ckpt_path`."
            )
        self.schedule.load_state_dict(state_dict)
        self.shifts, self._scales_group = shifts, group

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "QuantizationAwareTraining")
        if stage == "fit" and runs_in_spawned_processes(trainer):
            raise ValueError(
                "QuantizationAwareTraining cannot run under a strategy that trains in spawned processes "
                "(`ddp_spawn`, `ddp_fork`, `ddp_notebook`): Lightning hands back only the weights, so the model in "
                "this process would end float, without its quantizers. Use strategy='ddp' (run as a script)."
            )
        if stage == "fit":
            max_epochs = trainer.max_epochs
            if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
                raise ValueError(
                    f"`start_epoch`={self.start_epoch} must be below the Trainer's `max_epochs`={max_epochs}: "
                    "quantization would never switch on." + fast_dev_run_note(trainer)
                )
            check_averaging(trainer, self.config.scale)
            if self.shift_search:
                check_validation_at(trainer, pl_module, self.start_epoch)
            check_export_ready(trainer, self.export_path, pl_module)
            before = {plain_name(name) for name, _ in qat_modules(pl_module)}
            with noting_layers_built_late(pl_module, "QuantizationAwareTraining converts layers", "select no"):
                others = [
                    set(other._layers)
                    or set(map(plain_name, quantizable_layers(pl_module, other.include, other.exclude)))
                    for other in trainer.callbacks  # type: ignore[attr-defined]
                    if other is not self and isinstance(other, QuantizationAwareTraining)
                ]
                selected = set(map(plain_name, quantizable_layers(pl_module, self.include, self.exclude)))
                check_no_overlap(selected, others)
                check_converted_alike(pl_module, selected, self.config)
                self._convert(pl_module)
            self._converted = [name for name in self._layers if name not in before]
            lora = lora_note(pl_module, self._converted, "fake-quantizes")
            if lora is not None:
                rank_zero_warn(lora)
            self._calibrated = False  # `start_epoch` ended in this fit
            self.schedule.switch_step = None  # a resumed fit's comes with its state
            self._calibration_epoch = self.start_epoch
            self._trained = False  # this fit's training started (not a tuner's run, which swaps callbacks out)
            self._template = export_template(trainer, pl_module, self.export_path)  # after converting
            self._resumed_layers = None
            self._fitting = True
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._check_resumed_layers)
        elif qat_modules(pl_module):
            self._convert(pl_module)
        else:
            # evaluating a float model: convert only if the checkpoint about to be loaded is quantized.
            # Lightning loads the weights after `setup` (and sets `trainer.ckpt_path` only then), so look at
            # the state dict itself, just before it is applied.
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._convert_if_quantized)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._validation_inputs.take()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        self._fitting = False
        if stage == "fit" and self._converted and not self._trained and not (self._layers and self._active(pl_module)):
            # a fit whose training never started with this callback (`Tuner.lr_find`/`scale_batch_size` run their
            # own callbacks): the layers it converted computed what the float ones do; the model gets them back
            convert_to_float(pl_module, self._converted)
            self._converted = []
            rank_zero_info(
                "QuantizationAwareTraining: the fit ended before its training started (a tuner's run?): the model's "
                "layers are float again."
            )

    def _convert(self, pl_module: nn.Module, saved: list[tuple[QuantConfig, list[str]]] | None = None) -> None:
        """Convert this callback's layers with its settings, or ``saved``'s layers with their settings (a checkpoint
        being evaluated)."""
        if saved is None:
            converted = convert_to_qat(pl_module, self.config, self.include, self.exclude)
            self._layers = [plain_name(name) for name in converted]  # as the state dict names them (trial GD)
        else:
            for config, layers in saved:
                convert_listed(pl_module, config, layers)
            self._layers = [plain_name(name) for name, _ in qat_modules(pl_module)]
        self._activation_quantizers = []  # cached: walking the module tree at every step costs on big models
        for _, quantizer in self._own_quantizers(pl_module):
            quantizer.sync_observers = True
            if quantizer.role == "activation":
                self._activation_quantizers.append(quantizer)

    def _convert_if_quantized(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Convert a float model the way the checkpoint about to be loaded was quantized: with the settings and layers
        its ``QuantizationAwareTraining`` states record (every such callback's; a trial: 4-bit layers given an 8-bit
        checkpoint's scales scored at chance), else with this callback's."""
        if qat_modules(module) or not quantized_keys(state_dict):
            return
        trainer = attached_trainer(module)
        saved, unread = read_checkpoint_quantization(trainer)
        self._convert(module, saved or None)
        if not saved:  # a trial: a 4-bit run's weights-only checkpoint scored 9.3% under a 2-bit callback, unsaid
            rank_zero_warn(
                "QuantizationAwareTraining: the checkpoint holds fake-quant layers but "
                + (
                    f"its settings could not be read: {unread}"
                    if unread
                    else "records no settings (saved with `save_weights_only=True`?)"
                )
                + f": they are converted with this callback's, {self.config}; its scales mean what they did in "
                "training only if the run used these."
            )
        present = {cb.config for cb in getattr(trainer, "callbacks", []) if isinstance(cb, QuantizationAwareTraining)}
        # settings no callback of this Trainer has (a trial: each of two callbacks warned about the other's)
        other = [config for config, _ in saved if config not in (present or {self.config})]
        if other:
            rank_zero_warn(
                f"QuantizationAwareTraining: the checkpoint was quantized with {other[0]}, not this callback's "
                f"{self.config}: its layers are converted with the checkpoint's settings, which its scales belong to."
            )

    def _check_resumed_layers(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._resumed_layers = check_resumed_layers(module, state_dict, prefix, self.config, self._layers)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """``fully_shard`` refuses our 0-dim learned activation scales in ``configure_model`` (after ``setup``, before
        ``on_fit_start`` can check): its message asks to change the model; the fix is to leave them whole."""
        self._validation_inputs.take()  # Lightning calls no `teardown` after an exception (trial BT: the hook stayed)
        if self.config.scale == "learned" and "scalar parameter" in str(exception):
            note = f"QuantizationAwareTraining(scale='learned'): {_LEARNED_UNDER_FSDP2}"
            if hasattr(exception, "add_note"):  # Python >= 3.11: printed under the message, matched by pytest
                exception.add_note(note)
            else:
                rank_zero_warn(note)
        if self._converted and not (self._layers and self._active(pl_module)):
            # refused before training, or failed before quantization switched on (an unlogged `monitor` found at
            # the first validation, a custom importance's scores at the first event): the layers this fit converted
            # computed exactly what the float ones do, so the model is given them back
            convert_to_float(pl_module, self._converted)
            self._converted = []

    def compression_settings(self) -> tuple[str, dict[str, Any]]:
        """``("qat", settings)``: what the loggers record as ``compress/qat/...`` hyperparameters."""
        return "qat", {
            **self.config.to_dict(), "start_epoch": self.start_epoch, "include": self.include,
            "exclude": self.exclude, "shift_search": self.shift_search,
            "shift_search_batches": self.shift_search_batches if self.shift_search else None,
            "freeze_observers_epoch": self.freeze_observers_epoch, "freeze_bn_epoch": self.freeze_bn_epoch,
            "export_path": None if self.export_path is None else str(self.export_path),
        }  # fmt: skip

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_settings(trainer, pl_module, self)
        check_export_template(self._template, pl_module, "QuantizationAwareTraining")
        selected = map(plain_name, quantizable_layers(pl_module, self.include, self.exclude))
        late = [name for name in selected if name not in self._layers]
        if late:
            rank_zero_warn(
                f"QuantizationAwareTraining: {late[:5]}{' ...' if len(late) > 5 else ''} match `include`/`exclude` "
                "but did not exist at `setup`, when the layers were converted (built in `configure_model`?): they "
                "stay float. Build them in `__init__` to quantize them."
            )
        if self.config.scale == "learned":  # before Lightning restores a resumed optimizer's state
            self._learned_params = [cast(nn.Parameter, q.scale) for _, q in self._own_quantizers(pl_module)]
            if any(is_sharded(p) for p in self._learned_params):
                raise ValueError(f"QuantizationAwareTraining(scale='learned') {_LEARNED_UNDER_FSDP2}")
            self._scales_group = check_in_optimizers(
                self._learned_params, trainer.optimizers, self._scales_group,
                [config.scheduler for config in trainer.lr_scheduler_configs],
            )  # fmt: skip

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``max_steps``, the fit must last until quantization switches on (the loader's length is known); a
        shift search needs validation data (the loaders are known now, before any training step)."""
        self._trained = True
        # it switches on inside `start_epoch` where the fit ends in it (trial FY: the warning asked for `start_epoch+1`
        if self.schedule.calibrates:  # epochs, which it needs no more)
            warn_if_max_steps_counts_several_optimizers(
                trainer, pl_module, "QuantizationAwareTraining", self.start_epoch, "start_epoch"
            )
        warn_if_already_quantizing(trainer, self.start_epoch, self._converted, self._own_quantizers(pl_module))
        epoch = trainer.current_epoch
        if epoch > self.start_epoch and self._layers and not self._active(pl_module):
            # resumed after `start_epoch` (Lightning skips the epoch start of a resumed epoch): quantization
            # switches on now. A checkpoint saved on the last batch of `start_epoch`, before its end, has no shifts:
            # this epoch's validation chooses them (trial CO: they came from the observed ranges, and were not fixed)
            if self.shift_search and not self.shifts and self._observed(pl_module) and validation_ahead(trainer):
                self._calibration_epoch = epoch
                rank_zero_warn(
                    f"QuantizationAwareTraining: the fit resumed after the end of `start_epoch`={self.start_epoch} "
                    "without running it (a checkpoint saved on its last batch), so no validation chose the shifts: "
                    f"epoch {epoch}'s validation chooses them, and fake quantization switches on from epoch "
                    f"{epoch + 1} on, one epoch later than in the uninterrupted fit."
                )
            else:
                if self.shift_search and not self.shifts and self._observed(pl_module):  # (trial CR: it promised an
                    rank_zero_warn(  # epoch the fit does not have)
                        f"QuantizationAwareTraining: the fit resumed after `start_epoch`={self.start_epoch}'s "
                        "validations without running them, and no validation is ahead to choose the shifts: they come "
                        "from the observed ranges."
                    )
                self._switch_on_or_calibrate(pl_module, epoch)
        # Lightning skips the epoch start of a resumed epoch (trial CH: resumed from `start_epoch - 1`'s last batch,
        # the calibration epoch observed nothing and quantization switched on uncalibrated)
        self._observe_if_due(pl_module, epoch, trainer.global_step)
        for _, quantizer in self._own_quantizers(pl_module):
            quantizer.train()
        if self.shift_search and epoch <= self._calibration_epoch and not self._active(pl_module):
            check_search_data(trainer, self.start_epoch)
        self._at_start = None
        # in batches: with several optimizers under manual optimization `max_steps` counts every one's steps (trial FR:
        # a GAN's LLM recipe trained in float to the end); the hedged warning above says it
        per_epoch, max_steps = steps_per_epoch(trainer), clock_max_steps(trainer)
        if per_epoch is None or max_steps is None or epoch > self.start_epoch or not self._layers:
            return
        if (self.start_epoch + 1) * per_epoch <= max_steps or self._active(pl_module):
            return  # the epoch ends inside the fit, or on already: resumed after it switched on inside `start_epoch`
        done = self.start_epoch * per_epoch
        inside = done < max_steps  # the fit ends inside `start_epoch`
        if inside and not self.shift_search:
            # trial FO: the LLM recipe in one long epoch that `max_steps` ends (a fine-tune's usual shape) was refused,
            # told to lower `start_epoch`=0; its quantizers read their ranges from the weights and from each token, and
            # switch on at the first step of `start_epoch` (trial FR: from a later `start_epoch` too). A recipe that
            # calibrates (per-tensor activation ranges, learned scales' starting values) was refused too, told to
            # shorten epochs with `limit_train_batches`: it calibrates on the first tenth of the fit's steps in that
            # epoch, then switches on. Both are planned as `start_epoch` starts, on its own length
            # (:meth:`_plan_in_epoch`); a fit resumed inside it keeps its checkpoint's plan (one saved before this
            # release: planned here, on epochs of this length)
            if epoch != self.start_epoch:
                return
            if not self.schedule.calibrates:
                self._at_start = trainer.max_steps
                self._switch_on_at_start(pl_module, epoch)
            elif trainer.global_step > 0 and self.schedule.switch_step is None:
                count = optimizer_count(trainer, pl_module)
                self.schedule.plan(step=count * done, per_epoch=per_epoch, max_steps=max_steps, optimizers=count)
            return
        check_switch_reached(trainer, self.start_epoch, per_epoch, inside)

    def _switch_on_at_start(self, pl_module: pl.LightningModule, epoch: int) -> None:
        """Fake quantization on at the first step of ``start_epoch``, with the weights' ranges read now: quantizers
        with nothing to calibrate, in a fit ``max_steps`` ends inside that epoch."""
        read_weight_ranges(self._own_layers(pl_module), unread=True)
        self._calibrated = True
        self._switch_on(pl_module, epoch, at_start=self._at_start)

    # ------------------------------------------------------------------ training hooks
    def _observe_if_due(self, pl_module: pl.LightningModule, epoch: int, step: int = 0) -> None:
        """Observers on from ``start_epoch`` through ``freeze_observers_epoch``, off after it (a resume past the
        freeze epoch's last batch skips its end, where they freeze: trial CI), or after the switch in it (trial FY: a
        fit resumed after that switch had its ranges move on)."""
        observing = self.schedule.observing(epoch, step)
        if observing is None:
            return
        own = self._own_quantizers(pl_module)
        if not observing and any(q.observer_enabled for _, q in own if q.role == "weight"):
            read_weight_ranges(self._own_layers(pl_module))  # as the skipped epoch end would have
        for _, quantizer in own:
            quantizer.observer_enabled = observing

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        own = self._own_quantizers(pl_module)
        self._observe_if_due(pl_module, epoch, trainer.global_step)
        for _, quantizer in own:  # they observe while the model trains, even if it was left in eval mode (Lightning
            quantizer.train()  # keeps a module's mode): they would never calibrate
        if epoch > self.start_epoch and self._layers and not self._active(pl_module):
            self._switch_on_or_calibrate(pl_module, epoch)  # after `start_epoch`'s end: its checkpoints hold the
            # model it validated
        if epoch == self.start_epoch and self._layers and not self._active(pl_module):
            self._plan_in_epoch(trainer, pl_module)
        self._freeze_bn(trainer, pl_module)

    def _plan_in_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """As ``start_epoch`` starts: where ``max_steps`` ends the fit inside it, counted on this epoch's own length
        (trial FW: a `GradientAccumulationScheduler` or a reloaded loader changed it after epoch 0, and quantization
        switched on only at the end of fit), quantizers with nothing to calibrate switch on now, and the others plan
        to switch on after the first tenth of the fit's steps in it (the schedule's ``switch_step``)."""
        per_epoch, max_steps = steps_per_epoch(trainer), clock_max_steps(trainer)
        if per_epoch is None or max_steps is None:
            return
        count, step = optimizer_count(trainer, pl_module), trainer.global_step
        plan = self.schedule.plan(step=step, per_epoch=per_epoch, max_steps=max_steps, optimizers=count)
        if plan == "first_step":
            self._at_start = trainer.max_steps
            self._switch_on_at_start(pl_module, trainer.current_epoch)
        elif plan == "after_calibration" and self.shift_search:  # (refused at the start of training where the
            self.schedule.switch_step = None  # lengths told it): its validations choose the shifts at the epoch end
        elif plan == "after_calibration":
            left = self.schedule.steps_left(step, max_steps, count)
            calibration = calibration_steps(left)
            rank_zero_info(
                f"QuantizationAwareTraining: `max_steps`={trainer.max_steps} ends the fit inside `start_epoch`="
                f"{self.start_epoch}: its observers calibrate on the first {calibration} optimizer step"
                f"{'' if calibration == 1 else 's'} of that epoch (a tenth of the fit's {left} in it, at least one), "
                f"and fake quantization switches on after step {self.schedule.switch_step}."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._freeze_bn(trainer, pl_module)  # validation puts the model back in train mode

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        update_observers(self._activation_quantizers, StrategyCollectives(trainer.strategy))
        epoch, step = trainer.current_epoch, trainer.global_step
        if self._calibrated or not self.schedule.switch_due(epoch, step) or self._active(pl_module):
            return
        read_weight_ranges(self._own_layers(pl_module))  # as the weights are after this step
        self._calibrated = True
        self._switch_on(pl_module, epoch, at_step=self.schedule.switch_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # DDP only reduces what required grad when it wrapped the model; learned scales start training later
        collectives = StrategyCollectives(trainer.strategy)
        for param in self._learned_params:
            if param.grad is not None:
                param.grad.copy_(collectives.all_reduce(param.grad, "mean"))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        calibrating = epoch == self._calibration_epoch and not self._active(pl_module)
        if calibrating and (not self.shift_search or self._search_shifts(trainer, pl_module)):
            self._calibrated = True  # quantization switches on when the next epoch starts, or at the end of fit
        if self.schedule.freezes_at_epoch_end(epoch, trainer.global_step):
            # the weights' ranges freeze as the weights end the epoch, not as the last forward saw them, one
            # optimizer step before (trial DK: 4-9% off the final weights with a switch-on at the end of fit); ranges
            # frozen at a switch inside the epoch stay as trained (trial GA: read again at its end, 11% off)
            read_weight_ranges(self._own_layers(pl_module))
            for _, quantizer in self._own_quantizers(pl_module):
                quantizer.observer_enabled = False

    def _switch_on(
        self,
        pl_module: pl.LightningModule,
        epoch: int,
        *,
        at_fit_end: bool = False,
        at_start: int | None = None,
        at_step: int | None = None,
    ) -> None:
        # ranges frozen at the end of an epoch before (`freeze_observers_epoch`) stay frozen: enable_fake_quant would
        # switch the weight observers back on (trial DH: they moved for one more epoch, or left the fit on)
        # `epoch`: the epoch starting, or the one switching inside (at a step, or at fit end the calibration epoch)
        frozen = self.schedule.frozen_at_switch(epoch, inside=at_fit_end or at_step is not None)
        with warnings.catch_warnings():  # said below, with the reason (trial EA: it named `calibrate`, never called)
            warnings.filterwarnings("ignore", message=r"enable_fake_quant: .* never observed an activation")
            enable_fake_quant(pl_module, layers=self._layers, observe=False if frozen else None)  # learned scales train
        idle = warn_about_idle_layers(pl_module, self._calibration_epoch, self._own_layers(pl_module))
        when = (
            "at the end of fit (its calibration epoch was the last: calibrated, not yet trained or validated quantized)"
            if at_fit_end
            else f"from epoch {self._calibration_epoch + 1} on"
        )
        if at_start is not None:
            when = (
                f"from the first step of epoch {epoch} on: `max_steps`={at_start} ends the fit inside it, and these "
                "quantizers need no calibration epoch (weight scales from the weights, activations per token or float)"
            )
        if at_step is not None:
            when = f"after optimizer step {at_step} (calibrated on the steps of epoch {epoch} before it)"
        own = self._own_layers(pl_module)
        grouped = sum(1 for _, layer in own if getattr(layer.weight_fake_quant, "groups", 0))
        rank_zero_info(
            f"QuantizationAwareTraining: fake quantization on for {len(self._layers) - len(idle)} layers "
            + (f"({len(idle)} that never ran stay float) " if idle else "")
            + f"(weights {self.config.weight_bits} bits"
            + _groups_note(self.config.group_size, grouped, len(own))
            + (
                ", activations in float"
                if self.config.activation_bits is None
                else f", activations {self.config.activation_bits} bits"
                + (" per token" if self.config.activation_granularity == "per_token" else "")
            )
            + f", {self.config.scale}) {when}."
        )

    def _switch_on_or_calibrate(self, pl_module: pl.LightningModule, epoch: int) -> None:
        """After ``start_epoch``: fake quantization on; or, when nothing calibrated the quantizers (the callback added
        on a resume past it), ``epoch`` calibrates them first (trial CA: switched on at once, it warned that every
        layer "never ran its forward")."""
        if self.shift_search and not self._calibrated and epoch <= self._calibration_epoch:
            return  # a resumed fit's shifts wait for this epoch's validation (:meth:`_search_shifts`)
        if self._calibrated or self._observed(pl_module):
            self._switch_on(pl_module, epoch)
            return
        if self._calibration_epoch == epoch:
            return  # said at the start of training
        self._calibration_epoch = epoch
        for _, quantizer in self._own_quantizers(pl_module):
            quantizer.observer_enabled = True
        rank_zero_info(
            f"QuantizationAwareTraining: its quantizers have observed nothing (the fit resumed at epoch {epoch}, past "
            f"`start_epoch`={self.start_epoch}): epoch {epoch} calibrates them, fake quantization from epoch "
            f"{epoch + 1} on."
        )

    def _observed(self, pl_module: pl.LightningModule) -> bool:
        """Whether any of this callback's quantizers observed a tensor or had its shift fixed (from a checkpoint
        too)."""
        return any(quantizer.initialized or quantizer.frozen_shift for _, quantizer in self._own_quantizers(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._calibrated and self._layers and not self._active(pl_module):
            self._switch_on(pl_module, self._calibration_epoch, at_fit_end=True)  # no epoch followed `start_epoch`

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._layers and not self._active(pl_module):
            rank_zero_warn(
                f"QuantizationAwareTraining: the fit ended after {trainer.current_epoch} epochs, before fake "
                f"quantization switched on at the end of `start_epoch`={self.start_epoch} (early stopping, "
                "`max_time` or `max_steps`?): the model is not quantized"
                + (
                    ""
                    if self.export_path is None
                    else f", and `export_path`={str(self.export_path)!r} holds float weights"
                )
                + "."
            )
        if self.export_path is not None:
            template, self._template = self._template, None
            self.export_report = export_at_fit_end(
                trainer, pl_module, self.export_path, template=template, calibration=self._validation_inputs.take()
            )

    # ------------------------------------------------------------------ validation: shift search, errors
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_inputs.start(trainer, pl_module, self.export_path)
        capture = (
            self.shift_search
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and trainer.current_epoch == self._calibration_epoch
            and not self._active(pl_module)
        )
        if not capture:
            return
        self._capture.start(self._own_layers(pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_inputs.stop()
        self._capture.stop()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._active(pl_module):
            return
        for name, module in self._own_layers(pl_module):
            layer = cast(Any, module)
            if not layer.weight_fake_quant.initialized:
                continue  # its forward never ran: it computes in float (measuring it would give it a scale)
            metric = QuantizationError().to(pl_module.device)
            with torch.no_grad():
                weight = full(layer.weight)  # a sharded (FSDP2) weight is whole only inside the forward
                metric.update(weight, layer.weight_fake_quant(weight))
            pl_module.log(f"compress/quant_error/{name}", metric.compute(), sync_dist=trainer.world_size > 1)

    # ------------------------------------------------------------------ helpers
    def _active(self, pl_module: nn.Module) -> bool:
        return any(q.fake_quant_enabled for _, q in self._own_quantizers(pl_module))

    def _own_layers(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        """This callback's fake-quant layers (another callback's keep their own schedule and settings; a trial: the
        first to switch on switched on every layer, and learned scales were gathered from both)."""
        mine = set(self._layers)  # plain names: activation checkpointing may wrap blocks after `setup` (trial GD)
        return [(name, module) for name, module in qat_modules(pl_module) if plain_name(name) in mine]

    def _own_quantizers(self, pl_module: nn.Module) -> list[tuple[str, FakeQuantizer]]:
        """Each quantizer once, under its first layer's name: layers tied to one weight share its quantizer (trial DS:
        a learned scale shared by 4 layers was put in the optimizer 4 times and stepped 4 times per step)."""
        found: dict[int, tuple[str, FakeQuantizer]] = {}
        for n, module in self._own_layers(pl_module):
            for q, quantizer in quantizers(module):
                found.setdefault(id(quantizer), (f"{n}.{q}", quantizer))
        return list(found.values())

    def _search_shifts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Choose the shifts on the inputs this epoch's validations gave; ``False``: none did in a resumed fit (its
        validations ran before the checkpoint, or Lightning skipped them), and the next epoch's choose them."""
        layers = self._own_layers(pl_module)
        epoch = trainer.current_epoch
        if self._capture.captured_none(layers) and (trainer.ckpt_path is not None or epoch != self.start_epoch):
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 0 or epoch + 1 < max_epochs:
                # (trial CQ: resumed after `start_epoch`'s last validation, the fit failed at its end)
                self._calibration_epoch = epoch + 1
                rank_zero_warn(
                    f"QuantizationAwareTraining: no validation of this fit ran in epoch {epoch}, which was to choose "
                    f"the shifts (it resumed after that epoch's validations, or Lightning skipped them): epoch "
                    f"{epoch + 1}'s validation chooses them, and fake quantization switches on from epoch {epoch + 2} "
                    "on, later than in the uninterrupted fit."
                )
                return False
            rank_zero_warn(
                f"QuantizationAwareTraining: no validation of this fit ran in epoch {epoch}, which was to choose the "
                "shifts, and no epoch follows: they come from the observed ranges."
            )
            return True
        if self._capture.captured_none(layers):
            raise ValueError(
                f"`shift_search` chooses the shifts on validation data at the end of `start_epoch`="
                f"{self.start_epoch}, but no validation batch ran in that epoch: pass `val_dataloaders` to `fit`, "
                "validate in that epoch, or set `shift_search=False`."
            )
        self.shifts.update(self._capture.search(trainer, pl_module, layers))
        return True

    def _freeze_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.freeze_bn_epoch is None or trainer.current_epoch <= self.freeze_bn_epoch:
            return
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                module.eval()
