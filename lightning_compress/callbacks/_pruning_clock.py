"""Where :class:`~lightning_compress.callbacks.IterativePruning`'s schedule stands on the fit's clock, and what a
checkpoint said of that clock: steps per epoch, offset, the step of the last validation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..core.iterative import IterativePruner
from ._pruning_checks import saved_clock_offset, saved_last_validation, saved_steps_per_epoch
from ._validation_plan import EpochWindow, steps_per_epoch, validation_skipped_on_resume


class PruningClock:
    """The pruning schedule's clock on a fit: in optimizer steps (``in_steps``) or in epochs.

    A checkpoint's entries (:meth:`load`) are read once, when training starts: :meth:`skipped_validation` and
    :meth:`place` consume them.
    """

    def __init__(self) -> None:
        self.in_steps = False
        self.steps_per_epoch: int | None = None  # optimizer steps per epoch of a step clock placed from epochs
        self.offset = 0  # the step clock minus the Trainer's global_step (a resume with other steps per epoch)
        self._said_length = False  # said that a guarded step clock cannot follow a new epoch length
        self.first_epoch = False  # no epoch of this fit has started a batch yet
        self.first_batch = False  # no batch of this fit has started yet
        self.last_validation = -1  # the optimizer step of this fit's last validation (-1: none yet)
        self._saved_steps_per_epoch: int | None = None  # the checkpoint's
        self._saved_offset = 0  # the checkpoint's clock offset
        self._saved_last_validation: int | None = None  # the checkpoint's (None: not recorded, an older one)

    def reset(self) -> None:
        """A new fit: no validation yet, no checkpoint read."""
        self.last_validation, self._saved_last_validation, self._said_length = -1, None, False

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_per_epoch": self.steps_per_epoch, "clock_offset": self.offset,
            "last_validation": self.last_validation,
        }  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        """A checkpoint's clock entries (damaged ones refused), applied when training starts."""
        self._saved_steps_per_epoch = saved_steps_per_epoch(state)
        self._saved_offset = saved_clock_offset(state)
        self._saved_last_validation = saved_last_validation(state)
        self.last_validation = -1 if self._saved_last_validation is None else self._saved_last_validation

    @property
    def saved_in_steps(self) -> bool:
        """Whether the checkpoint's state was saved by a fit pruning in optimizer steps (read before :meth:`place`)."""
        return bool(self._saved_steps_per_epoch)

    def skipped_validation(self, trainer: pl.Trainer) -> bool:
        """Whether the checkpoint was saved before the validation due after its batch (not after it: its last
        validation is not at its step), which Lightning resumes without."""
        saved, self._saved_last_validation = self._saved_last_validation, None
        return saved is not None and saved != trainer.global_step and validation_skipped_on_resume(trainer)

    def validated(self, trainer: pl.Trainer) -> None:
        """A validation of the fit (not the sanity check) ended."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.last_validation = trainer.global_step

    def resumed_offset(self, trainer: pl.Trainer, core: IterativePruner) -> int:
        """The offset :meth:`place` gives a step clock (read before it, without consuming the checkpoint's entries):
        what the schedule's end at ``max_steps`` is moved by."""
        saved, now = self._saved_steps_per_epoch, steps_per_epoch(trainer)
        if not (saved and now):
            return 0
        if int(saved) != now:
            return round(core.steps * now / int(saved)) - trainer.global_step
        return self._saved_offset

    def place(self, trainer: pl.Trainer, core: IterativePruner) -> None:
        """A step clock placed on the epoch window counts the checkpoint's steps per epoch; resumed with another number
        (other devices, batch size or accumulation), its position is carried over in epochs (a trial: DDP's checkpoint
        resumed on one device ran no event in an epoch, ended at 0.7703 of 0.8 and blamed an early stop)."""
        saved, self._saved_steps_per_epoch = self._saved_steps_per_epoch, None
        # `start_epoch`/`end_epoch` place the window in steps, also with `every_n_steps` (a trial: resumed with fewer
        # steps per epoch, an `every_n_steps` schedule ran no more events)
        self.steps_per_epoch = steps_per_epoch(trainer) if self.in_steps else None
        offset, self._saved_offset = self._saved_offset, 0
        now = self.steps_per_epoch
        # a state saved by a resumed run counts its steps with that run's offset (trial CB: a second resume was
        # refused as ahead of the fit, or its clock jumped); one that did not count in steps has none
        self.offset = offset if saved and now else 0
        if not (saved and now and int(saved) != now):
            return
        steps = round(core.steps * now / int(saved))
        self.offset = steps - trainer.global_step
        core.set_clock(steps)
        rank_zero_info(
            f"IterativePruning: the checkpoint was saved with {saved} optimizer steps per epoch, this fit makes {now} "
            f"(other devices, batch size or accumulation): the pruning schedule goes on from epoch "
            f"{steps / now:.2f}, step {steps} of {core.schedule.end}."
        )

    def shift_judged_epochs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, core: IterativePruner) -> None:
        """At the first epoch start of a fit whose guard judges events between epochs: an epoch Lightning ran without
        a batch before it (the resume of a fit `max_steps` stopped at an epoch's end) moves every validation the plan
        placed by batch an epoch later, and so the last judged event (trial BW: every event waited past it, the fit
        ended dense). A checkpoint saved inside an epoch's last batch resumes into that epoch's empty rest: no shift
        (trial CB)."""
        per_epoch = steps_per_epoch(trainer)
        if core.judged_until is None or not per_epoch:
            return
        if pl_module.automatic_optimization:  # global_step counts this fit's batches in steps
            shift = trainer.current_epoch - trainer.global_step // per_epoch
            if shift > 0:
                core.judged_until += shift

    def now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> int:
        """The step clock after batch ``batch_idx``."""
        if not pl_module.automatic_optimization:  # global_step counts every optimizer's steps: count batches
            return trainer.current_epoch * int(trainer.num_training_batches) + batch_idx + 1
        return trainer.global_step + self.offset

    def follow_length(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, core: IterativePruner, window: EpochWindow,
        guarded: bool,
    ) -> None:  # fmt: skip
        """Once every callback's epoch start ran: a step clock placed on an epoch's length follows a new one (a loader
        reloaded with another length, ``GradientAccumulationScheduler``'s factor), so events keep to ``start_epoch``
        ..``end_epoch`` (a trial: accumulation 1 then 4 ended at 0.787 of 0.8, blamed on an early stop; 4 then 1
        reached it two epochs late, silently). A guarded clock, whose events wait for validations planned on the
        first length, cannot be moved: that is said, once."""
        before, now = self.steps_per_epoch, steps_per_epoch(trainer)
        end_epoch = window.end_for(trainer)
        if not self.in_steps or before is None or now is None or now == before or trainer.current_epoch >= end_epoch:
            return
        if guarded or not pl_module.automatic_optimization:
            if not self._said_length:
                self._said_length = True
                rank_zero_warn(
                    f"IterativePruning: epoch {trainer.current_epoch} makes {now} optimizer steps, not {before} as "
                    "when the schedule was placed in optimizer steps (the train loader's length or the gradient "
                    "accumulation changed): its events no longer fall on `start_epoch`..`end_epoch`. Prune per epoch "
                    "(`every_n_epochs=1`) when the epoch's length changes."
                )
            return
        steps = round(core.steps * now / before)
        core.set_clock(steps)
        core.set_schedule(
            total_steps=window.end_step(trainer, now, steps - trainer.global_step), start_step=window.start_epoch * now,
            every_n_steps=window.every_n_steps,
            rewind_step=None if window.rewind_epoch is None else window.rewind_epoch * now, wait_for_baseline=True,
        )  # fmt: skip
        self.offset, self.steps_per_epoch = steps - trainer.global_step, now
        rank_zero_info(
            f"IterativePruning: epoch {trainer.current_epoch} makes {now} optimizer steps, not {before} (the train "
            f"loader's length or the gradient accumulation changed): the rest of the schedule is placed on {now} "
            f"steps per epoch, step {steps} of {core.schedule.end}."
        )
