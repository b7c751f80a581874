"""The accuracy guard's side of ``IterativePruning`` that talks to the Trainer: the monitored value, the validation
metrics a rollback hands to checkpoint callbacks, and what the fit's end says."""

from __future__ import annotations

import functools
import importlib
import math
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..core.checks import check_float, is_integer, is_real
from ..core.controller import GuardDecision, is_rate, monitor_mode, names_elbo, names_no_direction, reads_higher
from ..core.iterative import IterativePruner, Rollback

__all__ = [
    "LoggedNames",
    "ValidationMetrics",
    "below_baseline_note",
    "check_monitor_name",
    "check_validation_state",
    "guard_arguments",
    "read_monitor",
    "rejected_but_kept_note",
    "revived_weights_note",
    "says_no_direction",
    "short_of_target_note",
    "stale_note",
    "unjudged_event_note",
    "unscored_model_note",
]


def warn_no_direction(who: str, reader: str, monitor: str, stacklevel: int = 4) -> None:
    """Say that ``monitor`` names no direction, so ``reader`` reads it as higher-is-better (a trial's `val_total`, a
    sum of losses: every event rolled back, 0% sparse; trial FX: scvi-tools' `elbo_validation`, a loss)."""
    warnings.warn(
        f"{who}: `monitor`={monitor!r} names neither a loss nor an accuracy, so {reader} reads a higher value as "
        "better (mode='max')"
        + (
            ": an ELBO is logged as the bound (higher is better) and as its negative, the loss (scvi-tools' "
            "`elbo_validation`, lower is better)"
            if names_elbo(monitor)
            else ""
        )
        + ". Pass `mode` ('min' for a loss) to say which.",
        UserWarning,
        stacklevel=stacklevel,
    )


def says_no_direction(monitor: str) -> bool:
    """Whether ``monitor`` names no direction (:func:`names_no_direction`) and is no torchmetrics class name either
    (``val_BinaryFBetaScore``, ``val/PearsonCorrCoef``: a ``MetricCollection``'s keys, read as higher-is-better)."""
    return names_no_direction(monitor) and not any(
        part in _metric_class_names() for part in re.split(r"[^A-Za-z0-9]+", monitor)
    )


@functools.cache
def _metric_class_names() -> frozenset[str]:
    """The names of torchmetrics' ``Metric`` classes, from its modules that import here."""
    import torchmetrics

    names: set[str] = set()
    for module in ("", ".classification", ".regression", ".image", ".text", ".retrieval", ".segmentation", ".audio",
                   ".detection", ".clustering", ".nominal", ".aggregation", ".multimodal", ".shape"):  # fmt: skip
        try:
            found = importlib.import_module("torchmetrics" + module)
        except Exception:  # a domain whose extra packages are missing
            continue
        names.update(k for k, v in vars(found).items() if isinstance(v, type) and issubclass(v, torchmetrics.Metric))
    return frozenset(names)


def check_monitor_name(monitor: Any) -> None:
    """``monitor`` is a metric's name or ``None``: refused otherwise, before training."""
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"`monitor` must be a metric name (str) or None, got {monitor!r}.")
    if monitor is not None and not monitor.strip():
        raise ValueError(f"`monitor`={monitor!r} names no metric: pass the name a validation logs, or None.")


def guard_arguments(monitor: Any, max_drop: Any, mode: Any) -> tuple[str | None, float, str]:
    """``IterativePruning``'s guard arguments checked: ``(monitor, max_drop, mode)``, ``max_drop`` at its default
    0.01 when ``None`` and ``mode`` inferred from the name when ``None``; said when one has no effect or the
    inferred reading may be wrong."""
    check_monitor_name(monitor)
    if max_drop is not None and monitor is None:
        warnings.warn(
            f"IterativePruning: `max_drop`={max_drop} has no effect without `monitor` (the accuracy guard is off); "
            "name the logged metric to guard, e.g. monitor='val_acc'.",
            UserWarning,
            stacklevel=3,
        )
    max_drop_value = check_float(0.01 if max_drop is None else max_drop, "max_drop", finite=True)
    if mode is not None and monitor is None:
        warnings.warn(
            f"IterativePruning: `mode`={mode!r} has no effect without `monitor` (the accuracy guard is off).",
            UserWarning,
            stacklevel=3,
        )
    inferred = mode is None
    mode = monitor_mode(monitor, mode)
    if monitor is not None and inferred and says_no_direction(monitor):
        warn_no_direction("IterativePruning", "the guard", monitor)
    elif monitor is not None and inferred:
        rank_zero_info(f"IterativePruning: the guard reads `monitor`={monitor!r} with mode={mode!r}.")
    if (
        monitor is not None
        and mode == "min"
        and max_drop is None
        and not is_rate(monitor)
        and not reads_higher(monitor)
    ):
        warnings.warn(
            f"IterativePruning: the guard lets `monitor`={monitor!r} rise by at most `max_drop`=0.01, the default "
            "chosen for accuracies in [0, 1]; a loss is in units of its own, and one that drifts up by more (a "
            "model that overfits) rolls every event back. Set `max_drop` to the rise you accept.",
            UserWarning,
            stacklevel=3,
        )
    return monitor, max_drop_value, mode


def read_monitor(trainer: pl.Trainer, monitor: str, said: set[str] | None = None) -> float:
    """The monitored value of the validation that just ran, the same on every process: their mean (a value logged
    without ``sync_dist=True`` is each process's own: trial BE's guard rolled back on one process of two, the models
    parted and the fit hung). Differing values are said once per name in ``said`` (``None``: not said). A name a
    validation did not log, on any process, is refused on every process with the names it did log."""
    value = trainer.callback_metrics.get(monitor)
    seen = torch.tensor([0.0 if value is None else 1.0, 0.0 if value is None else float(value)], dtype=torch.float64)
    if trainer.world_size > 1:  # one gather: every process takes the same way (a refusal on one alone would leave
        seen = trainer.strategy.all_gather(seen.to(trainer.strategy.root_device)).reshape(-1, 2).cpu()  # the rest)
    seen = seen.reshape(-1, 2)
    if not bool(seen[:, 0].all()):
        available = sorted(trainer.callback_metrics)
        raise ValueError(
            f"`monitor`={monitor!r} was not logged during validation"
            + (" on every process (`rank_zero_only=True` logs it on one)" if value is not None else "")
            + f"; logged metrics: {available}. Log it with `self.log(...)` in `validation_step` (with "
            "`on_epoch=True`, the default there: a value logged only `on_step` reaches no callback) or change "
            "`monitor`."
        )
    values = seen[:, 1]
    if len(values) > 1 and bool(values.min() != values.max()) and said is not None and monitor not in said:
        said.add(monitor)  # Python's own once-only record is cleared by any `catch_warnings` (trial BF)
        rank_zero_warn(
            f"IterativePruning: `monitor`={monitor!r} differs between processes (logged without `sync_dist=True`): "
            "the guard judges their mean, the same on every process. Log it with `sync_dist=True` to judge the "
            "value of the whole validation set."
        )
    return float(values.mean()) if len(values) > 1 else float(values[0])


def named_after_the_stage(trainer: pl.Trainer, monitor: str) -> bool:
    """Whether the sanity check logged its metrics under its own stage's name (``sanity_check_loss``, as
    pytorch-forecasting names them) and not ``monitor``, which the validations then log (trial FF: ``val_loss`` was
    refused at the sanity check as "not logged", and every fit of its models ended there)."""
    names = trainer.callback_metrics
    return monitor not in names and any(name.startswith("sanity_check") for name in names)


class LoggedNames:
    """Which names a validation logged itself. Lightning computes a new tensor per validation for each name it logs;
    a name it did not log keeps the earlier validation's tensor object in ``trainer.callback_metrics`` (a trial: a
    metric logged every other epoch judged a 99% sparse model, at 0.087, by the value of the dense one, 0.93)."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}

    def start(self, trainer: pl.Trainer) -> None:
        self._objects = dict(trainer.callback_metrics)

    def logged(self, trainer: pl.Trainer, name: str) -> bool:
        value = trainer.callback_metrics.get(name)
        return value is not None and value is not self._objects.get(name)


def stale_note(who: str, trainer: pl.Trainer, monitor: str, consequence: str) -> str:
    return (
        f"{who}: the validation at epoch {trainer.current_epoch}, step {trainer.global_step} did not log "
        f"`monitor`={monitor!r}; the Trainer's value is an earlier validation's, so {consequence}."
    )


def check_validation_state(state: Any) -> None:
    """Refuse a checkpoint's record of the judged validation that :meth:`ValidationMetrics.state_dict` could not
    have written (a trial: a string raised "string indices must be integers")."""
    if state is None:
        return
    metrics = state.get("metrics") if isinstance(state, dict) else None
    if not (
        isinstance(state, dict)
        and is_integer(state.get("global_step"))
        and isinstance(metrics, dict)
        and all(isinstance(k, str) and is_real(v) for k, v in metrics.items())
    ):
        raise ValueError(
            f"The checkpoint's IterativePruning state has validation={str(state)[:120]}: not the record of a "
            "validation (its step and its metrics); the checkpoint is damaged."
        )


class ValidationMetrics:
    """The metrics of the validation whose model the guard's copy holds.

    After a rollback the model is that one again; ``ModelCheckpoint`` and ``EarlyStopping`` read the Trainer's
    metrics after the pruning callback, so they are given that validation's values, not the rejected model's (the
    logger keeps what each validation measured). A validation's metrics are the names any validation logged.

    While the validation's results are live (its end hooks), every read of ``trainer.callback_metrics`` merges them
    in again: a callback after this one that reads the metrics there gets the rejected model's values back. They are
    written again at the next training hook (:meth:`reapply`), before ``ModelCheckpoint`` saves at the epoch's end.
    """

    def __init__(self) -> None:
        self.logged = LoggedNames()
        self._before: dict[str, Tensor] = {}
        self._judged: dict[str, Tensor] = {}
        self._judged_step: int | None = None  # the last optimizer step at which the model was the judged one
        self._names: set[str] = set()  # every metric a validation of this fit logged or changed
        self._restored: dict[str, Tensor] = {}  # written by the last rollback, until the next validation

    def start(self, trainer: pl.Trainer) -> None:
        self.logged.start(trainer)
        self._before = {k: v.detach().cpu() for k, v in trainer.callback_metrics.items()}
        self._restored = {}

    def measured(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """This validation's metrics: what it logged or changed, and the names earlier validations logged (a value
        equal to the one before is this validation's too)."""
        metrics, before = trainer.callback_metrics, self._before
        # compared on the CPU: a value restored from a checkpoint may be there while the validation logs on the GPU
        self._names.update(k for k, v in metrics.items() if k not in before or not torch.equal(v.cpu(), before[k]))
        return {k: metrics[k].clone() for k in self._names if k in metrics}

    def keep(self, measured: dict[str, Tensor], step: int) -> None:
        """The guard copied the model ``measured`` scored, at optimizer step ``step``."""
        self._judged, self._judged_step = measured, step

    def state_dict(self) -> dict[str, Any] | None:
        """The judged validation's metrics (numbers) and the last step at which the model was the one it scored (that
        validation's, or a rollback's since), for a checkpoint."""
        if self._judged_step is None:
            return None
        return {"global_step": self._judged_step, "metrics": {k: float(v) for k, v in self._judged.items()}}

    def resume(self, trainer: pl.Trainer, state: dict[str, Any] | None, core: IterativePruner) -> bool:
        """On a fit resumed from a checkpoint saved while the model was the one the validation ``state`` describes
        scored (right after it, or after a rollback to it; no optimizer step since): the guard copies the model it
        holds with that validation's value, and a rollback restores that validation's metrics, as in the
        uninterrupted run; so it does from a checkpoint saved while an event awaited judgement, which holds that copy.
        Returns whether it did."""
        if state is None:
            return False
        adopted = int(state["global_step"]) == trainer.global_step and core.adopt_saved_judgement()
        if not adopted and not core.resumed_copy:  # a checkpoint saved while an event awaited judgement holds the copy
            return False
        self._judged = {k: torch.tensor(float(v)) for k, v in state["metrics"].items()}
        self._judged_step = int(state["global_step"])
        self._names.update(self._judged)
        return True

    def restore(self, trainer: pl.Trainer, measured: dict[str, Tensor], monitor: str, value: float | None) -> None:
        """After a rollback to the copied model: its validation's metrics, ``value`` for ``monitor``. ``None``: the
        model is no validation's (a partial rollback, or one across the switch to fake quantization), said."""
        if value is None:
            rank_zero_warn(
                "IterativePruning: the rollback left a model no validation scored (this run holds no copy of the "
                "model the last validation scored, as when resumed from a checkpoint saved after it; or quantization "
                "switched on since): this validation's metrics are the rejected model's, and checkpoint callbacks "
                "read them after it."
            )
            return
        self._judged_step = trainer.global_step  # the model is the judged one again
        # on the devices this validation logged them on (the judged values of a checkpoint are on the CPU; trial
        # GPU: the next validation compared a CUDA metric with a CPU one and the fit stopped)
        restored = {key: self._judged[key].to(value.device) for key, value in measured.items() if key in self._judged}
        logged = measured.get(monitor, trainer.callback_metrics[monitor])
        restored[monitor] = torch.as_tensor(value, dtype=logged.dtype, device=logged.device)
        self._restored = restored
        self.reapply(trainer)

    def reapply(self, trainer: pl.Trainer) -> None:
        """Write the restored metrics again (see the class doc); nothing after a validation without a rollback."""
        metrics = trainer.callback_metrics
        for key, value in self._restored.items():
            metrics[key] = value


def short_of_target_note(core: IterativePruner, monitor: str | None, max_drop: float, unit: str = "step") -> str | None:
    """Why a fit ended short of the target (early stopping, ``max_time``, the guard); ``None`` if it did not.
    ``unit``: what the pruning clock counts (``"step"``: optimizer steps, or ``"epoch"``)."""
    if core.reached_target():
        return None
    guard = core.guard
    if guard is not None and guard.stopped:
        why = f"the accuracy guard stopped pruning: no step kept `{monitor}` within `max_drop`={max_drop}"
    elif core.steps < core.schedule.end and not (
        guard is not None and core.judged_until is not None and core.steps >= core.judged_until
    ):  # (an `end_epoch` past the last judged time: the clock stops there, no early stop; trial CB)
        why = (
            f"the fit stopped at {unit} {core.steps} of the pruning window's {core.schedule.end} (early stopping, "
            "`max_time`, `max_steps` or a shorter epoch)"
        )
    elif core.fell_short and (held := core.held_at_floor):
        # the last event pruned less than it asked for: floors held it. (A layer at its floor need not be what stopped
        # pruning: trial BW's last event waited for quantization, and the note blamed `min_density`.) Read once: for
        # sharded channel groups it is a collective
        named = f"{held[:3]}{' ...' if len(held) > 3 else ''}"
        why = (
            f"the channel groups {named} are at their floors (`min_density`={core.config.min_density}, at least "
            "one channel, "
            + (f"one multiple of `round_to`={core.config.round_to}, " if core.config.round_to else "")
            + "and whole quantization groups where a layer reads the channels in groups)"
            + (
                ", and the rest of the MACs are in layers left whole (see the channel groups' log)"
                if core.config.measure == "macs"
                else ""
            )
            if core.config.granularity == "channel"
            else f"the `min_density`={core.config.min_density} floor (and at least one unit per layer) holds {named} "
            "at their fewest units; lower `min_density` (if above one unit) or `exclude` them to go further"
        )
    elif guard is not None:
        why = (
            "after the window, each event waits for a validation to judge the one before it, and the fit ended "
            "before enough of them ran"
            + (f" ({guard.rollbacks} rollback(s) halved the steps)" if guard.rollbacks else "")
            + (  # a trial: the note named the cadence when QAT's switch held the last event
                f"; {core.waited_for_quantization} event time(s) waited because quantization switched on since the "
                "validation before (events wait for a validation of the model quantized): start QAT after "
                "`end_epoch`, or end pruning earlier"
                if core.waited_for_quantization
                else ""
            )
        )
    else:
        why = "the last events could not run"
    return (
        f"IterativePruning: fit ended at sparsity {core.masked_sparsity():.4f}, short of `target_sparsity`="
        f"{core.target_sparsity}: {why}."
    )


def unjudged_event_note(rolled: Rollback) -> str:
    """What the end of fit did with the event no validation judged."""
    change = f"sparsity {rolled.before:.4f} -> {rolled.after:.4f}"
    if rolled.whole_model:  # fit stopped where the validation schedule did not show it would
        return (
            f"IterativePruning: fit ended before a validation judged the last pruning event; the model went back "
            f"to the one the last validation judged ({change}; the training since that validation is undone). A "
            "checkpoint saved after that event and before the end of fit still holds it."
        )
    return (
        "IterativePruning: fit ended before a validation judged the last pruning event (sparsity "
        f"{rolled.before:.4f}), and it is kept: this run, resumed from a checkpoint saved while the event awaited "
        "judgement (Lightning resumes without the validation of the batch a checkpoint was saved after), holds no "
        "copy of the model from before it (FSDP2's shards, or a checkpoint an earlier version wrote, keep none), "
        "and putting back only the weights it pruned would leave a model trained without them. No "
        "validation has scored the model `fit` returns: `trainer.validate(model)` scores it."
    )


def unscored_model_note(global_step: int, validated_at: int | None, unscored_rollback: bool) -> str | None:
    """What the fit's end says when no validation scored the model ``fit`` returns (and no rollback at the end
    gave back one that was): training went on after the last validation the guard read (at ``validated_at``), or
    that validation's rollback returned to a model no validation scored."""
    if validated_at is not None and global_step > validated_at:
        return (
            f"IterativePruning: training ran {global_step - validated_at} optimizer step(s) after the fit's last "
            f"validation (step {validated_at}); no pruning event ran in them, but no validation has scored the model "
            "`fit` returns (a fit that ends between validations: `max_steps`, `check_val_every_n_epoch`, a stop). "
            "`trainer.validate(model)` scores it."
        )
    if validated_at == global_step and unscored_rollback:
        return (
            "IterativePruning: the fit's last validation rolled back a pruning event, and the model it went back "
            "to is not one a validation scored (quantization switched on, or the fit resumed, after the copy "
            "was taken): no validation has scored the model `fit` returns. `trainer.validate(model)` scores it."
        )
    return None


def below_baseline_note(core: IterativePruner, monitor: str, scored: float | None) -> str | None:
    """What the fit's end says when the last validation scored the model ``fit`` returns (``scored``) more than
    ``max_drop`` below the guard's baseline: the guard judges pruning events, and training since them lowered it (a
    trial: a learning rate raised after the schedule ended, 0.955 -> 0.108, and nothing was said)."""
    guard = core.guard
    if guard is None or guard.baseline is None or scored is None or not math.isfinite(scored):
        return None
    if guard.within_max_drop(scored):
        return None
    drop = guard.drop(scored)
    return (
        f"IterativePruning: the fit's last validation scored the model `fit` returns {monitor}={scored:.4f}, "
        f"{drop:.4f} from the guard's baseline {guard.baseline:.4f}: more than `max_drop`={guard.max_drop}. The guard "
        "judges pruning events (each was kept within it, or rolled back); what came after them lowered the score "
        "(training, or quantization switching on). Keep the best checkpoint (`ModelCheckpoint(monitor=...)`), or look "
        "at the training (learning rate, overfitting) and the quantization settings."
    )


def rejected_but_kept_note(decision: GuardDecision, monitor: str, max_drop: float) -> str:
    """What the fit's last validation says when it rejects the last event (``decision.action == "keep"``) but a run
    resumed while the event awaited judgement holds no copy of the model before it."""
    return (
        f"IterativePruning: the fit's last validation rejects the last pruning event ({monitor}={decision.value:.4f}, "
        f"drop {decision.drop:.4f} > `max_drop`={max_drop}), but this run, resumed from a checkpoint saved while the "
        "event awaited judgement, holds no copy of the model before it (FSDP2's shards, or a checkpoint an earlier "
        "version wrote, keep none): putting back only the weights it pruned would leave a model trained without them "
        "that no validation scores, so the model this validation scored stays. Resume from a checkpoint saved at a "
        "validation's end to keep the guard's promise."
    )


def revived_weights_note(revived: list[str]) -> str:
    """What a validation says, once, when it finds pruned weights nonzero (``revived``: their names): trial EG, an
    optimizer from ``self.optimizers(use_pl_optimizer=False)`` revived them between events, unseen; the guard accepted
    a 0.8-sparse model at val_acc 0.8954 that scored 0.7404 with its masks applied at the end."""
    return (
        f"IterativePruning: pruned weights of {revived[:3]}{' ...' if len(revived) > 3 else ''} were nonzero at this "
        "validation: an optimizer step the callback did not see wrote them (an optimizer from "
        "`self.optimizers(use_pl_optimizer=False)`, whose steps bypass Lightning's hooks, or weights written by hand). "
        "They are zeroed again before the validation scores the model, but between validations they train: step the "
        "optimizers `self.optimizers()` returns so the masks hold."
    )
