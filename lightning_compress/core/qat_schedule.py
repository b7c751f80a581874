"""When quantization-aware training's quantizers observe, freeze and switch on: counters of epochs and optimizer
steps, no Lightning.

The observers calibrate during ``start_epoch``; fake quantization switches on as the next epoch starts. Where the
fit's last step (``max_steps``) comes inside ``start_epoch``, the quantizers that calibrate (per-tensor activation
ranges, power-of-two shifts, learned scales' starting values) calibrate on the first :data:`CALIBRATION_SHARE` of the
fit's steps left in that epoch and switch on after them (:attr:`QATSchedule.switch_step`); those with nothing to
calibrate (weight scales from the weights, activation scales from each token, or float activations) switch on at its
first step. ``freeze_observers_epoch`` stops the ranges moving after that epoch, or at the switch inside it.

Steps: ``max_steps`` and ``per_epoch`` count the steps of one optimizer (the clock of ``max_steps``);
``switch_step`` and the ``step`` arguments count the steps of all of them (``optimizers`` per batch), as a Trainer's
``global_step`` does.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from .checks import is_integer
from .fake_quant import QuantConfig

__all__ = ["CALIBRATION_SHARE", "QATSchedule", "calibration_steps", "needs_calibration"]

# the share of a fit's steps in `start_epoch` its quantizers calibrate on, where `max_steps` ends the fit inside that
# epoch (a fit of several epochs calibrates on the whole epoch: a tenth of a ten-epoch fit);
# `python benchmarks/qat_calibration.py` measures others
CALIBRATION_SHARE = 0.1

Plan = Literal["epoch_end", "first_step", "after_calibration"]


def calibration_steps(left: int) -> int:
    """The optimizer steps quantizers calibrate on in a ``start_epoch`` the fit ends inside, ``left`` steps of the fit
    to run in it: :data:`CALIBRATION_SHARE` of them, at least one."""
    if left < 1:
        raise ValueError(f"`left`={left!r} must be a positive number of steps.")
    return max(1, math.ceil(left * CALIBRATION_SHARE))


def needs_calibration(config: QuantConfig, shift_search: bool = False) -> bool:
    """Whether a quantizer of ``config`` takes its range from what it observes while calibrating: per-tensor
    activation ranges, power-of-two shifts, learned scales' starting values. Min/max weight scales come from the
    weights, and per-token activation scales from each token, at any step."""
    per_tensor = config.activation_bits is not None and config.activation_granularity == "per_tensor"
    return per_tensor or config.scale != "minmax" or shift_search


class QATSchedule:
    """The epochs and steps at which quantizers calibrate, switch on and freeze.

    Args:
        start_epoch: the calibration epoch (0-indexed).
        freeze_observers_epoch: the ranges stop moving after this epoch (``None``: never); not before
            ``start_epoch``.
        calibrates: whether the quantizers calibrate (:func:`needs_calibration`).

    Its state is :attr:`switch_step` (:meth:`state_dict`): the step after which quantization switches on inside
    ``start_epoch``, planned by :meth:`plan` as that epoch starts, so that a resumed fit switches where the
    uninterrupted one does.
    """

    def __init__(self, start_epoch: int, freeze_observers_epoch: int | None, calibrates: bool) -> None:
        if freeze_observers_epoch is not None and freeze_observers_epoch < start_epoch:
            raise ValueError(
                f"`freeze_observers_epoch`={freeze_observers_epoch} is before `start_epoch`={start_epoch}: "
                "the observers must calibrate before they freeze."
            )
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.calibrates = calibrates
        self.switch_step: int | None = None

    def plan(self, *, step: int, per_epoch: int, max_steps: int, optimizers: int = 1) -> Plan:
        """Where ``start_epoch`` switches quantization on, the epoch starting at ``step`` with ``per_epoch`` steps of
        the fit's ``max_steps``: ``"epoch_end"`` (the epoch ends inside the fit: as the next starts), ``"first_step"``
        (the fit ends inside it, and nothing calibrates) or ``"after_calibration"`` (the fit ends inside it: after
        :func:`calibration_steps` of the ``left`` steps to run, at :attr:`switch_step`)."""
        self.switch_step = None
        left = self.steps_left(step, max_steps, optimizers)
        if left >= per_epoch:
            return "epoch_end"
        if not self.calibrates:
            return "first_step"
        self.switch_step = step + optimizers * calibration_steps(left)
        return "after_calibration"

    def steps_left(self, step: int, max_steps: int, optimizers: int = 1) -> int:
        """The steps of the fit's ``max_steps`` left to run from ``step`` (counted as :meth:`plan` counts them)."""
        return max_steps - step // optimizers

    def switched(self, step: int) -> bool:
        """Whether the planned switch inside ``start_epoch`` is at or before ``step``."""
        return self.switch_step is not None and step >= self.switch_step

    def switch_due(self, epoch: int, step: int) -> bool:
        """Whether quantization switches on after ``step`` of ``epoch`` (inside ``start_epoch``)."""
        return epoch == self.start_epoch and self.switched(step)

    def observing(self, epoch: int, step: int) -> bool | None:
        """Whether the observers run at ``step`` of ``epoch``: ``None`` before ``start_epoch`` (left as they are),
        ``False`` after ``freeze_observers_epoch``, or in it after the switch."""
        if epoch < self.start_epoch:
            return None
        freeze = self.freeze_observers_epoch
        return not (freeze is not None and (epoch > freeze or (self.switched(step) and epoch >= freeze)))

    def frozen_at_switch(self, epoch: int, *, inside: bool) -> bool:
        """Whether the ranges are frozen as quantization switches on in ``epoch``: as it starts (``inside=False``,
        frozen after ``freeze_observers_epoch``), or inside it, at a step or at the end of fit (from it on)."""
        freeze = self.freeze_observers_epoch
        return freeze is not None and (epoch >= freeze if inside else epoch > freeze)

    def freezes_at_epoch_end(self, epoch: int, step: int) -> bool:
        """Whether the ranges freeze as ``epoch`` ends: ``freeze_observers_epoch``'s end, unless they froze at the
        switch inside it (read again at the end, they would not be the ones the model trained with)."""
        if self.freeze_observers_epoch != epoch:
            return False
        return not (epoch == self.start_epoch and self.switched(step))

    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :attr:`switch_step` (a state without it keeps none: the plan is made again)."""
        switch = state.get("switch_step")
        if switch is not None and not (is_integer(switch) and int(switch) >= 0):
            raise ValueError(
                f"The checkpoint's QuantizationAwareTraining state has switch_step={repr(switch)[:40]}: not what it "
                "saves (an optimizer step, or None); the checkpoint is damaged."
            )
        self.switch_step = None if switch is None else int(switch)
