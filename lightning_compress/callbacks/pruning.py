"""``IterativePruning``: importance pruning between epochs (or steps) while a model fine-tunes."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..core.adapters import lora_note
from ..core.config import PruningConfig
from ..core.controller import GuardDecision
from ..core.functional import warn_if_min_density_idle
from ..core.importance import Importance
from ..core.iterative import IterativePruner
from ..core.rules import ChannelStructure, channel_structure
from ..core.selection import select_targets
from ..core.sharding import reshard
from ..export.report import CompressionReport
from ._best_checkpoint import BestCheckpoints
from ._export import (
    ValidationInputs,
    check_export_path,
    check_export_ready,
    check_export_template,
    example_inputs,
    export_at_fit_end,
    export_template,
)
from ._guard import (
    ValidationMetrics,
    below_baseline_note,
    check_validation_state,
    guard_arguments,
    named_after_the_stage,
    read_monitor,
    rejected_but_kept_note,
    revived_weights_note,
    short_of_target_note,
    stale_note,
    unjudged_event_note,
    unscored_model_note,
)
from ._pruning_checks import (
    check_fit,
    check_frozen,
    check_keep_zeros,
    check_no_overlap,
    check_resumed_clock,
    keep_earlier_pruning,
    key_of_same_selection,
    saved_pending_logs,
    say_quant_blocks,
)
from ._pruning_clock import PruningClock
from ._pruning_log import layer_values, log_values, sparsity_values, writes_step_values
from ._settings import log_settings
from ._untrained import UnreachedWeights
from ._validation import (
    StrategyCollectives,
    check_strategy,
    noting_layers_built_late,
    runs_in_spawned_processes,
    sanity_check_is_a_baseline,
    warn_if_saved_under_another_key,
)
from ._validation_plan import (
    EpochWindow,
    plan_timeline,
    validation_ahead,
    warn_if_max_steps_counts_several_optimizers,
)

__all__ = ["IterativePruning"]


class IterativePruning(Callback):
    r"""Prune a model step by step while it trains, until ``target_sparsity`` of its weights are zero.

    A thin adapter: it maps the Trainer's hooks, epochs and validations onto a
    :class:`~lightning_compress.IterativePruner`, which holds the schedule, the guard, regrowth and the
    masks (usable in a plain PyTorch loop too). The masks are saved in checkpoints (bool); the model's
    ``state_dict`` keys never change, pruned weights are exact zeros in the parameters, their
    gradients and optimizer state are zeroed so no optimizer regrows them. Pruning happens only
    while fitting: ``validate``/``test``/the sanity check never change the model.

    Args:
        target_sparsity: fraction in [0, 1) of the selected weights that are zero when the
            schedule ends (absolute, not compounding).
        importance: ``"auto"`` (default: ``"lamp"`` for element-wise pruning of a model where a BatchNorm
            follows a selected layer, ``"magnitude"`` otherwise), ``"magnitude"`` (``|w|``), ``"lamp"`` (``|w|``
            made scale-free per layer, Lee et al. 2021; element-wise only), ``"taylor"`` (``|w * dL/dw|`` summed
            over the steps since the last event), ``"random"``, ``"bn_scale"`` (``|gamma|`` of the
            BatchNorms, channel granularity only), or an object with a
            ``score(name, weight) -> Tensor`` method (see :mod:`lightning_compress.core.importance`).
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"`` (the same
            sparsity in every layer). ``None`` (default): ``"global"``, and ``"layer"`` for
            ``granularity="channel"`` (the same fraction of every layer's channels: at the same compute
            it was more accurate and faster than a global threshold on every model measured).
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"``, ``"geometric"`` (the same
            fraction of the remaining weights each event), ``"one_shot"``, or a callable
            ``epoch -> sparsity`` (``global_step -> sparsity`` with ``every_n_steps``): the path before
            ``end_epoch``, capped at ``target_sparsity``, which is reached at ``end_epoch`` whatever it returns.
        start_epoch: first epoch (0-indexed) of the pruning window: with events in optimizer steps (the default
            without ``monitor``) pruning starts during it; with ``every_n_epochs`` the first event is at its end.
        end_epoch: the target is reached at the end of epoch ``end_epoch - 1``, i.e. after
            ``end_epoch`` epochs. ``None``: ``max_epochs``. Must be ``<= max_epochs``.
        every_n_epochs: epochs between pruning events.
        every_n_steps: prune every n optimizer steps instead (between steps), inside the same
            ``start_epoch``..``end_epoch`` window. Exclusive with ``every_n_epochs``. With neither
            (the default), pruning without ``monitor`` happens in optimizer steps: for weights about
            1,000 events over the window (every ``window_steps // 1000`` steps, so after every step of a
            shorter window), for channels about 100 (every ``window_steps // 100``). Both chosen on model
            zoos (``BENCHMARKS.md``): for weights, every step against 100 events won 9 of 12 cells where
            it was chosen and 5 of 6 held out; for channels, 100 events against one per epoch won 9 of 16
            cells and lost 5. N:M granularity, ``monitor`` (one event per validation), a callable
            ``schedule`` and a train dataloader without a length prune once per epoch. An event after an epoch
            runs at the next epoch's first batch (after the epoch's validation and checkpoints, so a checkpoint
            holds the model its validation scored); the one after the fit's last epoch at the end of training.
        include: glob patterns over qualified module names; wildcards pick Linear/Conv layers, an
            exact name picks that module's weight whatever its type. ``None``: every Linear/Conv (and
            ``transformers``' Conv1D, PyTorch Geometric's Linear), the experts a mixture of experts stores as 3-d
            tensors, and the weight matrices of recurrent layers and ``nn.MultiheadAttention`` (not a head tied to
            the token embedding, nor ``peft``'s LoRA adapters: their base layers are selected, docs/pruning.md "LoRA
            adapters").
        exclude: glob patterns over module names to leave dense (with ``granularity="channel"``: an excluded layer
            keeps its output channels, and loses the input columns of channels the layers feeding it lose).
        min_density: with ``scope="global"``, every layer keeps at least this fraction, so one
            threshold cannot wipe out a layer (e.g. the classifier head). ``None`` (default): a
            tenth of the density at the target, ``0.1 * (1 - target_sparsity)`` (0.01 at 90%,
            0.002 at 98%): no layer ends more than ten times sparser than the model, and the floor
            does not eat the budget at extreme sparsity.
        monitor: a logged metric (e.g. ``"val_acc"``) for accuracy-aware control: the value
            before the first event is the baseline; the first validation after an event judges it,
            and one more than ``max_drop`` worse rolls it back at once and halves the step; when no
            step fits pruning stops. No event runs after the fit's last validation (with
            ``end_epoch=None`` the schedule ends at the first event after the second-to-last validation, which
            the last one judges), and an
            event that an early stop leaves unjudged is rolled back at the end of fit, so ``fit``
            never returns a model no validation judged. ``None`` disables it.
        max_drop: largest tolerated drop of ``monitor`` from the baseline (``None``: 0.01). Without ``monitor``
            it has no effect, and setting it warns.
        mode: ``"max"`` if higher ``monitor`` is better, ``"min"`` otherwise. ``None`` (default): ``"min"`` for a
            name whose words say it is lower-is-better (``val_loss``, ``val_nll``, ``val_kl``, ``val_ppl``,
            ``val_error``, ``val_mse``, ``val_wer``, ``val_mape``, ``val_fid``, ...; ``neg_`` flips it; see
            :func:`lightning_compress.core.controller.lower_is_better`), ``"max"`` otherwise (``val_acc``,
            ``val_f1``); the choice is logged.
            Lightning's ``EarlyStopping`` defaults to ``"min"``: a guard that read ``val_loss`` as higher-is-better
            would accept every drop, so an explicit ``mode="max"`` with such a name warns.
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
        measure: with ``granularity="channel"``, what ``target_sparsity`` counts: ``"channels"`` (default)
            or ``"macs"``, the fraction of the model's multiply-accumulates (Linear/Conv layers, one forward
            of ``example_input_array``) removed: ``IterativePruning(0.75, granularity="channel",
            measure="macs")`` leaves a quarter of the compute. Global scope then ranks channels by score
            per MAC their removal saves; layer scope prunes the same fraction of every group's channels,
            the smallest that fits.
        round_to: with ``granularity="channel"``: every group of output channels keeps a multiple of this many
            (rounded down, so a reachable target or MACs budget still holds; heads, and groups a group-wise
            quantized layer reads in blocks, aside): widths onnxruntime's fast CPU convolution layout takes whole (8
            or 16). A group keeps at least one multiple, or all it has, so small groups may not shrink: a MACs budget
            that leaves out of reach sends every group to that floor, with a warning. ``None`` (default): any count.
        regrow: fraction of the kept weights exchanged at every event but the last: the
            lowest-scored are pruned and as many pruned weights with the largest gradient magnitude
            since the previous event come back at zero (GraNet's neuroregeneration, Liu et al. 2021),
            so early mistakes can be undone and density can move between layers (within
            ``min_density``). Sparsity is unchanged. ``0`` (default) turns it off; element granularity
            only. Costs 4 bytes per selected weight for the gradient sums.
        keep_zeros: at the start of a fit that does not resume this callback's state (a checkpoint of another
            pruning run, or saved with other arguments, does not), keep the selected weights' exact zeros as masks
            and start the schedule from their sparsity (Zhu & Gupta's ``s_i``): to prune further a model pruned
            before (``prune_``, an earlier fit). Weights all zero, or whose other values are all one value (``eye_``,
            ``dirac_``), are initialized so and left out, and so are layers under the ``min_density`` floor (both
            named in the log). Element granularity and global scope only. ``False`` (default): the schedule
            starts from a dense model, and when the selected weights are already 10% zero or more a warning says
            their zeros will train back.
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
        importance: str | Importance = "auto",
        scope: str | None = None,
        schedule: str | Callable[[int], float] = "cubic",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        min_density: float | None = None,
        monitor: str | None = None,
        max_drop: float | None = None,
        mode: str | None = None,
        rewind_epoch: int | None = None,
        seed: int = 0,
        granularity: str = "element",
        regrow: float = 0.0,
        export_path: str | Path | None = None,
        measure: str = "channels",
        round_to: int | None = None,
        keep_zeros: bool = False,
    ) -> None:
        super().__init__()
        self.monitor, self.max_drop, mode = guard_arguments(monitor, max_drop, mode)
        self.config = PruningConfig(
            target_sparsity, importance, scope, schedule, granularity, include, exclude, min_density, regrow,
            None if monitor is None else self.max_drop, mode, seed, measure, round_to,
        )  # fmt: skip
        self.keep_zeros = check_keep_zeros(keep_zeros, self.config.granularity, cast(str, self.config.scope))
        warn_if_min_density_idle(min_density, cast(str, self.config.scope), self.config.granularity)
        self.window = EpochWindow(start_epoch, end_epoch, every_n_epochs, every_n_steps, rewind_epoch)
        frequent = every_n_epochs is None and every_n_steps is None and monitor is None and not callable(schedule)
        if rewind_epoch is not None and frequent and self.config.nm is None:
            warnings.warn(  # trial DW: 0.78 where the same fit without rewinding reached 0.91, unsaid
                f"IterativePruning: `rewind_epoch`={rewind_epoch} puts the surviving weights back after every event, "
                "and the default cadence runs an event every few optimizer steps (after every step of a window under "
                "2,000 steps), so the training between events is undone each time. Pass `every_n_epochs=1` to train an "
                "epoch between rewinds, or a larger `every_n_steps`.",
                UserWarning,
                stacklevel=2,
            )
        self.export_path = check_export_path(export_path)
        self.export_report: CompressionReport | None = None
        self._validation_inputs = ValidationInputs()  # what an ONNX export measures float convolution outputs on
        self._core: IterativePruner | None = None
        self._previous: IterativePruner | None = None
        self._structure: ChannelStructure | None = None  # channel groups traced at setup, before FSDP2 shards
        self._template: nn.Module | None = None  # the module without weights, for exporting from shards
        self._restored: dict[str, Any] | None = None  # a checkpoint's state that arrived before the pruner
        self._resumes = False
        self._said_revived = False
        self._fitting = True  # set up for `fit` (or not set up by a Trainer yet: a state loaded by hand applies)
        self._resumed_validation: dict[str, Any] | None = None  # the checkpoint's judged validation (step, metrics)
        self._clock = PruningClock()
        self._trained = False
        self._pending_logs: dict[str, float] = {}  # guard decisions are taken in validation, logged after it
        self._layers_unlogged = False  # an event in steps changed the masks since each layer's sparsity was logged
        self._best = BestCheckpoints()  # what a monitored ModelCheckpoint's best checkpoint holds
        self._validated_at: int | None = None  # the optimizer step of the fit's last validation the guard read
        self._unscored_rollback = False  # that validation's rollback could not give back the model scored before
        self._scored: float | None = None  # what that validation scored the model it left (None: not known)
        self._said_differs: set[str] = set()  # monitors said to differ between processes
        self._metrics = ValidationMetrics()  # what a rollback gives checkpoint callbacks
        self._optimizer_params: dict[tuple[int, int], set[int]] = {}
        self._unreached = UnreachedWeights()  # selected weights no gradient reaches in the first epoch

    # ------------------------------------------------------------------ identity and state
    @property
    def target_sparsity(self) -> float:
        return self.config.target_sparsity

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.config.identity())

    @property
    def pruner(self) -> IterativePruner:
        """The :class:`~lightning_compress.IterativePruner` of the current fit."""
        if self._core is None:
            raise RuntimeError("IterativePruning has no pruner yet: it is created when training starts.")
        return self._core

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current masks (bool, ``True`` = kept), keyed by parameter name: this process's shards under FSDP2
        (:meth:`state_dict` gathers them whole)."""
        return {} if self._core is None else self._core.masks

    @property
    def decisions(self) -> list[GuardDecision]:
        """The accuracy guard's decisions so far."""
        return [] if self._core is None else self._core.decisions

    def state_dict(self) -> dict[str, Any]:
        if self._core is None:
            return {}
        return {
            **self._core.state_dict(), "validation": self._metrics.state_dict(), "monitor": self.monitor,
            **self._clock.state_dict(), "pending_logs": dict(self._pending_logs),
        }  # fmt: skip

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Lightning restores the state saved under this callback's key, which holds its patterns as written; a state
        saved with other `include`/`exclude` patterns that select the same weights (another order, a glob) is this
        run's too (a trial: it started afresh, and the run ended 0.727 away from the uninterrupted one)."""
        states = checkpoint.get("callbacks", {})
        same = (
            None
            if self.state_key in states
            else key_of_same_selection(type(self).__name__, self.config, pl_module, states)
        )
        if same is not None:
            self.load_state_dict(states[same])
            return
        warn_if_saved_under_another_key(checkpoint, self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"IterativePruning's checkpoint state must be a dict, got {type(state_dict).__name__}.")
        if not state_dict or not self._fitting:
            # `validate`/`test`/`predict` with `ckpt_path` restore it too: the checkpoint's model has its zeros, and
            # the state is the fit's (a trial: `test` of another model's checkpoint replaced this instance's masks,
            # and its next fit revived the weights they left)
            return
        check_validation_state(state_dict.get("validation"))
        self._resumes = True
        pending = saved_pending_logs(state_dict)
        self._resumed_validation = state_dict.get("validation")
        self._clock.load(state_dict)
        # decisions and sparsity logged at the epoch's end (trial CQ: a checkpoint saved before it lost them)
        self._pending_logs = pending
        if self._core is None:  # restored before `on_fit_start` (all strategies but FSDP2): applied there
            self._restored = state_dict
        else:
            self._load_core_state(state_dict)

    def _load_core_state(self, state: dict[str, Any]) -> None:
        """The checkpoint's pruning state; a guard that monitored another metric leaves no baseline to compare with
        (a trial: resumed with `monitor='val_loss'`, the old `val_acc` baseline judged a rising loss as a gain)."""
        self._core.load_state_dict(state)  # type: ignore[union-attr]
        saved = state.get("monitor", self.monitor)
        guard = self._core.guard  # type: ignore[union-attr]
        if guard is not None and state.get("guard") is not None and saved != self.monitor:
            guard.forget_baseline()
            self._resumed_validation = None  # its metrics are of the other monitor's validations
            self._core.decisions.clear()  # type: ignore[union-attr]  # judged on the other monitor
            rank_zero_warn(
                f"IterativePruning: the checkpoint's accuracy guard monitored {saved!r}, this fit monitors "
                f"{self.monitor!r}: its baseline is not comparable, so the next validation gives a new one (an event "
                "awaiting judgement is kept), and `decisions` starts afresh."
            )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = self.config
        check_strategy(trainer, "IterativePruning")
        if stage == "fit" and runs_in_spawned_processes(trainer):
            rank_zero_warn(
                "IterativePruning under a strategy that trains in spawned processes (`ddp_spawn`, `ddp_fork`, "
                "`ddp_notebook`): the model in the calling process gets back the pruned weights, but this callback's "
                "masks and decisions stay in the workers (`pruner` and `masks` are empty there). Use strategy='ddp' "
                "to keep them, or `export_path` to write the file in the workers."
            )
        self._fitting = stage == "fit"
        self._best.reset()
        if stage != "fit":
            return
        self._clock.reset()
        self._trained = False  # this fit's `on_train_start` ran (Lightning skips it for a fit already finished)
        self.window.end_for(trainer, loaded=False)  # checks `end_epoch` against `max_epochs`
        check_export_ready(trainer, self.export_path, pl_module)
        check_fit(trainer, pl_module, self.monitor, config.granularity)
        self._structure = None
        if config.granularity == "channel":  # trace the whole model now (FSDP2 shards it next), naming its inputs
            with warnings.catch_warnings():  # what it leaves out is said once, when the pruner selects them again
                warnings.simplefilter("ignore")
                with noting_layers_built_late(pl_module, "granularity='channel' traces the model", "select no"):
                    targets = select_targets(pl_module, config.include, config.exclude, module_tensors=True)
            self._structure = channel_structure(
                pl_module, targets, example_inputs(pl_module), config.measure, "example_input_array"
            )
        self._template = export_template(
            trainer, pl_module, self.export_path, compacted=config.granularity == "channel"
        )
        self._previous = self._core if trainer.ckpt_path is None else None
        self._core, self._restored, self._resumed_validation = None, None, None
        self._resumes = False  # whether the checkpoint gives this fit this callback's state (`load_state_dict`)
        self._said_revived = False  # pruned weights found nonzero at a validation were said
        self._pending_logs, self._optimizer_params = {}, {}
        self._metrics = ValidationMetrics()  # a fresh fit: no validation scored a copy yet

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the weights now: ``configure_model`` (e.g. FSDP2's ``fully_shard``) has run since ``setup``."""
        check_export_template(self._template, pl_module, "IterativePruning")
        config = self.config
        user = config.schedule
        if (
            callable(user) and self.window.every_n_steps is None
        ):  # an epoch clock: the callable gets the epoch that ended
            config = dataclasses.replace(config, schedule=lambda t: user(t - 1))
        self._core = IterativePruner.from_config(  # provisional clock: placed in on_train_start
            pl_module, config, total_steps=self.window.end_for(trainer, loaded=False),
            start_step=self.window.start_epoch,
            example_inputs=example_inputs(pl_module), collectives=StrategyCollectives(trainer.strategy),
            warn=rank_zero_warn, info=rank_zero_info, previous=self._previous, structure=self._structure,
        )  # fmt: skip
        self._previous, self._structure = None, None
        others = [
            (other.pruner.targets, other.config.granularity)
            for other in trainer.callbacks  # type: ignore[attr-defined]
            if other is not self and isinstance(other, IterativePruning) and other._core is not None
        ]
        try:
            check_no_overlap(self.pruner.targets, self.config.granularity, others)
        except ValueError:
            self._core = None
            raise
        if self._restored is not None:
            self._load_core_state(self._restored)
            self._restored = None
        # channels: the adapters' rows and columns go with each neuron, and a merge keeps them zero (trial FZ: the
        # note said the merged model would not be sparse; it was, exactly)
        channels = self.config.granularity == "channel"
        lora = None if channels else lora_note(pl_module, [t.name for t in self.pruner.targets], "prunes")
        if lora is not None:
            rank_zero_warn(lora)
        log_settings(trainer, pl_module, self)

    def compression_settings(self) -> tuple[str, dict[str, Any]]:
        """``("pruning", settings)``: what the loggers record as ``compress/pruning/...`` hyperparameters."""
        window, config = self.window, self.config
        return "pruning", {
            **config.describe(), "start_epoch": window.start_epoch, "end_epoch": window.end_epoch,
            "every_n_epochs": window.every_n_epochs, "every_n_steps": window.every_n_steps,
            "include": config.include, "exclude": config.exclude, "min_density": config.min_density,
            "regrow": config.regrow, "seed": config.seed, "monitor": self.monitor,
            "max_drop": self.max_drop if self.monitor is not None else None,
            "mode": self.config.mode if self.monitor is not None else None, "rewind_epoch": window.rewind_epoch,
            "export_path": None if self.export_path is None else str(self.export_path),
            "keep_zeros": self.keep_zeros,
        }  # fmt: skip

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A sanity check asked for every validation batch (``num_sanity_val_steps=-1``) is a validation of the
        model before training: the baseline if none is known yet, when the first event may come in the first epoch
        (``every_n_steps`` from ``start_epoch=0``). Another one (two batches by default) only checks
        that ``monitor`` is logged: its value is not comparable with a whole validation's (or scores a model that
        has not trained yet: :func:`sanity_check_is_a_baseline`), and on a resumed fit it must not judge the event
        the checkpoint holds."""
        batches = list(trainer.num_sanity_val_batches)
        if self.monitor is None or trainer.num_sanity_val_steps == 0 or sum(batches) == 0:
            return
        if not trainer.callback_metrics and len(batches) > 1:
            return  # with several validation loaders Lightning keeps no metric of the sanity check
        if named_after_the_stage(trainer, self.monitor):
            return  # the first validation reads it (and refuses a name it does not log)
        value = read_monitor(trainer, self.monitor or "", self._said_differs)
        guard = self.pruner.guard
        if guard is None or guard.baseline is not None or not sanity_check_is_a_baseline(trainer):
            return
        window = self.window
        if window.every_n_steps is None or window.start_epoch > 0:
            # trial EH: events between epochs (the guard's default) or from a later `start_epoch` come after training
            # the sanity check did not score; with no validation before them it stayed the baseline, an epoch stale
            # (0.9213 where the model pruned scored 0.9330; the fit returned 0.9179, "accept")
            rank_zero_info(
                f"IterativePruning: {self.monitor}={value:.4f} in the sanity check is not the baseline: the first "
                "pruning event comes after training it did not score ("
                + ("events between epochs" if window.every_n_steps is None else f"`start_epoch`={window.start_epoch}")
                + "), so the last validation before that event gives it"
            )
            return
        if self._finite_baseline(value):
            self.pruner.observe(value)
            rank_zero_info(
                f"IterativePruning: {self.monitor}={value:.4f} in the sanity check, which ran the whole validation "
                "set as asked (`num_sanity_val_steps=-1`) -> baseline: the model before training, taken as trained (a "
                "validation before the first event replaces it; without one, drops are measured from it)"
            )

    def _finite_baseline(self, value: float) -> bool:
        """Whether ``value`` can be fed to the guard: a NaN or infinite value before the first event is no
        baseline (it would accept every drop); it is skipped, with a warning, and events wait for a finite one."""
        guard = self.pruner.guard
        if math.isfinite(value) or guard is None or guard.started:
            return True
        rank_zero_warn(
            f"IterativePruning: `monitor`={self.monitor!r} is {value} before pruning started; it cannot be the "
            "accuracy guard's baseline, so pruning waits for a validation that gives a finite value."
        )
        return False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the schedule on the fit's clock: the train loader's length is known from here on."""
        core = self.pruner
        if self.window.end_epoch is not None:  # unset, the schedule ends where the fit does, in batches (trial FR)
            warn_if_max_steps_counts_several_optimizers(
                trainer, pl_module, "IterativePruning", self.window.end_for(trainer), "end_epoch"
            )
        self._trained = True
        default_in_steps = self._default_in_steps
        unfreezes = any(isinstance(c, BaseFinetuning) for c in trainer.callbacks)  # type: ignore[attr-defined]
        check_frozen(
            core.targets, core.rule.importance, self.config.importance, self.window.start_epoch > 0 and unfreezes,
            self.config.regrow,
        )  # fmt: skip
        guard, clock = core.guard, self._clock
        skipped = clock.skipped_validation(trainer) and guard is not None
        if skipped and guard is not None and not guard.started:
            # it was to give the baseline, the latest value before the first event (trial CH: an older one, 0.43
            # where the skipped validation scored 0.73, let the guard accept what the uninterrupted fit rolled back)
            guard.forget_baseline()
            rank_zero_info(
                "IterativePruning: Lightning resumes this checkpoint without the validation due after its batch, "
                "which was to give the accuracy guard its baseline: pruning waits for the next validation to give it."
            )
        baseline_known = guard is not None and guard.baseline is not None
        guard_may_step = self.config.granularity in ("element", "channel") and not callable(self.config.schedule)
        offset = clock.resumed_offset(trainer, core)
        plan = plan_timeline(
            trainer, self.window, default_in_steps, self.monitor, baseline_known, guard_may_step, offset
        )
        clock.in_steps = plan.in_steps
        keep_earlier_pruning(core, self.keep_zeros, resumed=self._resumes)  # before the schedule is placed
        core.apply()
        say_quant_blocks(core.rule, pl_module)
        core.attach_optimizers(trainer.optimizers)
        self._unreached.start(core.targets)
        plan.place(core)
        resumed, self._resumed_validation = self._resumed_validation, None
        if self.monitor is not None:  # a checkpoint saved right after a validation: its copy and metrics again
            self._metrics.resume(trainer, resumed, core)
        saved_in_steps = clock.saved_in_steps
        clock.place(trainer, core)
        clock.first_epoch = clock.first_batch = True
        if skipped and guard is not None and guard.awaiting_check and validation_ahead(trainer):
            core.judgement_skipped()
            rank_zero_info(
                "IterativePruning: Lightning resumes this checkpoint without the validation due after its batch, which "
                "was to judge the last pruning event: the next event runs beside it, and the next validation judges "
                "both."
            )
        check_resumed_clock(trainer, pl_module, core.steps, clock.in_steps, clock.offset, saved_in_steps)

    # ------------------------------------------------------------------ training hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._metrics.reapply(trainer)  # a rollback's metrics, merged over again by readers during the validation
        first_batch, self._clock.first_batch = self._clock.first_batch, False
        if (batch_idx == 0 or first_batch) and self._core is not None:  # an epoch's length, after its callbacks' start
            self._clock.follow_length(trainer, pl_module, self._core, self.window, guarded=self.monitor is not None)
        if batch_idx == 0 and self._clock.first_epoch:
            self._clock.first_epoch = False
            if self._guarded_epochs and self._core is not None:
                self._clock.shift_judged_epochs(trainer, pl_module, self._core)
        if batch_idx == 0 and self._core is not None:
            # after every callback's epoch start: SWA's, listed after this one, writes its unmasked average there and
            # recomputes BatchNorm statistics in the epoch that follows (a trial: 0.44 sparse, statistics 8.6x off)
            reshard(pl_module)
            self._core.apply()
            if not self._clock.in_steps and trainer.current_epoch > 0:
                # the event after the epoch that ended, once every callback's epoch start ran (quantization that
                # switched on there holds a guarded one back until a validation scores the model quantized), and
                # after that epoch's validation and checkpoints: a checkpoint holds the model its validation scored
                # (trial CP: at the epoch's end, `ModelCheckpoint` filed 0.935-sparse weights scoring 0.18 as 0.90).
                # Also the event of a resumed epoch, whose end and the next start Lightning skips (a checkpoint saved
                # on an epoch's last batch)
                self._advance(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reshard(pl_module)  # after validation: weights written now must reach the next training forward
        self.pruner.apply()  # weights written outside the optimizer (e.g. SWA) must not revive pruned ones

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # keyed by the number of parameters too: a group added later (BackboneFinetuning unfreezing a backbone)
        # holds weights whose gradients must be masked (a trial: they came back, 0.80 -> 0.13 sparse)
        key = (id(optimizer), sum(len(group["params"]) for group in optimizer.param_groups))
        if key not in self._optimizer_params:
            self._optimizer_params[key] = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.pruner.before_optimizer_step(self._optimizer_params[key])
        self._unreached.observe()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._clock.in_steps:
            return
        clock = self._clock.now(trainer, pl_module, batch_idx)
        if clock > self.pruner.steps:
            self._advance(pl_module, clock)
        if self._layers_unlogged and trainer.loggers and writes_step_values(trainer):
            self._layers_unlogged = False
            self._log(pl_module, self._sparsity_values(pl_module))  # the total too: the step Lightning writes

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.reapply(trainer)  # before ModelCheckpoint saves (Lightning runs it after every other callback)
        self._flush_logs(pl_module, step_level=False)
        self._unreached.say(trainer.current_epoch)
        if self._core is not None:  # a checkpoint callback monitoring a training metric saves now
            self._best.note(trainer, self._core.masked_sparsity)

    def _write_final_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The sparsity the fit ends at, to every logger and to ``trainer.callback_metrics``: Lightning writes
        step-level values every `log_every_n_steps` steps, so the last events may not be among them, and no hook
        logs after the fit's last epoch (trial CR: `callback_metrics` kept the epoch before's). Every process counts,
        process 0 writes."""
        values = self._sparsity_values(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value)

    @property
    def _default_in_steps(self) -> bool:
        """With neither ``every_n_*`` set, events in optimizer steps (when the data is sized)."""
        config = self.config
        return config.granularity in ("element", "channel") and self.monitor is None and not callable(config.schedule)

    def _finish_untrained_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit resumed from a checkpoint of its last epoch's end: Lightning trains nothing and calls neither
        ``on_train_start`` nor ``on_train_end``, so the event after that epoch, which an epoch clock without a guard
        runs at the end of training, runs here (trial CR: the fit ended at 0.5907 of 0.6, without a word)."""
        core = self.pruner
        if self.monitor is not None:
            return
        plan = plan_timeline(trainer, self.window, self._default_in_steps, None)
        # a fit `max_steps` ended: the uninterrupted one ran the schedule's last event at its end (trial FO: resumed
        # from the checkpoint of that last step, mid-epoch, it held the epoch before's count and returned 0.77 of 0.80)
        ended_by_steps = 0 <= trainer.max_steps <= trainer.global_step
        last = max(trainer.current_epoch, plan.end) if ended_by_steps else trainer.current_epoch
        if plan.in_steps or last <= core.steps:
            return
        plan.place(core)
        reshard(pl_module)
        core.apply()
        if core.advance_to(last):
            self._write_final_values(trainer, pl_module)
        core.finish()

    @property
    def _guarded_epochs(self) -> bool:
        """Events between epochs judged by the guard run at the start of the next epoch, not at the end of the
        last: a checkpoint saved at the end of an epoch (``ModelCheckpoint`` saves after every other callback)
        then holds the model the epoch's validation judged, and no event follows the fit's last epoch."""
        return self.monitor is not None and not self._clock.in_steps

    def _advance(self, pl_module: pl.LightningModule, t: int) -> None:
        if self._guarded_epochs:
            # every epoch-level value from one hook, the epoch's end (trial CN: logged from the epoch's first batch
            # too, Lightning kept whichever hook registered the name later: a resumed fit wrote the rejected event's)
            if self.pruner.advance_to(t):
                self._pending_logs.update(self._sparsity_values(pl_module))
            return
        self._flush_logs(pl_module)
        if self.pruner.advance_to(t):
            self._log_sparsity(pl_module, layers=not self._clock.in_steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._core is None:
            return
        reshard(pl_module)
        # the event after the fit's last epoch (no epoch follows for its first batch), with no guard to wait for one
        ended_on_event = not self._clock.in_steps and self.monitor is None
        ended_on_event = ended_on_event and self._core.advance_to(trainer.current_epoch)
        rolled = self._core.finish()
        unit = "step" if self._clock.in_steps else "epoch"
        short = short_of_target_note(self._core, self.monitor, self.max_drop, unit)
        if short is not None:
            rank_zero_warn(short)
        validated_at, self._validated_at = self._validated_at, None
        if rolled is None:
            note = unscored_model_note(trainer.global_step, validated_at, self._unscored_rollback)
            kept = bool(self._core.decisions) and self._core.decisions[-1].action == "keep"  # said when it was
            if note is None and validated_at == trainer.global_step and not kept:
                note = below_baseline_note(self._core, self.monitor or "", self._scored)
            if note is not None:
                rank_zero_warn(note)
        if self._clock.in_steps or ended_on_event:
            self._write_final_values(trainer, pl_module)
        if rolled is not None:
            rank_zero_warn(unjudged_event_note(rolled))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._core is not None and not self._trained:
            self._finish_untrained_fit(trainer, pl_module)
        if self._core is not None:
            self._core.apply()  # after callbacks that write weights at train end (SWA)
            self._best.say_if_short(trainer, self._core.masked_sparsity())
        if self.export_path is not None:
            compacted = self.config.granularity == "channel"
            template, self._template = self._template, None
            self.export_report = export_at_fit_end(
                trainer, pl_module, self.export_path, compacted, template, self._validation_inputs.take()
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._validation_inputs.take()
        self._fitting = True  # a state loaded by hand after `test` applies again (trial CH)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._validation_inputs.take()  # Lightning calls no `teardown` after an exception (trial BT: the hook stayed)

    # ------------------------------------------------------------------ the guard
    def _guarding(self, trainer: pl.Trainer) -> bool:
        return self.monitor is not None and not trainer.sanity_checking and trainer.state.fn == "fit"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._core is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._masks_held(pl_module)  # before the guard copies the model this validation scores
        self._validation_inputs.start(trainer, pl_module, self.export_path)
        if self._guarding(trainer):
            self._metrics.start(trainer)

    def _masks_held(self, pl_module: pl.LightningModule) -> None:
        """A validation scores the pruned model: pruned weights found nonzero are zeroed again, said once."""
        revived = self._core.reapply_revived()  # type: ignore[union-attr]
        if revived and not self._said_revived:
            self._said_revived = True
            rank_zero_warn(revived_weights_note(revived))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge the last event now, before a checkpoint saved at the end of this validation can hold it."""
        self._validation_inputs.stop()
        self._clock.validated(trainer)
        self._judge(trainer, pl_module)
        if self._core is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._best.note(trainer, self._core.masked_sparsity)

    def _judge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._guarding(trainer) or self._core is None:
            return
        reshard(pl_module)  # a rollback writes the shards
        value = read_monitor(trainer, self.monitor or "", self._said_differs)
        if not self._metrics.logged.logged(trainer, self.monitor or ""):
            rank_zero_warn(stale_note("IterativePruning", trainer, self.monitor or "", "it judges nothing: the last "
                                      "pruning event waits for a validation that logs it"))  # fmt: skip
            return
        if not self._finite_baseline(value):
            return
        measured = self._metrics.measured(trainer)
        decision = self._core.observe(value)
        self._validated_at = trainer.global_step
        self._unscored_rollback = False
        rolled_back = decision is not None and decision.action in ("rollback", "stop")
        self._scored = None if rolled_back else value  # a rollback's model: what the guard said of it stands
        if self._core.judged_value is not None and (decision is None or decision.action not in ("rollback", "stop")):
            # the copy a rollback would return to is of the model just scored
            self._metrics.keep(measured, trainer.global_step)
        if decision is None:
            return
        rank_zero_info(
            f"IterativePruning: {self.monitor}={decision.value:.4f}, drop {decision.drop:.4f} "
            f"(max_drop {self.max_drop}) -> {decision.action}; sparsity {self._core.masked_sparsity():.4f}"
            + ("" if decision.step_cap is None else f", step cap {decision.step_cap:.4f}")
        )
        guard = self._core.guard
        assert guard is not None
        self._pending_logs.update(
            {
                "compress/monitor_drop": decision.drop,
                "compress/rollbacks": float(guard.rollbacks),
                "compress/step_cap": -1.0 if decision.step_cap is None else decision.step_cap,
            }
        )
        if decision.action == "keep":
            rank_zero_warn(rejected_but_kept_note(decision, self.monitor or "", self.max_drop))
        if decision.action in ("rollback", "stop"):
            self._pending_logs.update(self._sparsity_values(pl_module))
            self._metrics.restore(trainer, measured, self.monitor or "", self._core.restored_value)
            self._unscored_rollback = self._core.restored_value is None

    # ------------------------------------------------------------------ logging
    def _flush_logs(self, pl_module: pl.LightningModule, step_level: bool | None = None) -> None:
        """Log the guard's decisions at the first training hook after the validation that took them."""
        if self._pending_logs:
            values, self._pending_logs = self._pending_logs, {}
            self._log(pl_module, values, step_level)

    def _sparsity_values(self, pl_module: pl.LightningModule) -> dict[str, float]:
        return sparsity_values(self.pruner, self.config.granularity == "channel")

    def _log_sparsity(self, pl_module: pl.LightningModule, layers: bool = True) -> None:
        """Log the sparsity after an event; each layer's, unless ``layers`` is False (events in steps: Lightning
        writes step-level values every ``log_every_n_steps`` steps, so each layer's is logged at the step it writes;
        trial FU: a log call per layer at every step took half of a 240-layer N-BEATS fit)."""
        values = self._sparsity_values(pl_module)
        if not layers:
            self._layers_unlogged = True
            per_layer = layer_values(values)
            values = {k: v for k, v in values.items() if k not in per_layer}
        self._log(pl_module, values)

    def _log(self, pl_module: pl.LightningModule, values: dict[str, float], step_level: bool | None = None) -> None:
        """Log through the module: per step when pruning in steps (unless ``step_level`` says otherwise)."""
        log_values(pl_module, values, self._clock.in_steps if step_level is None else step_level)
