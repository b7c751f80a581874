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
from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..core.checks import check_int
from ..core.iterative import IterativePruner
from ._validation import fast_dev_run_note, trained_max_epochs

__all__ = [
    "EpochWindow",
    "Timeline",
    "accumulation",
    "clock_max_steps",
    "last_validation_batch",
    "plan_timeline",
    "steps_done_after",
    "steps_per_epoch",
    "validation_ahead",
    "validation_batches",
    "validation_skipped_on_resume",
    "warn_if_max_steps_counts_several_optimizers",
]


# trial DP: a fit stopped with a smaller `max_steps`/`max_epochs`, to be resumed with the full one, was refused with
# advice that changed the schedule
_IN_PARTS = (
    " (to train in parts, keep the full `max_epochs`/`max_steps`, stop early, e.g. at a checkpoint or by setting "
    "`trainer.should_stop`, and resume with `fit(ckpt_path=...)`: the schedule goes on exactly)"
)


def _per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if isinstance(batches, float) and not math.isfinite(batches):
        return None
    return int(batches)


def accumulation(trainer: pl.Trainer) -> int:
    """Batches per optimizer step in the current epoch: the Trainer's, or a ``GradientAccumulationScheduler``'s
    factor for this epoch, which it sets only when the epoch starts (trial FR: read as 1 at the start of training,
    a fit of 6 steps an epoch was refused as needing 22 before quantization switched on)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, GradientAccumulationScheduler):
            return max(1, int(callback.get_accumulate_grad_batches(trainer.current_epoch)))
    return max(1, int(trainer.accumulate_grad_batches))


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one epoch of the train loader (``None``: a loader without a length)."""
    batches = _per_epoch(trainer)
    return None if batches is None else max(1, math.ceil(batches / accumulation(trainer)))


def optimizer_count(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """How many optimizer steps ``global_step`` counts a batch: the optimizers' number under manual optimization with
    several (if each steps at every batch), else 1."""
    count = len(getattr(trainer, "optimizers", []) or [])
    return count if not pl_module.automatic_optimization and count > 1 else 1


def clock_max_steps(trainer: pl.Trainer) -> int | None:
    """``max_steps`` on the callbacks' clock (``None``: unbounded): under manual optimization with several optimizers
    ``global_step`` counts every optimizer's steps and the clock counts batches, so the fit ends after ``max_steps //
    optimizers`` of them, if each steps at every batch (trial FR: a GAN's schedule was placed on twice the batches
    the fit ran, and ended at 0.70 of 0.80)."""
    steps = trainer.max_steps
    if steps is None or steps < 0:
        return None
    module = getattr(trainer, "lightning_module", None)
    return steps if module is None else steps // optimizer_count(trainer, module)


def warn_if_max_steps_counts_several_optimizers(
    trainer: pl.Trainer, pl_module: pl.LightningModule, who: str, epochs_needed: int | None, argument: str
) -> None:
    """Under manual optimization ``global_step`` (and so ``max_steps``) counts every optimizer's steps, while the
    callbacks place their epochs on batches, as if each made one step: with several optimizers the fit may end
    before the epochs it was checked against (a trial: pruning ended at 0.815 of 0.9, QAT never switched on). Said
    unless the batches the fit runs hold the ``epochs_needed`` the callback's schedule needs (trial CT: it advised
    lowering `end_epoch` when the schedule fitted); ``argument`` is the callback's own epoch argument to lower."""
    count = len(trainer.optimizers)
    if pl_module.automatic_optimization or count < 2 or trainer.max_steps is None or trainer.max_steps < 0:
        return
    batches = _per_epoch(trainer)
    if epochs_needed is not None and batches is not None and trainer.max_steps // count >= epochs_needed * batches:
        return
    needs = "" if epochs_needed is None or batches is None else f", before the {epochs_needed * batches} it needs"
    rank_zero_warn(
        f"{who}: under manual optimization the Trainer's `max_steps`={trainer.max_steps} counts the steps of all "
        f"{count} optimizers (if each steps at every batch, the fit ends after {trainer.max_steps // count} "
        f"batches{needs}), "
        "but the epochs it was checked against count batches: "
        + (f"lower `{argument}`, or " if epochs_needed is not None and epochs_needed > 1 else "")
        + "use `max_epochs` (an optimizer that steps less often leaves more batches: then the schedule may fit)."
    )


def _batches_for_steps(steps: int, batches: int, accumulate: int) -> int:
    """How many batches the fit runs to make ``steps`` optimizer steps (the last batch of an epoch always steps)."""
    per_epoch = max(1, math.ceil(batches / accumulate))
    epochs, rest = divmod(steps, per_epoch)
    return epochs * batches + min(batches, rest * accumulate)


def last_validation_batch(trainer: pl.Trainer) -> int | None:
    """Index of the last batch of the fit after which validation runs; ``-1``: none; ``None``: cannot be known."""
    found = validation_batches(trainer, 1)
    return None if found is None else (found[0] if found else -1)


def validation_enabled(trainer: pl.Trainer) -> bool:
    """Whether the fit validates at all: the Trainer's ``enable_validation``, and, once its validation loaders are
    loaded, a batch in one of them (trial FU: darts passes ``val_dataloaders=[]`` when given no validation series, and
    a guarded fit trained to its end dense, told at the end that "the fit ended before enough" validations ran)."""
    if not trainer.enable_validation:
        return False
    return trainer.val_dataloaders is None or any(trainer.num_val_batches)


def validation_batches(trainer: pl.Trainer, count: int) -> list[int] | None:
    """The last ``count`` batches of the fit after which validation runs, latest first (fewer if the fit validates
    less often); ``None``: cannot be known."""
    batches = _per_epoch(trainer)
    every = trainer.val_check_batch
    max_epochs = trainer.max_epochs
    if batches is None or batches <= 0 or every is None:
        return None
    steps = clock_max_steps(trainer)  # several optimizers under manual optimization: batches, each stepping once
    if max_epochs is None or max_epochs < 0:  # unlimited epochs: `max_steps` ends the fit, or nothing known does
        if steps is None:
            return None
        max_epochs = math.ceil(_batches_for_steps(steps, batches, accumulation(trainer)) / batches)
    if not validation_enabled(trainer):
        return []
    horizon = max_epochs * batches
    if steps is not None:
        horizon = min(horizon, _batches_for_steps(steps, batches, accumulation(trainer)))
    every_n_epochs = trainer.check_val_every_n_epoch
    found: list[int] = []
    for epoch in range(max_epochs - 1, -1, -1):
        if every_n_epochs is not None and (epoch + 1) % every_n_epochs:
            continue
        first = epoch * batches
        reached = min(batches, horizon - first)  # batches of this epoch the fit runs
        if reached <= 0:
            continue
        if math.isinf(every):
            if reached == batches:
                found.append(first + batches - 1)
        else:
            offset = first if every_n_epochs is None else 0  # the Trainer counts over the fit, or within the epoch
            last = (offset + reached) // int(every) * int(every) - 1 - offset
            while last >= 0 and len(found) < count:  # this epoch's validations, latest first
                found.append(first + last)
                last -= int(every)
        if len(found) >= count:
            return found[:count]
    return found


def validates_in_epoch(trainer: pl.Trainer, epoch: int) -> bool | None:
    """Whether the fit validates during epoch ``epoch`` (0-indexed); ``None``: cannot be known (a loader without a
    length). With ``check_val_every_n_epoch=None`` an integer ``val_check_interval`` counts batches over the whole
    fit, so an interval longer than an epoch skips some epochs (trial EL: `shift_search` trained through
    `start_epoch`, which had none, and then failed)."""
    batches = _per_epoch(trainer)
    every = trainer.val_check_batch
    if batches is None or batches <= 0 or every is None:
        return None
    if not validation_enabled(trainer):
        return False
    every_n_epochs = trainer.check_val_every_n_epoch
    if every_n_epochs is not None:
        return (epoch + 1) % every_n_epochs == 0
    if math.isinf(every):
        return True
    return (epoch + 1) * batches // int(every) > epoch * batches // int(every)


def validation_skipped_on_resume(trainer: pl.Trainer) -> bool:
    """Whether this fit resumed from a checkpoint saved after a batch the Trainer validates after: Lightning goes on
    at the next batch without that validation (trial CD: the event it was to judge waited for the next one, and
    every later event one validation later: 0.78 where the uninterrupted fit reached 0.89)."""
    batches, every = _per_epoch(trainer), trainer.val_check_batch
    if not batches or every is None or not validation_enabled(trainer):
        return False
    batch = _first_batch(trainer, batches) - 1
    if batch < 0:
        return False
    epoch, index = divmod(batch, batches)
    every_n_epochs = trainer.check_val_every_n_epoch
    if every_n_epochs is not None and (epoch + 1) % every_n_epochs:
        return False
    if math.isinf(every):
        return index == batches - 1
    counted = batch if every_n_epochs is None else index  # the Trainer counts over the fit, or within the epoch
    return (counted + 1) % int(every) == 0


def validation_ahead(trainer: pl.Trainer) -> bool:
    """Whether a validation of this fit is still to come (a resumed fit's from where it goes on; ``True`` when it
    cannot be known: validation by time, data without a length)."""
    batches, last = _per_epoch(trainer), last_validation_batch(trainer)
    return last is None or not batches or last >= _first_batch(trainer, batches)


def _first_batch(trainer: pl.Trainer, batches: int) -> int:
    """The first batch (counted over the fit) this fit runs: 0, or where a resumed one goes on. Under manual
    optimization ``global_step`` counts every optimizer's steps: counted from 0."""
    if trainer.global_step <= 0 or not trainer.lightning_module.automatic_optimization:
        return 0
    return _batches_for_steps(trainer.global_step, batches, accumulation(trainer))


def steps_done_after(batch: int, trainer: pl.Trainer) -> int:
    """Optimizer steps made once batch ``batch`` (counted over the fit) has run."""
    batches = _per_epoch(trainer) or 1
    accumulate = accumulation(trainer)
    per_epoch = max(1, math.ceil(batches / accumulate))
    epoch, index = divmod(batch, batches)
    within = per_epoch if index == batches - 1 else (index + 1) // accumulate
    return epoch * per_epoch + within


@dataclass(frozen=True)
class EpochWindow:
    """When ``IterativePruning`` prunes, in the Trainer's epochs (validated on construction)."""

    start_epoch: int = 0
    end_epoch: int | None = None
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    rewind_epoch: int | None = None

    def __post_init__(self) -> None:
        check_int(self.start_epoch, "start_epoch")
        check_int(self.end_epoch, "end_epoch", optional=True)
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ValueError(
                f"`end_epoch`={self.end_epoch} must be greater than `start_epoch`={self.start_epoch}: pruning "
                "events run during epochs start_epoch .. end_epoch - 1."
            )
        if self.every_n_epochs is not None and self.every_n_steps is not None:
            raise ValueError(
                f"Set one of `every_n_epochs`={self.every_n_epochs} and `every_n_steps`={self.every_n_steps}, not both."
            )
        check_int(self.every_n_epochs, "every_n_epochs", minimum=1, optional=True)
        check_int(self.every_n_steps, "every_n_steps", minimum=1, optional=True)
        check_int(self.rewind_epoch, "rewind_epoch", optional=True)
        if self.rewind_epoch is not None and self.rewind_epoch > self.start_epoch:
            raise ValueError(
                f"`rewind_epoch`={self.rewind_epoch} must be <= `start_epoch`={self.start_epoch}: the weights "
                "to rewind to must be saved before the first pruning event."
            )

    def end_for(self, trainer: pl.Trainer, loaded: bool = True) -> int:
        """The epoch the schedule ends after in this fit: ``end_epoch``, or else the epoch in which the fit ends (the
        Trainer's ``max_epochs``, less an epoch of SWA's that does not train, or the epoch ``max_steps`` ends in, once
        the train loader's length is known). ``loaded=False``: before the Trainer loads the train loader (``setup``,
        ``on_fit_start``), where a fit bounded by ``max_steps`` alone gets a provisional end, placed at the start of
        training."""
        max_epochs = trained_max_epochs(trainer)
        unlimited = max_epochs is None or max_epochs < 0
        steps = clock_max_steps(trainer)  # (before the loader is loaded, only whether it is set is read)
        per_epoch = steps_per_epoch(trainer) if loaded else None
        bound = f"`max_epochs`={max_epochs}"  # what ends the schedule, for the message below
        if self.end_epoch is not None:
            end = self.end_epoch
        elif steps is not None and per_epoch is not None and (unlimited or steps < max_epochs * per_epoch):  # type: ignore[operator]
            end = max(1, math.ceil(steps / per_epoch))  # the epoch `max_steps` ends the fit in
            bound = f"`max_steps`={steps} ({per_epoch} optimizer steps per epoch)"
        elif not unlimited:
            end = int(max_epochs)  # type: ignore[arg-type]
        elif steps is not None and not loaded:
            return self.start_epoch + 1  # provisional: `max_steps` places the end once the loader's length is known
        else:
            raise ValueError(
                "`end_epoch` is required when the Trainer's `max_epochs` is unlimited"
                + (
                    f" and the train dataloader has no length: `max_steps`={steps} ends this fit, but in no epoch "
                    "known in advance. Pass the epoch by which pruning should reach the target (epochs of "
                    "`limit_train_batches=N` batches, if the loader never runs out), or set `max_epochs`."
                    if steps is not None
                    else " and no `max_steps` ends the fit: pass the epoch by which pruning should reach the target."
                )
            )
        if end <= self.start_epoch:
            raise ValueError(
                f"`start_epoch`={self.start_epoch} leaves no pruning event before {bound}." + fast_dev_run_note(trainer)
            )
        if not unlimited and end > max_epochs:  # type: ignore[operator]
            raise ValueError(
                f"The schedule cannot finish: `end_epoch`={end} is after the Trainer's "
                f"`max_epochs`={max_epochs}. Lower `end_epoch` or raise `max_epochs`{_IN_PARTS}."
                + fast_dev_run_note(trainer)
            )
        return end

    def end_step(self, trainer: pl.Trainer, per_epoch: int, offset: int = 0) -> int:
        """The optimizer step a schedule in steps ends at: ``end_for`` in steps, or ``max_steps`` where that ends the
        fit first and ``end_epoch`` is unset (the schedule ends with the fit). ``offset``: the step clock minus the
        Trainer's count, where a resume carried the clock over from another epoch length (trial FR: ``max_steps``
        was read on the Trainer's count, and a fit ended at 0.7963 of 0.80)."""
        end = self.end_for(trainer) * per_epoch  # (also checks the window)
        steps = clock_max_steps(trainer)
        if self.end_epoch is None and steps is not None:
            max_epochs = trained_max_epochs(trainer)  # `max_steps` on the clock; the epochs' end where it is sooner
            end = steps + offset
            if max_epochs is not None and max_epochs >= 0:
                end = min(end, int(max_epochs) * per_epoch)
        return end


@dataclass(frozen=True)
class Timeline:
    """The pruning clock of one fit: events between ``start`` and ``end``, in epochs or optimizer steps."""

    start: int
    end: int
    every: int | None  # None: the core's default cadence (about DEFAULT_EVENTS events)
    in_steps: bool
    judged_until: int | None  # with a monitor: the last time an event can still be judged
    rewind: int | None  # the time of the rewind point

    def place(self, core: IterativePruner) -> None:
        """Set ``core``'s schedule to this timeline (events skipped, not refused, before the guard's baseline)."""
        core.set_schedule(
            total_steps=self.end, start_step=self.start, every_n_steps=self.every, rewind_step=self.rewind,
            judged_until=self.judged_until, wait_for_baseline=True,
        )  # fmt: skip


def _validated_in_few_epochs(trainer: pl.Trainer) -> bool:
    """Whether the fit validates three times or more, but in fewer than three epochs (one long epoch that `max_steps`
    ends, validated every N batches): events between epochs could be judged once at most there."""
    batches = _per_epoch(trainer)
    count = 3
    while batches:
        found = validation_batches(trainer, count)
        if found is None or len({batch // batches for batch in found}) >= 3:
            return False
        if len(found) < count:  # every validation of the fit
            return len(found) >= 3
        count *= 4
    return False


def plan_timeline(
    trainer: pl.Trainer,
    window: EpochWindow,
    default_in_steps: bool,
    monitor: str | None,
    baseline_known: bool = False,
    guard_may_step: bool = False,
    offset: int = 0,
) -> Timeline:
    """Map the callback's epochs onto the clock it drives ``IterativePruner`` with.

    ``default_in_steps``: with neither ``every_n_*`` set, prune at the core's default cadence in
    optimizer steps (when the data is sized). With ``monitor``, no event may come after the fit's
    last validation (nothing would judge it): the default ``end_epoch`` ends the schedule there,
    an explicit later one is warned about (its last events are skipped). ``baseline_known``: the guard has its
    baseline already (a sanity check asked for every validation batch, a resumed checkpoint); otherwise the first
    validation gives it and judges nothing. ``guard_may_step``: with ``monitor`` and neither ``every_n_*`` set,
    events go between optimizer steps where the fit validates in fewer than three epochs (each event then waits for
    a validation to judge the one before, so they come one per validation).
    """
    start_epoch, end_epoch, every_n_steps = window.start_epoch, window.end_for(trainer), window.every_n_steps
    per_epoch = steps_per_epoch(trainer)
    explicit = window.end_epoch is not None  # unset: the schedule ends with the fit, at `max_steps` if that is first
    # several optimizers under manual optimization: `max_steps` counts them all, and how often each steps is not
    # known, so an explicit `end_epoch` is checked against it as batches (a warning says the rest)
    last_step = trainer.max_steps if trainer.max_steps >= 0 else None
    if explicit and per_epoch is not None and last_step is not None and end_epoch * per_epoch > last_step:
        fits = last_step // per_epoch  # trial FR: "at most 1" for `end_epoch`=1, or for a window from `start_epoch`=1
        raise ValueError(
            f"The schedule cannot finish: it ends after {end_epoch * per_epoch} optimizer steps (`end_epoch`="
            f"{end_epoch} x {per_epoch} steps per epoch) but the Trainer's `max_steps`={trainer.max_steps} ends the "
            "fit first. "
            + (f"Set `end_epoch` to at most {fits}, or leave" if fits > start_epoch else "Leave")
            + f" `end_epoch` unset: the schedule then ends where `max_steps` ends the fit{_IN_PARTS}."
        )
    in_steps = every_n_steps is not None or (
        default_in_steps and window.every_n_epochs is None and per_epoch is not None
    )
    if (  # trial FO: one long epoch that `max_steps` ends, validated every 10 steps, was refused as judging nothing
        not in_steps
        and guard_may_step
        and monitor is not None
        and window.every_n_epochs is None
        and per_epoch is not None
        and _validated_in_few_epochs(trainer)
    ):
        in_steps = True
        if trainer.global_step == 0:
            rank_zero_info(
                f"IterativePruning: `monitor`={monitor!r} and this fit's validations fall in fewer than three epochs: "
                "pruning events run between optimizer steps, each after a validation judged the one before (between "
                "epochs, at most one could be judged)."
            )
    every: int | None
    if not in_steps and per_epoch is None and trainer.max_steps >= 0 and trainer.global_step == 0:
        rank_zero_warn(  # trial EV: an endless stream's one epoch ended at `max_steps`, and 0 -> 0.90 ran after it
            "IterativePruning: the train dataloader has no length and `max_steps`="
            f"{trainer.max_steps} can end the fit: pruning events run between epochs, when the loader's iterator "
            "runs out. A stream that never runs out makes the whole fit one epoch, and every event would run at the "
            "end of training (no training after it, no validation to judge it). Give epochs a length with "
            "`limit_train_batches=N` (N batches per epoch: `start_epoch`/`end_epoch` count those, and events run "
            "between optimizer steps)."
        )
    if not in_steps:
        start, end, every = start_epoch, end_epoch, window.every_n_epochs or 1
    elif per_epoch is None:
        raise ValueError(
            "`every_n_steps` needs a train dataloader with a length, to place `start_epoch` and "
            "`end_epoch` in steps; use `every_n_epochs` for iterable datasets."
        )
    else:
        start, end = start_epoch * per_epoch, window.end_step(trainer, per_epoch, offset)
        every = every_n_steps  # None: the core's default cadence
    given = every_n_steps if in_steps else window.every_n_epochs
    if (
        monitor is None
        and given is not None
        and every is not None
        and every >= end - start
        and trainer.global_step == 0
    ):
        unit, argument = ("optimizer step", "every_n_steps") if in_steps else ("epoch", "every_n_epochs")
        unit += "" if end - start == 1 else "s"
        last = ", after the fit's last optimizer step (the model never trains with its masks)"
        rank_zero_warn(  # trial FO: `every_n_steps=100` in a 25-step fit pruned 0 -> 0.80 after its last step, unsaid
            f"IterativePruning: `{argument}`={given} is no shorter than the pruning window ({end - start} {unit}): its "
            "one event prunes to the target at once, at the window's end"
            + (last if _ends_fit(trainer, end, in_steps) else "")
            + f". Use a smaller `{argument}`, or neither (the default cadence)."
        )
    judged = None if monitor is None else _last_judged(trainer, in_steps, baseline_known)
    now = trainer.global_step if in_steps else trainer.current_epoch
    if judged is not None and baseline_known and _validations_left(trainer, in_steps) == 1:
        # the baseline is known and one validation is left: it judges the first event, so the schedule ends there
        # (a trial: events every step waited for judgement after the first, and the fit ended at 0.096 of 0.8)
        judged = min(judged, max(start, now) + 1)
    max_epochs = trained_max_epochs(trainer)
    if judged is None and monitor is not None and not in_steps and max_epochs is not None and max_epochs > 0:
        judged = max_epochs - 1  # unplanned validations (by time): events between epochs run at the next one's start
    if judged is not None and end > judged:
        unit = "step" if in_steps else "epoch"
        # resumed past the last time an event can be judged: it trains on without one (the schedule's end, or why it
        # fell short, is said at the end of fit; trial CD: it was refused as a fit no validation could judge)
        resumed_past = trainer.global_step > 0 and start <= now and judged <= now
        if judged <= start and not resumed_past and not validation_enabled(trainer):
            raise ValueError(  # trial FW: an empty list of loaders was told of events up to epoch 0 it could judge
                f"`monitor`={monitor!r}: this fit has no validation data (no validation batch: `limit_val_batches=0`, "
                "no `validation_step`, or empty validation loaders), so no pruning event could be judged. Give the "
                "fit validation data (`val_dataloaders`, or a datamodule's `val_dataloader`), or set `monitor=None`."
            )
        if judged <= start and not resumed_past:
            raise ValueError(
                f"`monitor`={monitor!r}: no validation runs after a pruning event of this fit (a validation could "
                f"judge events up to {unit} {judged}; the first event is at {unit} {start + 1}"
                + (
                    ""
                    if baseline_known
                    else "; the first validation gives the baseline, unless a sanity check of every validation batch "
                    "(`num_sanity_val_steps=-1`) gives it before training, for events in steps from `start_epoch=0`"
                )
                + "), so no event could be judged. Validate more often (and give the fit validation data), train "
                "longer, "
                + ("" if in_steps else "prune in steps (`every_n_steps`: events between epochs wait for one to end), ")
                + "or set `monitor=None`."
                + fast_dev_run_note(trainer, "set `monitor=None` there")
            )
        if window.end_epoch is not None and not resumed_past:  # said when the fit first planned
            rank_zero_warn(  # a trial: it said the last validation came before step 29, which ran at 35
                f"IterativePruning: with `monitor`={monitor!r} each pruning event waits for a validation to judge the "
                f"one before it, so the last event a validation of this fit can judge runs at {unit} {judged} (after "
                "its second-to-last validation): that event prunes to the target in one step, and the schedule's "
                "events after it are skipped. End the schedule earlier (`end_epoch`) or validate later."
                + _quantization_note(trainer, window.start_epoch)
            )
        elif window.end_epoch is None:
            end = max(judged, start + 1)
    return Timeline(start, end, every, in_steps, judged, _rewind(window, in_steps, per_epoch))


def _ends_fit(trainer: pl.Trainer, end: int, in_steps: bool) -> bool:
    """Whether clock time ``end`` is the end of the fit (its last optimizer step, or the epoch it ends in)."""
    per_epoch, max_epochs, steps = steps_per_epoch(trainer), trained_max_epochs(trainer), clock_max_steps(trainer)
    epochs = max_epochs if max_epochs is not None and max_epochs >= 0 else None
    if in_steps:
        last = steps
        if per_epoch is not None and epochs is not None:
            last = epochs * per_epoch if last is None else min(last, epochs * per_epoch)
        return last is not None and end >= last
    if steps is not None and per_epoch is not None:  # trial FR: `max_steps` ended the fit before `max_epochs`
        epochs = math.ceil(steps / per_epoch) if epochs is None else min(epochs, math.ceil(steps / per_epoch))
    return epochs is not None and end >= epochs


def _rewind(window: EpochWindow, in_steps: bool, per_epoch: int | None) -> int | None:
    rewind = window.rewind_epoch
    return rewind * (per_epoch or 1) if rewind is not None and in_steps else rewind


def _last_judged(trainer: pl.Trainer, in_steps: bool, baseline_known: bool) -> int | None:
    """The last clock time at which an event can still run and be judged by a validation of this fit (``None``:
    cannot be known).

    An event waits for the judgement of the one before it, so the last one runs after the fit's second-to-last
    validation (at the first time after it) and the last validation judges it; a later time would never come
    (with ``check_val_every_n_epoch=2`` the events at odd epochs wait, and the target was never reached). Without a
    baseline the first event waits for the first validation, so a fit that validates once judges nothing (a trial:
    it trained to the end and returned the model dense).
    """
    if not in_steps and _per_epoch(trainer) is None:
        return _last_judged_epoch_unsized(trainer, baseline_known)
    found = validation_batches(trainer, 2)
    if found is None:  # time-based validation: judged at the end of fit instead
        return None
    if not found:
        return 0
    per_epoch = int(trainer.num_training_batches)
    if not in_steps:  # the event at the start of epoch e (time e) needs a validation during or after epoch e
        epochs = sorted({batch // per_epoch for batch in validation_batches(trainer, 2 * per_epoch) or found})
        last = epochs[-1]
        if len(epochs) < 2:
            return last if baseline_known else 0
        return min(last, epochs[-2] + 1)
    last = steps_done_after(found[0], trainer)  # a validation after the batch that made the step, or at it
    if len(found) < 2:
        return last if baseline_known else 0
    return min(last, steps_done_after(found[1], trainer) + 1)


def _validations_left(trainer: pl.Trainer, in_steps: bool) -> int | None:
    """How many validations this fit runs, counted up to two (``None``: cannot be known)."""
    if not in_steps and _per_epoch(trainer) is None:
        return None
    found = validation_batches(trainer, 2)
    return None if found is None else len(found)


def _last_judged_epoch_unsized(trainer: pl.Trainer, baseline_known: bool) -> int | None:
    """Data without a length, validated in every ``check_val_every_n_epoch``-th epoch (at its end, or every N of its
    batches): the epochs are known when ``max_epochs`` ends the fit. With every N batches an epoch shorter than N
    has no validation; an event it leaves unjudged is rolled back at the end of fit."""
    max_epochs, every = trainer.max_epochs, trainer.check_val_every_n_epoch
    if max_epochs is None or max_epochs < 0 or trainer.max_steps >= 0 or every is None:
        return None
    if not validation_enabled(trainer):
        return 0
    if trainer.val_check_batch is None:  # time-based validation
        return None
    epochs = [e for e in range(max_epochs) if (e + 1) % every == 0]
    if not epochs or (len(epochs) < 2 and not baseline_known):
        return 0
    return epochs[-1] if len(epochs) < 2 else min(epochs[-1], epochs[-2] + 1)


def _quantization_note(trainer: pl.Trainer, start_epoch: int) -> str:
    """Beside a QAT callback that switches quantization on while pruning runs: an event waits for a validation of the
    model quantized, so the last judged event may not run (trial EG: this warning promised the target, and the fit
    ended at 0.563 of 0.8, which only the end of fit explained)."""
    from .qat import QuantizationAwareTraining

    later = [
        c.start_epoch
        for c in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(c, QuantizationAwareTraining) and c.start_epoch >= start_epoch
    ]
    if not later:
        return ""
    return (
        f" QuantizationAwareTraining (`start_epoch`={min(later)}) switches quantization on inside the pruning "
        "window: the event after it waits for a validation of the model quantized, so the fit may end short of the "
        "target; start QAT after `end_epoch` to prune to it first."
    )
