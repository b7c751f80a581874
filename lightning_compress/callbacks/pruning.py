"""``IterativePruning``: importance pruning between epochs (or steps) while a model fine-tunes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from ..core.controller import AccuracyGuard, GuardDecision
from ..core.functional import check_granularity, resolve_min_density, validate_fraction
from ..core.importance import Importance, resolve_importance
from ..core.masks import floor_count
from ..core.pruner import MaskRule, Pruner
from ..core.rules import rule_for
from ..core.schedule import SCHEDULES, PruningSchedule, step_interval
from ..core.selection import Target, normalize_patterns, select_targets
from ..export.report import CompressionReport
from ..metrics.sparsity import Sparsity
from ._export import check_export_path, check_export_ready, export_at_fit_end
from ._validation import check_choice, check_float, check_int, check_strategy
from ._validation_plan import last_validation_batch, steps_done_after

__all__ = ["IterativePruning"]

_STATE_VERSION = 1
# With neither `every_n_epochs` nor `every_n_steps` (element granularity, no `monitor`, a sized train
# dataloader): about this many events over the schedule, in optimizer steps. Chosen on a model zoo, see
# BENCHMARKS.md ("Defaults on a model zoo").
DEFAULT_EVENTS = 100


class IterativePruning(Callback):
    r"""Prune a model step by step while it trains, until ``target_sparsity`` of its weights are zero.

    Masks live in this callback's state (saved in checkpoints as bool tensors); the model's
    ``state_dict`` keys never change, pruned weights are exact zeros in the parameters, their
    gradients and optimizer state are zeroed so no optimizer regrows them. Pruning happens only
    while fitting: ``validate``/``test``/the sanity check never change the model.

    Args:
        target_sparsity: fraction in [0, 1) of the selected weights that are zero when the
            schedule ends (absolute, not compounding).
        importance: ``"magnitude"`` (``|w|``), ``"taylor"`` (``|w * dL/dw|`` summed over the
            steps since the last event), ``"random"``, ``"bn_scale"`` (``|gamma|`` of the
            BatchNorms, channel granularity only), or an object with a
            ``score(name, weight) -> Tensor`` method (see :mod:`lightning_compress.core.importance`).
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"`` (the same
            sparsity in every layer).
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"``, ``"geometric"`` (the same
            fraction of the remaining weights each event), ``"one_shot"``, or a callable
            ``epoch -> sparsity`` (``global_step -> sparsity`` with ``every_n_steps``).
        start_epoch: first epoch (0-indexed) at whose end pruning happens.
        end_epoch: the target is reached at the end of epoch ``end_epoch - 1``, i.e. after
            ``end_epoch`` epochs. ``None``: ``max_epochs``. Must be ``<= max_epochs``.
        every_n_epochs: epochs between pruning events.
        every_n_steps: prune every n optimizer steps instead (between steps), inside the same
            ``start_epoch``..``end_epoch`` window. Exclusive with ``every_n_epochs``. With neither
            (the default), element-granularity pruning without ``monitor`` makes about 100 events
            over the window, every ``window_steps // 100`` optimizer steps (chosen on a model zoo:
            it beat one event per epoch on every pair it was chosen on, and on 6 of 9 held-out cells);
            channel and N:M granularity, ``monitor`` (one event per validation), a callable
            ``schedule`` and a train dataloader without a length prune once per epoch.
        include: glob patterns over qualified module names; wildcards pick Linear/Conv layers, an
            exact name picks that module's weight whatever its type. ``None``: all Linear/Conv.
        exclude: glob patterns over module names to leave dense.
        min_density: with ``scope="global"``, every layer keeps at least this fraction, so one
            threshold cannot wipe out a layer (e.g. the classifier head). ``None`` (default): a
            tenth of the density at the target, ``0.1 * (1 - target_sparsity)`` (0.01 at 90%,
            0.002 at 98%): no layer ends more than ten times sparser than the model, and the floor
            does not eat the budget at extreme sparsity.
        monitor: a logged metric (e.g. ``"val_acc"``) for accuracy-aware control: the value
            before the first event is the baseline; the first validation after an event judges it,
            and one more than ``max_drop`` worse rolls it back at once and halves the step; when no
            step fits pruning stops. No event runs after the fit's last validation (with
            ``end_epoch=None`` the schedule ends at the last event a validation follows), and an
            event that an early stop leaves unjudged is rolled back at the end of fit, so ``fit``
            never returns a model no validation judged. ``None`` disables it.
        max_drop: largest tolerated drop of ``monitor`` from the baseline.
        mode: ``"max"`` if higher ``monitor`` is better, ``"min"`` otherwise.
        rewind_epoch: lottery-ticket rewinding: after each event the surviving weights go back
            to their values at the start of this epoch (``<= start_epoch``). ``None``: off.
        seed: seed of ``importance="random"`` (the same on every process).
        granularity: what is pruned. ``"element"``: any single weight. ``"channel"``: whole output
            channels/neurons together with everything coupled to them (BatchNorm, the consuming
            layers' inputs, residual partners), found by tracing ``example_input_array``;
            ``target_sparsity`` is then the fraction of channels, scored by the L2 norm
            (``"magnitude"``), Taylor or ``"bn_scale"``; :func:`~lightning_compress.compact` removes
            them after training. ``"N:M"`` (e.g. ``"2:4"``): at most N of every M consecutive input
            weights survive; ``target_sparsity`` must be ``1 - N/M``; layers whose input size is not a
            multiple of M stay dense (with a warning).
        regrow: fraction of the kept weights exchanged at every event but the last: the
            lowest-scored are pruned and as many pruned weights with the largest gradient magnitude
            since the previous event come back at zero (GraNet's neuroregeneration, Liu et al. 2021),
            so early mistakes can be undone and density can move between layers (within
            ``min_density``). Sparsity is unchanged. ``0`` (default) turns it off; element granularity
            only. Costs 4 bytes per selected weight for the gradient sums.
        export_path: at the end of ``fit``, write the model there (``.onnx``: an int8 ONNX model, which
            needs ``example_input_array``; otherwise :func:`~lightning_compress.save_compressed`).
            The model itself is not changed; the report is in :attr:`export_report`. With
            ``granularity="channel"`` the exported copy is compacted (pruned channels removed).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_compress import IterativePruning
        >>> pruning = IterativePruning(target_sparsity=0.9, importance="taylor", start_epoch=1, end_epoch=8)
        >>> trainer = Trainer(max_epochs=10, callbacks=[pruning], logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float,
        importance: str | Importance = "magnitude",
        scope: str = "global",
        schedule: str | Callable[[int], float] = "cubic",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        min_density: float | None = None,
        monitor: str | None = None,
        max_drop: float = 0.01,
        mode: str = "max",
        rewind_epoch: int | None = None,
        seed: int = 0,
        granularity: str = "element",
        regrow: float = 0.0,
        export_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.target_sparsity = validate_fraction(target_sparsity, "target_sparsity")
        resolve_importance(importance, check_int(seed, "seed", minimum=0) or 0)  # validates
        self.importance = importance
        self.granularity, self._nm = check_granularity(granularity, self.target_sparsity, importance)
        self.regrow = validate_fraction(regrow, "regrow")
        if self.regrow > 0 and self.granularity != "element":
            raise ValueError(
                f"`regrow`={regrow} exchanges single weights: it needs granularity='element', "
                f"got `granularity`={granularity!r}."
            )
        self.scope = check_choice(scope, "scope", ("global", "layer"))
        if not callable(schedule):
            check_choice(schedule, "schedule", SCHEDULES)
        self.schedule = schedule
        self.start_epoch = check_int(start_epoch, "start_epoch") or 0
        self.end_epoch = check_int(end_epoch, "end_epoch", optional=True)
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ValueError(
                f"`end_epoch`={end_epoch} must be greater than `start_epoch`={start_epoch}: pruning "
                "happens at the end of epochs start_epoch .. end_epoch - 1."
            )
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(
                f"Set one of `every_n_epochs`={every_n_epochs} and `every_n_steps`={every_n_steps}, not both."
            )
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1, optional=True)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1, optional=True)
        self.include = normalize_patterns(include, "include")
        self.exclude = normalize_patterns(exclude, "exclude")
        self.min_density = resolve_min_density(min_density, self.target_sparsity, self.scope, "target_sparsity")
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"`monitor` must be a metric name (str) or None, got {monitor!r}.")
        self.monitor = monitor
        self.max_drop = check_float(max_drop, "max_drop")
        self.mode = check_choice(mode, "mode", ("max", "min"))
        self.rewind_epoch = check_int(rewind_epoch, "rewind_epoch", optional=True)
        if self.rewind_epoch is not None and self.rewind_epoch > self.start_epoch:
            raise ValueError(
                f"`rewind_epoch`={rewind_epoch} must be <= `start_epoch`={start_epoch}: the weights "
                "to rewind to must be saved before the first pruning event."
            )
        self.seed = seed

        self._pruner: Pruner | None = None
        self._guard: AccuracyGuard | None = None
        self._schedule: PruningSchedule | None = None
        self._end_epoch = self.end_epoch
        self._pending_state: dict[str, Any] | None = None
        self._last_t = -1
        self._every_steps: int | None = None  # the step cadence of this fit (None: between epochs)
        self._last_judged: int | None = None  # the last schedule time whose event a validation judges
        self._pending_logs: dict[str, float] = {}  # guard decisions are taken in validation, logged after it
        self._sparsity_changed = False  # a rollback in validation: log the sparsity after it
        self._optimizer_params: dict[int, set[int]] = {}
        self.decisions: list[GuardDecision] = []
        self.export_path = check_export_path(export_path)
        self.export_report: CompressionReport | None = None
        self._warned_floors: set[str] = set()

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            target_sparsity=self.target_sparsity,
            importance=self.importance if isinstance(self.importance, str) else type(self.importance).__name__,
            scope=self.scope,
            include=self.include,
            exclude=self.exclude,
            **({} if self.granularity == "element" else {"granularity": self.granularity}),
        )

    @property
    def pruner(self) -> Pruner:
        """The :class:`~lightning_compress.core.pruner.Pruner` of the current fit."""
        if self._pruner is None:
            raise RuntimeError("IterativePruning has no pruner yet: it is created when `fit` starts.")
        return self._pruner

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current masks (bool, ``True`` = kept), keyed by parameter name."""
        return {} if self._pruner is None else self._pruner.bool_masks()

    def state_dict(self) -> dict[str, Any]:
        if self._pruner is None:
            return {}
        return {
            "version": _STATE_VERSION,
            "last_t": self._last_t,
            "pruner": self._pruner.state_dict(),
            "guard": None if self._guard is None else self._guard.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"IterativePruning state version {version!r} is not supported (expected {_STATE_VERSION})."
            )
        self._pending_state = state_dict
        if self._pruner is not None:  # fitting: `setup` already built the pruner, take the state now
            self._consume_pending_state()

    def _consume_pending_state(self) -> None:
        if self._pending_state is None:
            return
        state, self._pending_state = self._pending_state, None
        self.pruner.load_state_dict(state["pruner"])
        self._last_t = int(state["last_t"])
        if state.get("guard") is not None and self._guard is not None:
            self._guard.load_state_dict(state["guard"])

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "IterativePruning")
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        unlimited = max_epochs is None or max_epochs < 0
        if self.end_epoch is None and unlimited:
            raise ValueError("`end_epoch` is required when the Trainer's `max_epochs` is unlimited.")
        end_epoch = self.end_epoch if self.end_epoch is not None else int(max_epochs)  # type: ignore[arg-type]
        if end_epoch <= self.start_epoch:
            raise ValueError(
                f"`start_epoch`={self.start_epoch} leaves no pruning event before `max_epochs`={max_epochs}."
            )
        if not unlimited and end_epoch > max_epochs:  # type: ignore[operator]
            raise ValueError(
                f"The schedule cannot finish: `end_epoch`={end_epoch} is after the Trainer's "
                f"`max_epochs`={max_epochs}. Lower `end_epoch` or raise `max_epochs`."
            )
        self._end_epoch = end_epoch
        check_export_ready(self.export_path, pl_module)
        if self.monitor is not None and (
            trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module)
        ):
            raise ValueError(
                f"`monitor`={self.monitor!r} needs a validation loop that logs it, but this fit has none "
                "(no `validation_step` or `limit_val_batches=0`); set `monitor=None` or add validation."
            )
        targets, rule = self._targets_and_rule(pl_module)
        importance = resolve_importance(self.importance, self.seed or 0)
        pruner = Pruner(targets, importance, self.scope, self.min_density, rule, regrow=self.regrow)
        previous = self._pruner
        continuing = False
        if trainer.ckpt_path is None and previous is not None and previous.masks and pruner.matches(previous.masks):
            pruner.masks = {n: m.to(pruner._by_name[n].param.device) for n, m in previous.masks.items()}
            continuing = pruner.carries_masks()
            if not continuing:
                pruner.masks = {}
        if not continuing:
            self._guard = None if self.monitor is None else AccuracyGuard(max_drop=self.max_drop, mode=self.mode)
            self.decisions = []
        elif not isinstance(self.importance, str) and previous is not None:
            pruner.importance = previous.importance
        self._pruner = pruner
        if trainer.ckpt_path is None:
            self._pending_state = None
        self._last_t = -1
        self._last_judged = None
        self._pending_logs = {}
        self._sparsity_changed = False
        self._optimizer_params = {}

    def _targets_and_rule(self, pl_module: pl.LightningModule) -> tuple[list[Target], MaskRule | None]:
        targets = select_targets(pl_module, self.include, self.exclude)
        example = None
        if self.granularity == "channel":
            example = pl_module.example_input_array
            if example is None:
                raise ValueError(
                    "`granularity`='channel' traces the model to find coupled channels and needs example inputs: "
                    f"set `self.example_input_array` in {type(pl_module).__name__}.__init__ (a tensor, tuple or dict)."
                )
            example = pl_module._apply_batch_transfer_handler(pl_module._on_before_batch_transfer(example))
        importance = resolve_importance(self.importance, self.seed)
        targets, rule, left = rule_for(pl_module, targets, self.granularity, self._nm, importance, example)
        if left and self._nm is not None:
            rank_zero_warn(
                f"IterativePruning: layer(s) {list(left)} stay dense: their input size is not a multiple of "
                f"{self._nm[1]}, so `granularity`={self.granularity!r} cannot apply. `exclude` them to silence this."
            )
        elif left:
            rank_zero_info("IterativePruning: channels left whole: " + "; ".join(f"{n} ({w})" for n, w in left.items()))
        return targets, rule

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(
                {
                    "compress/pruning/target_sparsity": self.target_sparsity,
                    "compress/pruning/importance": str(self.importance),
                    "compress/pruning/scope": self.scope,
                    "compress/pruning/schedule": str(self.schedule),
                    "compress/pruning/granularity": self.granularity,
                }
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        self._consume_pending_state()  # strategies that restore after setup load the state late
        self._schedule = self._build_schedule(trainer)
        pruner.apply()
        for optimizer in trainer.optimizers:
            pruner.zero_optimizer_state(optimizer)

    def _build_schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        end_epoch = self._end_epoch or 0
        batches = trainer.num_training_batches
        sized = isinstance(batches, int) or (isinstance(batches, float) and math.isfinite(batches))
        per_epoch = max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches))) if sized else None
        if per_epoch is not None and trainer.max_steps >= 0 and end_epoch * per_epoch > trainer.max_steps:
            raise ValueError(
                f"The schedule cannot finish: it ends after {end_epoch * per_epoch} optimizer steps "
                f"(`end_epoch`={end_epoch} x {per_epoch} steps per epoch) but the Trainer's "
                f"`max_steps`={trainer.max_steps}."
            )
        self._every_steps = self.every_n_steps
        if (
            self._every_steps is None
            and self.every_n_epochs is None
            and DEFAULT_EVENTS is not None
            and per_epoch is not None
            and not callable(self.schedule)
            and self.monitor is None  # the guard judges each event by a validation: one event per epoch
            and self.granularity == "element"  # chosen on unstructured pruning only
        ):
            self._every_steps = step_interval((end_epoch - self.start_epoch) * per_epoch, DEFAULT_EVENTS)
        if self._every_steps is None:
            start, end, every = self.start_epoch, end_epoch, self.every_n_epochs or 1
        elif per_epoch is None:
            raise ValueError(
                "`every_n_steps` needs a train dataloader with a length, to place `start_epoch` and "
                "`end_epoch` in steps; use `every_n_epochs` for iterable datasets."
            )
        else:
            start, end, every = self.start_epoch * per_epoch, end_epoch * per_epoch, self._every_steps
        if self.monitor is not None:
            end = self._judged_end(trainer, start, end)
        return PruningSchedule(self.schedule, self.target_sparsity, start, end, every)

    def _judged_end(self, trainer: pl.Trainer, start: int, end: int) -> int:
        """With ``monitor``, no event may come after the fit's last validation: nothing would judge it.

        Sets the last schedule time an event may happen at; the default ``end_epoch`` ends the
        schedule there, an explicit one that ends later is warned about (its last events are skipped).
        """
        last_batch = last_validation_batch(trainer)
        if last_batch is None:  # time-based validation or unsized data: judged at the end of fit instead
            return end
        batches = int(trainer.num_training_batches)
        if self._every_steps is None:  # the event at the end of epoch e (time e + 1) needs a later validation
            judged = last_batch // batches if last_batch >= 0 else 0
            unit = "epoch"
        else:  # the event at step s needs a validation after the batch that made step s, or at it
            judged = steps_done_after(last_batch, trainer) if last_batch >= 0 else 0
            unit = "step"
        self._last_judged = judged
        if end <= judged:
            return end
        if judged <= start:
            raise ValueError(
                f"`monitor`={self.monitor!r}: no validation runs after a pruning event of this fit (the last one "
                f"runs before {unit} {judged}, the first event is at {unit} {start + 1}), so no event could be judged. "
                "Validate more often, train longer, or set `monitor=None`."
            )
        if self.end_epoch is not None:
            rank_zero_warn(
                f"IterativePruning: the fit's last validation comes before the pruning events after {unit} {judged}; "
                f"with `monitor`={self.monitor!r} they are skipped, since nothing would judge them, and the target "
                f"may not be reached. End the schedule earlier (`end_epoch`) or validate later."
            )
            return end
        return judged

    # ------------------------------------------------------------------ training hooks
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        if self.rewind_epoch is not None and trainer.current_epoch == self.rewind_epoch and not pruner.has_rewind_point:
            pruner.save_rewind_point()
        pruner.apply()  # weights written outside the optimizer (e.g. SWA) must not revive pruned ones

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pruner = self.pruner
        params = self._params_of(optimizer)
        if self._events_remain():
            pruner.observe_gradients(params)
        pruner.mask_gradients(params)

    def _params_of(self, optimizer: torch.optim.Optimizer) -> set[int]:
        key = id(optimizer)
        if key not in self._optimizer_params:
            self._optimizer_params[key] = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return self._optimizer_params[key]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._every_steps is not None and trainer.global_step != self._last_t:
            self._tick(trainer, pl_module, trainer.global_step, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every_steps is None:
            self._tick(trainer, pl_module, trainer.current_epoch + 1, trainer.current_epoch)
        else:
            self._flush_logs(trainer, pl_module, step_level=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guard = self._guard
        if guard is not None and guard.awaiting_check:  # fit stopped early: no validation judged the last event
            before = self.pruner.masked_sparsity()
            self.pruner.undo()
            guard.awaiting_check = False
            rank_zero_warn(
                f"IterativePruning: fit ended before a validation judged the last pruning event; it was rolled back "
                f"(sparsity {before:.4f} -> {self.pruner.masked_sparsity():.4f}) so that the model `fit` returns was "
                "judged. A checkpoint saved after that event and before the end of fit still holds it."
            )
        self.pruner.apply()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.apply()  # after callbacks that write weights at train end (SWA)
        if self.export_path is not None:
            self.export_report = export_at_fit_end(
                trainer, pl_module, self.export_path, compacted=self.granularity == "channel"
            )

    # ------------------------------------------------------------------ monitor
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and trainer.num_sanity_val_steps != 0:
            self._read_monitor(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge the last event now, before a checkpoint saved at the end of this validation can hold it."""
        if self.monitor is None or trainer.sanity_checking or trainer.state.fn != "fit" or self._guard is None:
            return
        decision = self._guard.observe(self._read_monitor(trainer))
        if decision is not None:
            self._record(trainer, decision)

    def _read_monitor(self, trainer: pl.Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor or "")
        if value is None:
            available = sorted(trainer.callback_metrics)
            raise ValueError(
                f"`monitor`={self.monitor!r} was not logged during validation; logged metrics: {available}. "
                "Log it with `self.log(...)` in `validation_step` or change `monitor`."
            )
        return float(value)

    # ------------------------------------------------------------------ the schedule tick
    def _events_remain(self) -> bool:
        schedule = self._schedule
        if schedule is None:
            return False
        if self._guard is not None and self._guard.stopped:
            return False
        if self._last_t < schedule.end:
            return True
        return self._guard is not None and self.pruner.masked_sparsity() < self.target_sparsity - 1e-9

    def _tick(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, user_time: int) -> None:
        self._last_t = t
        schedule = self._schedule
        pruner = self.pruner
        assert schedule is not None
        guard = self._guard
        self._flush_logs(trainer, pl_module)
        catch_up = (
            guard is not None
            and t > schedule.end
            and (t - schedule.start) % schedule.every == 0
            and pruner.masked_sparsity() < self.target_sparsity - 1e-9
        )
        if not (schedule.is_event(t) or catch_up):
            return
        if guard is not None and guard.baseline is None:
            raise ValueError(
                f"`monitor`={self.monitor!r} has no value before the first pruning event: validation must run "
                "(and log it) before epoch `start_epoch` ends, or set `monitor=None`."
            )
        if guard is not None and (guard.stopped or guard.awaiting_check):
            return
        if guard is not None and self._last_judged is not None and t > self._last_judged:
            return  # no validation before the end of fit would judge it
        previous = pruner.masked_sparsity()
        wanted = self.target_sparsity if t > schedule.end else schedule.sparsity_at(t, user_time)
        if guard is not None:
            wanted = guard.limit(previous, wanted)
        regrow = self._regrow_fraction(wanted)
        if not pruner.prune_to(wanted, keep_undo=guard is not None, sync=_broadcast_masks, regrow=regrow):
            return
        for optimizer in trainer.optimizers:
            pruner.zero_optimizer_state(optimizer)
        if guard is not None:
            guard.event_applied(previous, pruner.masked_sparsity())
        self._warn_floors(wanted)
        self._log_sparsity(trainer, pl_module)

    def _regrow_fraction(self, wanted: float) -> float:
        """``regrow`` at every event but the last, which is an exact top-k (no zero "kept" weights)."""
        return 0.0 if wanted >= self.target_sparsity - 1e-9 else self.regrow

    def _warn_floors(self, wanted: float) -> None:
        """Say once which layers the ``min_density`` floor holds back, and what to do about it."""
        if self.scope != "global" or self.min_density == 0 or self.granularity != "element":
            return
        held = []
        for target in self.pruner.targets:
            mask = self.pruner.masks.get(target.param_name)
            if mask is not None and int(mask.count_nonzero()) <= floor_count(self.min_density, target.numel):
                held.append(target.name)
        new = [name for name in held if name not in self._warned_floors]
        if new:
            self._warned_floors.update(new)
            short = self.pruner.masked_sparsity() < wanted - 1.0 / max(1, self.pruner.total)
            rank_zero_warn(
                f"IterativePruning: layer(s) {new} are held at the `min_density`={self.min_density} floor: one "
                f"global threshold would prune them further."
                + (f" The model reaches {self.pruner.masked_sparsity():.4f} instead of {wanted:.4f}." if short else "")
                + " Lower `min_density`, or `exclude` the layer(s) to keep them dense on purpose."
            )

    def _record(self, trainer: pl.Trainer, decision: GuardDecision) -> None:
        self.decisions.append(decision)
        pruner = self.pruner
        if decision.action in ("rollback", "stop"):
            pruner.undo()
            for optimizer in trainer.optimizers:
                pruner.zero_optimizer_state(optimizer)
        rank_zero_info(
            f"IterativePruning: {self.monitor}={decision.value:.4f}, drop {decision.drop:.4f} "
            f"(max_drop {self.max_drop}) -> {decision.action}; sparsity {pruner.masked_sparsity():.4f}"
            + ("" if decision.step_cap is None else f", step cap {decision.step_cap:.4f}")
        )
        guard = self._guard
        assert guard is not None
        self._pending_logs.update(
            {
                "compress/monitor_drop": decision.drop,
                "compress/rollbacks": float(guard.rollbacks),
                "compress/step_cap": -1.0 if decision.step_cap is None else decision.step_cap,
            }
        )
        self._sparsity_changed = self._sparsity_changed or decision.action in ("rollback", "stop")

    def _flush_logs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_level: bool | None = None) -> None:
        """Log the guard's decisions at the first training hook after the validation that took them."""
        if self._sparsity_changed:
            self._sparsity_changed = False
            self._log_sparsity(trainer, pl_module, step_level)
        if self._pending_logs:
            values, self._pending_logs = self._pending_logs, {}
            self._log(trainer, pl_module, values, step_level)

    # ------------------------------------------------------------------ logging
    def _log_sparsity(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_level: bool | None = None) -> None:
        total = Sparsity().to(pl_module.device)
        values: dict[str, float] = {}
        for target in self.pruner.targets:
            if target.attr != "weight":
                continue
            layer = Sparsity().to(pl_module.device)
            layer.update(target.param)
            total.update(target.param)
            values[f"compress/sparsity/{target.name}"] = float(layer.compute())
        values["compress/sparsity"] = float(total.compute())
        if self.granularity == "channel":
            values["compress/channel_sparsity"] = self.pruner.masked_sparsity()
        self._log(trainer, pl_module, values, step_level)

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        values: dict[str, float],
        step_level: bool | None = None,
    ) -> None:
        """Log through the module: per step with ``every_n_steps`` (unless ``step_level`` says otherwise)."""
        step_level = self._every_steps is not None if step_level is None else step_level
        for name, value in values.items():
            pl_module.log(
                name,
                value,
                on_step=step_level,
                on_epoch=not step_level,
                sync_dist=trainer.world_size > 1,
                batch_size=1,
            )


def _broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make every process use rank 0's masks (a no-op outside ``torch.distributed``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return masks
    out = {}
    for name, mask in masks.items():
        buffer = mask.to(torch.uint8)
        dist.broadcast(buffer, src=0)
        out[name] = buffer.bool()
    return out
