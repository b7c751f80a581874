"""``IterativePruner``: iterative pruning driven by explicit step counters, with no training framework.

It owns what a run needs: the selected weights and their mask rule, the importance, the
schedule, the accuracy guard, regrowth and rewinding. The caller only counts:

* :meth:`IterativePruner.before_optimizer_step` (optional, between ``backward`` and
  ``optimizer.step``): gradient statistics, and pruned weights' gradients zeroed;
* :meth:`IterativePruner.step` after every optimizer step: pruned weights re-zeroed if the
  gradients were not masked, the clock advanced, and an event run when one is due;
* :meth:`IterativePruner.observe` after every evaluation, when the guard is on (``max_drop``);
* :meth:`IterativePruner.finish` at the end: an event no evaluation judged is rolled back.

Time ``t`` counts steps done. Events happen at ``start_step < t <= total_steps`` every
``every_n_steps`` and at ``total_steps``, where the target is reached. With the guard, an event
must be judged by an :meth:`observe` before the next one runs; a rolled-back event halves the
step, and the pruner keeps trying at the same cadence after ``total_steps`` until the target is
reached or no step fits. The ``IterativePruning`` callback drives this object in epochs or in
optimizer steps.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .checks import check_int, check_module, is_integer, is_real
from .collectives import Collectives, TorchDistributed, broadcast_masks
from .config import PruningConfig
from .controller import AccuracyGuard, GuardDecision
from .earlier_pruning import zeros_as_masks
from .floors import FloorNotes, floored_layers
from .functional import warn_if_min_density_idle
from .importance import Importance, auto_importance_of
from .iterative_state import STATE_VERSION, check_compatible, check_state, migrate_state
from .judge import EventJudge, Rollback
from .mask_counts import pruned_count
from .nm import dense_layers_note
from .pruner import Pruner
from .rules import ChannelStructure, MaskRule, rule_for
from .schedule import PruningSchedule, step_interval
from .selection import Target, select_targets
from .sharding import is_sharded
from .wrappers import state_root

__all__ = [
    "DEFAULT_EVENTS",
    "STRUCTURED_DEFAULT_EVENTS",
    "IterativePruner",
    "Rollback",
    "default_events",
]

DEFAULT_EVENTS = 1000
"""Element granularity with ``every_n_steps=None``: about this many events over the schedule, i.e. an event
after every optimizer step when the schedule is shorter (chosen on a model zoo, see BENCHMARKS.md "Defaults on
a model zoo"; 100 before session 10)."""
STRUCTURED_DEFAULT_EVENTS = 100
"""Channel and N:M granularity with ``every_n_steps=None``: about this many events (BENCHMARKS.md "When
channels are pruned")."""


def default_events(granularity: str) -> int:
    """About how many events a schedule of ``granularity`` makes when no cadence is given."""
    return DEFAULT_EVENTS if granularity == "element" else STRUCTURED_DEFAULT_EVENTS


_TOLERANCE = 1e-9  # sparsities closer than this to the target count as the target


class IterativePruner:
    r"""Prune ``model`` step by step to ``target_sparsity`` while it trains, in a plain PyTorch loop.

    Args:
        model: the model; its selected weights are pruned in place.
        target_sparsity: fraction in [0, 1) of the selected weights (channels with
            ``granularity="channel"``) that are zero at ``total_steps``.
        total_steps: the step at which the schedule reaches the target.
        start_step: steps before the first event (the first one happens after ``start_step + every``).
        every_n_steps: steps between events. ``None``: about :func:`default_events` events over
            ``total_steps - start_step`` (1,000 for element granularity, so an event after every step of a
            shorter schedule; 100 for channels and N:M).
        rewind_step: lottery-ticket rewinding: survivors go back to their values at this step after
            every event (``<= start_step``). ``None``: off.
        judged_until: with ``max_drop``: the last step after which :meth:`observe` will be called;
            no event happens after it, since nothing would judge it. ``None``: no limit.
        example_inputs: what ``model``'s ``forward`` takes, for ``granularity="channel"`` (it is traced).
        optimizers: optimizer(s) whose state (momentum, Adam moments) of pruned weights is zeroed at
            every event; more can be given later with :meth:`attach_optimizers`.
        collectives: how processes agree (rank 0's masks are used everywhere). ``None``:
            ``torch.distributed`` when initialized.
        previous: the pruner of an earlier run on this model: its masks, guard and decisions carry on
            when they fit the selection and the model still carries them (every masked weight is zero); a
            pruner of another model object carries nothing.
        warn, info: how warnings (default :func:`warnings.warn`) and notes (default the module's logger) are
            reported.
        structure: for ``granularity="channel"``: the channel groups traced on the whole model
            (:func:`~.rules.channel_structure`); required when its weights are sharded (FSDP2: trace before
            ``fully_shard``), else traced here.
        importance, scope, schedule, granularity, include, exclude, min_density, regrow, max_drop,
        mode, seed, measure, round_to: the method, as in :class:`~.config.PruningConfig` (the callback's arguments of
        the same names; a callable ``schedule`` receives the step).

    Example:
        >>> import torch
        >>> from lightning_compress import IterativePruner, sparsity
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = IterativePruner(model, 0.8, total_steps=20, optimizers=optimizer)
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     optimizer.step()
        ...     _ = pruner.step()
        >>> round(sparsity(model), 2)
        0.8
    """

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float,
        *,
        total_steps: int,
        start_step: int = 0,
        every_n_steps: int | None = None,
        importance: str | Importance | Any = "auto",
        scope: str | None = None,
        schedule: str | Callable[[int], float] = "cubic",
        granularity: str = "element",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        min_density: float | None = None,
        regrow: float = 0.0,
        max_drop: float | None = None,
        mode: str = "max",
        seed: int = 0,
        measure: str = "channels",
        round_to: int | None = None,
        rewind_step: int | None = None,
        judged_until: int | None = None,
        example_inputs: Any = None,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        collectives: Collectives | None = None,
        previous: IterativePruner | None = None,
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        structure: ChannelStructure | None = None,
    ) -> None:
        config = PruningConfig(
            target_sparsity, importance, scope, schedule, granularity, include, exclude, min_density, regrow,
            max_drop, mode, seed, measure, round_to,
        )  # fmt: skip
        warn_if_min_density_idle(min_density, cast(str, config.scope), config.granularity)
        self._build(
            model, config, total_steps, start_step, every_n_steps, rewind_step, judged_until, example_inputs,
            optimizers, collectives, previous, warn, info, structure,
        )  # fmt: skip

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        config: PruningConfig,
        *,
        total_steps: int,
        start_step: int = 0,
        every_n_steps: int | None = None,
        rewind_step: int | None = None,
        judged_until: int | None = None,
        example_inputs: Any = None,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        collectives: Collectives | None = None,
        previous: IterativePruner | None = None,
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        structure: ChannelStructure | None = None,
    ) -> IterativePruner:
        """The same pruner from a validated :class:`~.config.PruningConfig` (what the callback holds)."""
        self = cls.__new__(cls)
        self._build(
            model, config, total_steps, start_step, every_n_steps, rewind_step, judged_until, example_inputs,
            optimizers, collectives, previous, warn, info, structure,
        )  # fmt: skip
        return self

    def _build(
        self,
        model: nn.Module,
        config: PruningConfig,
        total_steps: int,
        start_step: int,
        every_n_steps: int | None,
        rewind_step: int | None,
        judged_until: int | None,
        example_inputs: Any,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None,
        collectives: Collectives | None,
        previous: IterativePruner | None,
        warn: Callable[[str], None] | None,
        info: Callable[[str], None] | None,
        structure: ChannelStructure | None,
    ) -> None:
        check_module(model, materialized=True)
        model = state_root(model)  # a wrapper's (Fabric's) inner module: masks keyed as the model's state dict is
        if previous is not None and not isinstance(previous, IterativePruner):
            raise TypeError(f"`previous` must be an IterativePruner or None, got {type(previous).__name__}.")
        if structure is not None and not isinstance(structure, ChannelStructure):
            raise TypeError(f"`structure` must be a ChannelStructure or None, got {type(structure).__name__}.")
        for argument, hook in (("warn", warn), ("info", info)):
            if hook is not None and not callable(hook):
                kind = type(hook).__name__
                raise TypeError(f"`{argument}` must be a callable taking a message, or None, got {kind}.")
        if optimizers is not None and not isinstance(optimizers, (torch.optim.Optimizer, Iterable)):
            raise TypeError(
                "`optimizers` must be an optimizer, an iterable of optimizers or None, "
                f"got {type(optimizers).__name__}."
            )
        if config.granularity == "channel" and example_inputs is None and structure is None:
            raise ValueError(
                "`granularity`='channel' traces the model: pass `example_inputs` (a tensor, tuple or dict)."
            )
        self.config = config
        self._model = model
        self._gradients_checked = False  # whether `step` checked once that it reads gradients
        self._warn = warn or _warn
        self._info = info or logging.getLogger(__name__).info
        self.collectives: Collectives = collectives or TorchDistributed()
        targets = select_targets(model, config.include, config.exclude, module_tensors=True)
        self.selected = targets  # the selected weights (channel pruning masks only those its groups reach)
        importance = config.make_importance()
        if config.importance == "auto":
            kind = "N:M" if config.nm is not None else config.granularity
            importance, why = auto_importance_of(model, targets, kind)
            self._info(f"IterativePruning: importance='auto' scores by {why}.")
        elif not importance.scores_shards and any(is_sharded(t.param) for t in targets):
            raise ValueError(
                f"`importance`={config.importance!r} scores whole weights, but this model's are sharded (FSDP2): use "
                "importance='magnitude' or 'auto'."
            )
        rule, self.left_alone = rule_for(
            model, targets, config.granularity, config.nm, importance, str(config.scope),
            config.min_density or 0.0, example_inputs, config.measure, self.collectives, structure, config.round_to,
        )  # fmt: skip
        self._pruner = Pruner(rule, regrow=config.regrow, collectives=self.collectives)
        if self.left_alone and config.nm is not None:
            note = dense_layers_note(list(self.left_alone), config.nm[1], config.granularity)
            self._warn(f"IterativePruning: {note}")
        elif self.left_alone:
            self._info(
                "IterativePruning: channels left whole: " + "; ".join(f"{n} ({w})" for n, w in self.left_alone.items())
            )
        self.steps = 0
        self.fell_short = False  # the last event pruned less than it asked for (``min_density`` floors)
        self.events = 0
        self.initial_sparsity = 0.0  # what the schedule starts from: a model pruned before (:meth:`keep_zeros`)
        self.left_unmasked: list[str] = []  # weights :meth:`keep_zeros` left to train back
        # with ``max_drop``: which events may run, the model a rollback returns to, the decisions
        self.judge = None if config.max_drop is None else EventJudge(model, config.max_drop, config.mode, self._warn)
        self.optimizers: list[torch.optim.Optimizer] = []
        self._grads_masked = False
        self._floor_notes = FloorNotes(config.min_density, self._warn, self._info)
        if previous is not None:
            self._continue(previous)
        self.attach_optimizers(optimizers)
        self.set_schedule(
            total_steps=total_steps, start_step=start_step, every_n_steps=every_n_steps, rewind_step=rewind_step,
            judged_until=judged_until,
        )  # fmt: skip
        if self.guard is not None and self.judged_until is not None and self.judged_until < self.schedule.end:
            self._warn(  # a trial: the run ended at 0.787 of 0.9 without a word
                f"IterativePruner: `judged_until`={self.judged_until} is before the schedule's end (`total_steps`="
                f"{self.schedule.end}): the event at {self.judged_until} prunes to the target, and the events after "
                "it are skipped, since no evaluation would judge them. End the schedule by then, or evaluate later."
            )

    def set_schedule(
        self,
        *,
        total_steps: int,
        start_step: int = 0,
        every_n_steps: int | None = None,
        rewind_step: int | None = None,
        judged_until: int | None = None,
        wait_for_baseline: bool = False,
    ) -> None:
        """Set when events happen (the arguments of the same names above); before the first event, e.g. once
        the length of an epoch is known. The schedule's curve and target stay those of the config.

        ``wait_for_baseline``: with ``max_drop``, an event due before the first :meth:`observe` is skipped
        (the caller evaluates on its own schedule, as the callback's Trainer does) instead of raising.
        """
        self.wait_for_baseline = bool(wait_for_baseline)
        start = check_int(start_step, "start_step") or 0
        end = check_int(total_steps, "total_steps", minimum=1) or 1
        if end <= start:
            raise ValueError(f"`total_steps`={total_steps} must be greater than `start_step`={start_step}.")
        every = check_int(every_n_steps, "every_n_steps", minimum=1, optional=True)
        rewind = check_int(rewind_step, "rewind_step", optional=True)
        if rewind is not None and rewind > start:
            raise ValueError(
                f"`rewind_step`={rewind_step} must be <= `start_step`={start_step}: the weights to rewind to "
                "must be saved before the first pruning event."
            )
        self.judged_until = check_int(judged_until, "judged_until", optional=True)
        self.rewind_step = rewind
        config = self.config
        every = every or step_interval(end - start, default_events(self.config.granularity))
        self.schedule = PruningSchedule(
            config.schedule, config.target_sparsity, start, end, every, self.initial_sparsity
        )
        if callable(config.schedule):  # a value out of [0, 1) is reported now, not at its event
            for t in self.schedule.events():
                self.schedule.sparsity_at(t)
        self._save_rewind_point_if_due()

    def keep_zeros(self) -> float | None:
        """Before a fresh run's first step, on a model pruned before (``prune_``, an earlier run): the zeros of every
        selected weight become its mask, and the schedule starts from their sparsity (Zhu & Gupta's ``s_i``) instead
        of from a dense model, whose first events kept more weights than the model had and let its zeros train back
        (trial CT: 0.80 sparse became 0.27 after the first step). Left unmasked, and named in
        :attr:`left_unmasked`: weights whose zeros are an initialization (:func:`initialized_zeros`; a weight pruned
        whole too), and layers under the ``min_density`` floor (trial CW: one kept at 0.06% density was then said to
        be held at the floor). Only element granularity, global scope (layer scope prunes every layer to one
        sparsity, which a model pruned before does not have: trial CX), whole weights, and up to the target (a model
        pruned to it is a weight or so over: trial CX's 0.90024 for 0.9). Returns the sparsity the schedule starts
        from, or ``None`` (nothing changed)."""
        self.left_unmasked = []
        if self.steps or self.events or self._pruner.masks or str(self.config.granularity) != "element":
            return None
        if self.config.scope != "global" or any(is_sharded(t.param) for t in self.targets):
            return None
        masks, zeros, self.left_unmasked = zeros_as_masks(self.targets, self._pruner.min_density)
        initial = self._within_target(zeros)
        if not masks or initial is None or not self._pruner.adopt(masks):
            return None
        self._start_from(initial)
        return initial

    def continue_masks(self) -> float | None:
        """Before the first step of a run that took the masks of the one before (one instance, a second fit of the
        same model): the schedule starts from their sparsity (trial CW: from a dense model's 0, it sat at 0.835 for
        40 of 66 steps, then rushed to 0.9). Returns it, or ``None`` (no masks taken, or past the target)."""
        if self.steps or self.events or not self._pruner.masks or self.initial_sparsity:
            return None
        initial = self._within_target(self.masked_sparsity())
        if initial is not None:
            self._start_from(initial)
        return initial

    def _within_target(self, sparsity: float) -> float | None:
        """``sparsity`` as a schedule's start: at most the target, which a model pruned to it exceeds by a weight or
        so (0.1% of the weights allowed); ``None`` further past it."""
        target = self.target_sparsity
        return None if sparsity > target + 1e-3 else min(sparsity, target)

    def _start_from(self, initial: float) -> None:
        self.initial_sparsity = initial
        schedule = self.schedule
        self.schedule = PruningSchedule(
            schedule.kind, schedule.target, schedule.start, schedule.end, schedule.every, initial
        )

    def _save_rewind_point_if_due(self) -> None:
        if self.rewind_step is not None and self.steps == self.rewind_step and not self._pruner.has_rewind_point:
            self._pruner.save_rewind_point()

    def _continue(self, previous: IterativePruner) -> None:
        # another model: its masks and baseline say nothing of this one. The same weights count as the same model
        # (trial FX: scvi-tools and GluonTS wrap the same network in a new LightningModule at every `train()`)
        same = previous._model is self._model or {id(t.param) for t in previous.selected} == {
            id(t.param) for t in self.selected
        }
        if not same:
            return
        # the masks under this model's names for the same weights (trial FY: the network under another attribute)
        names = {id(t.param): t.param_name for t in self.selected}
        renamed = {names.get(id(t.param), t.param_name): t.param_name for t in previous.selected}
        masks = previous._pruner.masks
        adopted = {new: masks[old] for new, old in renamed.items() if old in masks}
        if self._pruner.adopt(adopted) and self.judge is not None and previous.judge is not None:
            self.judge.carry(previous.judge)

    def attach_optimizers(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> None:
        """Zero the state of pruned weights in these optimizers now and at every event."""
        if optimizers is None:
            return
        new = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        for optimizer in new:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"`optimizers` must hold torch.optim.Optimizer objects, got {type(optimizer).__name__}."
                )
            if all(optimizer is not known for known in self.optimizers):
                self.optimizers.append(optimizer)
                self._pruner.zero_optimizer_state(optimizer)

    # ------------------------------------------------------------------ what the run looks like now
    @property
    def guard(self) -> AccuracyGuard | None:
        """The accuracy guard's state (baseline, step cap, whether an event awaits judgement); ``None`` without
        ``max_drop``."""
        return None if self.judge is None else self.judge.guard

    @property
    def decisions(self) -> list[GuardDecision]:
        """The guard's decisions so far (empty without ``max_drop``)."""
        return [] if self.judge is None else self.judge.decisions

    @property
    def restored_value(self) -> float | None:
        """After the last :meth:`observe`'s rollback: the value of the evaluation whose model it restored exactly."""
        return None if self.judge is None else self.judge.restored_value

    @property
    def resumed_copy(self) -> bool:
        """Whether the copy a rollback returns to came from a checkpoint (:meth:`load_state_dict`)."""
        return self.judge is not None and self.judge.resumed_copy

    @property
    def waited_for_quantization(self) -> int:
        """Event times that waited for an evaluation of the model as quantization switched it."""
        return 0 if self.judge is None else self.judge.waited_for_quantization

    @property
    def judged_value(self) -> float | None:
        """What the evaluation gave whose model a rollback would return to (``None``: no such copy, or one taken
        without an evaluation)."""
        return None if self.judge is None else self.judge.judged.known_value

    @property
    def target_sparsity(self) -> float:
        return self.config.target_sparsity

    @property
    def targets(self) -> list[Target]:
        """The weights (and, for channels, the biases and norms) under masks."""
        return self._pruner.targets

    @property
    def rule(self) -> MaskRule:
        return self._pruner.rule

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current masks (bool, ``True`` = kept), keyed by parameter name (this process's shards of sharded
        weights: :meth:`state_dict` gathers them whole)."""
        return self._pruner.bool_masks()

    def units(self) -> tuple[int, int]:
        """(pruned, total) in the rule's unit: weights, or channels."""
        return self._pruner.units()

    def masked_sparsity(self) -> float:
        """Fraction of the selected units under a mask."""
        return self._pruner.masked_sparsity()

    @property
    def has_rewind_point(self) -> bool:
        return self._pruner.has_rewind_point

    @property
    def rewind_point(self) -> dict[str, Tensor] | None:
        """The weights survivors go back to after every event (lottery-ticket rewinding), if saved."""
        return self._pruner.rewind_point

    @property
    def held_at_floor(self) -> list[str]:
        """The layers (channel groups, for ``granularity="channel"``) the ``min_density`` floor holds back now."""
        if self.config.granularity == "channel":
            return cast(Any, self.rule).at_floor(self._pruner.masks)
        return self._floored_layers()

    def _floored_layers(self) -> list[str]:
        """The layers at their ``min_density`` floor now (global scope, element granularity)."""
        config = self.config
        if config.scope != "global" or not config.min_density or config.granularity != "element":
            return []
        return floored_layers(self.targets, self._pruner.pruned_counts(), config.min_density)

    def reached_target(self) -> bool:
        """Whether as many units are pruned as the target asks for (rounded as the rules round it)."""
        pruned, total = self.units()
        return pruned >= pruned_count(self.target_sparsity, total)

    def events_remain(self) -> bool:
        """Whether an event may still happen (Taylor and regrowth statistics are gathered until then)."""
        if self.guard is not None and self.guard.stopped:
            return False
        if self.steps < self.schedule.end:
            return True
        return self.guard is not None and not self.reached_target()

    # ------------------------------------------------------------------ the training step
    def before_optimizer_step(self, params: set[int] | None = None) -> None:
        """Between ``backward`` and ``optimizer.step``: gather gradient statistics, zero pruned weights' gradients.

        ``params``: ids of the parameters one optimizer steps (``None``: all), e.g.
        ``{id(p) for group in optimizer.param_groups for p in group["params"]}``.
        """
        # on every step: the type and one element, not the whole set
        if params is not None and (not isinstance(params, (set, frozenset)) or not is_integer(next(iter(params), 0))):
            raise TypeError(
                "`params` must be a set of parameter ids, e.g. `{id(p) for group in optimizer.param_groups for p in "
                f"group['params']}}`, or None (all), got {type(params).__name__}."
            )
        if self.events_remain():
            self._pruner.observe_gradients(params)
        self._pruner.mask_gradients(params)
        self._grads_masked = True
        self._moved()

    def step(self) -> bool:
        """After every optimizer step: advance the clock by one and run an event if one is due.

        Without :meth:`before_optimizer_step` this step, the gradients are read here, and pruned weights
        the optimizer moved, and their optimizer state, are zeroed again; pruned weights are zeroed again too when
        no optimizer is attached (``optimizers=``), whose momentum could move them. Returns whether an event
        changed the masks.
        """
        if not self._grads_masked:
            if self.events_remain():
                self._check_gradients_once()
                self._pruner.observe_gradients()
            self._pruner.apply()
            self._zero_optimizer_state()
        elif not self.optimizers:  # masked gradients, but momentum no one zeroed moved pruned weights: zero them
            self._pruner.apply()
        self._grads_masked = False
        self._moved()
        return self.advance_to(self.steps + 1)

    def _moved(self) -> None:
        if self.judge is not None:
            self.judge.moved()  # the model moves from the judged copy

    def _check_gradients_once(self) -> None:
        """Gradient scores read in :meth:`step` need the gradients still there: after ``zero_grad(set_to_none=False)``
        every score is 0 and the masks follow the weights' order (a trial: chance accuracy). Said once."""
        if self._gradients_checked or not self.rule.importance.accumulates:
            return
        self._gradients_checked = True
        grads = [t.param.grad for t in self.targets if t.is_weight]
        if grads and all(g is not None and not bool(g.any()) for g in grads):
            self._warn(
                "IterativePruner: every gradient was zero when `step()` read it for importance="
                f"{type(self.rule.importance).__name__}: call `step()` before `optimizer.zero_grad()`, or "
                "`before_optimizer_step()` between `backward()` and `optimizer.step()`."
            )

    def advance_to(self, t: int) -> bool:
        """Set the clock to ``t`` steps done (``t > steps``) and run the event due at ``t``, if any."""
        check_int(t, "t")
        if t <= self.steps:
            return False
        self.steps = t
        self._save_rewind_point_if_due()
        if not self._event_due(t):
            return False
        judge = self.judge
        first_event = self.schedule.start + self.schedule.every
        if judge is not None and not judge.admit(t, self.judged_until, self.wait_for_baseline, first_event):
            return False
        guard = self.guard
        previous = self.masked_sparsity()
        last = t > self.schedule.end or (guard is not None and t == self.judged_until)  # no later event is judged
        wanted = self.target_sparsity if last else self.schedule.sparsity_at(t)
        if guard is not None:
            wanted = guard.limit(previous, wanted)
        regrow = 0.0 if wanted >= self.target_sparsity - _TOLERANCE else None  # the last event is an exact top-k
        # replicated weights (DDP) take rank 0's masks; sharded ones are decided from counts every process shares
        sync = None if self.collectives.world_size == 1 or self._pruner.sharded else self._broadcast
        joining = guard is not None and guard.awaiting_check
        copy = None if judge is None else judge.copy_before_event(self._model)
        if not self._pruner.prune_to(wanted, keep_undo=guard is not None, sync=sync, regrow=regrow, join_undo=joining):
            # nothing changed: floors (or whole quantization blocks) may hold every unit back (trial CA)
            self.fell_short = self.masked_sparsity() < wanted - 1.0 / max(1, self._pruner.total)
            return False
        self._zero_optimizer_state()
        now = self.masked_sparsity()
        self.fell_short = now < wanted - 1.0 / max(1, self._pruner.total)  # floors (or units) held this event back
        if judge is not None:
            judge.event_applied(copy, previous, now)
        self.events += 1
        self._floor_notes.note(self._floored_layers(), now, wanted, self.fell_short)
        return True

    def judgement_skipped(self) -> None:
        """The evaluation that was to judge the event awaiting judgement will not come (a resumed fit: Lightning skips
        the validation of the batch its checkpoint was saved after): the next event runs beside it, on the schedule,
        and the next evaluation judges both; a rollback returns to the masks before the first."""
        if self.judge is not None:
            self.judge.judgement_skipped()

    def set_clock(self, t: int) -> None:
        """Set the clock to ``t`` steps done without running an event: a resumed run whose steps count otherwise
        (another number of devices or batch size makes other optimizer steps per epoch)."""
        check_int(t, "t")
        if self.judge is not None:
            self.judge.shift_clock(t - self.steps)
        self.steps = t

    def _event_due(self, t: int) -> bool:
        schedule = self.schedule
        if schedule.is_event(t):
            return True
        if self.guard is None or t <= schedule.start or self.reached_target():
            return False
        # the last time an evaluation can still judge an event is one, off the cadence too (a trial: with
        # `every_n_steps=2` the catch-up event fell one step past it, and the fit ended at 0.785 of 0.8)
        return t == self.judged_until or (  # with the guard: catch up at the same cadence until the target
            t > schedule.end and (t - schedule.start) % schedule.every == 0
        )

    def _broadcast(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return broadcast_masks(masks, self.collectives)

    def _zero_optimizer_state(self) -> None:
        for optimizer in self.optimizers:
            self._pruner.zero_optimizer_state(optimizer)

    # ------------------------------------------------------------------ the guard
    def observe(self, value: float) -> GuardDecision | None:
        """Feed an evaluation result (``mode="max"``: higher is better) to the guard; returns its decision.

        The last value before the first event is the baseline; the first one after an event judges
        it: more than ``max_drop`` worse rolls it back at once and halves the step.
        """
        if self.judge is None:
            raise ValueError("`observe` feeds the accuracy guard, which is off: set `max_drop` to turn it on.")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not is_real(value):
            raise TypeError(
                f"`value` must be a number (the evaluation result), got {type(value).__name__} ({value!r})."
            )
        return self.judge.observe(
            float(value), self.steps, self.judged_until, self._pruner.undo, self.reached_target,
            self._zero_optimizer_state,
        )  # fmt: skip

    def finish(self) -> Rollback | None:
        """At the end of training: roll back an event no evaluation judged and re-apply the masks.

        Returns what was rolled back, if anything. Without a copy of the model the last evaluation judged (a run
        resumed from a state saved while the event awaited judgement) the event stays (``Rollback.kept``): the
        weights trained with its masks since.
        """
        rolled = None if self.judge is None else self.judge.finish(self._pruner.undo, self.masked_sparsity)
        self._pruner.apply()
        return rolled

    def apply(self) -> None:
        """Zero every pruned weight again (after something outside the optimizer wrote weights)."""
        self._pruner.apply()

    def reapply_revived(self) -> list[str]:
        """Zero again the pruned weights found nonzero, which an optimizer step this pruner never saw (a step
        without :meth:`step` after it) wrote; returns their names (empty when the masks held)."""
        revived = self._pruner.revived()
        if revived:
            self._pruner.apply()
        return revived

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Primitives and CPU tensors: the clock, the masks (with undo, rewind and statistics) and the guard."""
        guarded = EventJudge.empty_entries() if self.judge is None else self.judge.state_entries()
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "events": self.events,
            "fell_short": self.fell_short,
            "pruner": self._pruner.state_dict(),
            "importance": type(self.rule.importance).__name__,  # what scored the masks ("auto" resolved)
            "granularity": str(self.config.granularity),  # what structure the masks have
            "target_sparsity": self.target_sparsity,
            "initial_sparsity": self.initial_sparsity,
            **guarded,
        }

    def adopt_saved_judgement(self) -> bool:
        """After :meth:`load_state_dict` and the model's own state, when nothing has trained since the checkpoint's
        last evaluation (saved right after an :meth:`observe`): take the copy a rollback returns to now, with that
        evaluation's value, as the uninterrupted run holds it; without it, a rollback after the resume returns to the
        model of the next event with no score. Returns whether it did: not when the clock moved after that
        evaluation, an event awaits judgement, or the quantizers stood otherwise than they do now."""
        return self.judge is not None and self.judge.adopt_saved_judgement(self.steps)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (version 1, the callback's format before this class, is migrated)."""
        state = migrate_state(state)
        guard_keys = None if self.guard is None else self.guard.state_dict()
        shapes = {t.param_name: tuple(t.param.shape) for t in self.targets}
        statistics = {t.key: tuple(t.param.shape) for t in self.targets}  # channels': biases and norms too
        check_state(state, shapes, guard_keys, self.rule.importance, statistics)  # all of it before anything changes
        check_compatible(
            state, str(self.config.granularity), self.target_sparsity, type(self.rule.importance).__name__,
            self.schedule.end, self._warn,
        )  # fmt: skip
        initial = state.get("initial_sparsity", 0.0)  # absent before session 28: a schedule from a dense model
        if not is_real(initial) or not 0.0 <= float(initial) <= self.target_sparsity:
            raise ValueError(
                f"the pruning state's `initial_sparsity`={repr(initial)[:40]} is not a sparsity in "
                f"[0, {self.target_sparsity}]: the checkpoint is damaged."
            )
        initial = float(initial)
        # read before anything changes; held once the rest is loaded
        parsed = None if self.judge is None else self.judge.parse_copy(state)
        self._pruner.load_state_dict(state["pruner"])
        self.steps = max(int(state["steps"]), 0)
        self.events = int(state.get("events", 0))
        self.fell_short = state.get("fell_short") is True  # what the end-of-fit note reads (trial CB)
        self._start_from(initial)  # the schedule of a model pruned before starts from its sparsity
        if self.judge is not None:
            self.judge.load_state(state, parsed)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
