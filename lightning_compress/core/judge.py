"""``EventJudge``: the accuracy guard of an iterative pruning run, counted in steps (pure torch).

An :class:`~.iterative.IterativePruner` with ``max_drop`` holds one. It decides whether an event due now may run (a
baseline first, one event awaiting judgement at a time, none that no evaluation would judge, none before the model
quantized as it is now was evaluated), holds the copy of the model the last evaluation judged, turns evaluation
results into decisions (:class:`~.controller.AccuracyGuard`) and rolls an event back to that copy. What the pruner owns
(masks, their undo, optimizer state) reaches it as calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .controller import AccuracyGuard, GuardDecision
from .snapshot import JudgedModel, ModelSnapshot

__all__ = ["EventJudge", "Rollback"]


@dataclass(frozen=True)
class Rollback:
    """An event :meth:`~.iterative.IterativePruner.finish` rolled back."""

    before: float  # sparsity with the event
    after: float  # sparsity without it
    whole_model: bool  # the model is the one the last evaluation judged (else: only the pruned weights went back)
    kept: bool = False  # not rolled back: no copy of the model before it (``after`` is ``before``)


class EventJudge:
    """Which events an evaluation judges, and what a rejected one returns to.

    Args:
        model: the model under pruning (the copy a rollback returns to is of it).
        max_drop, mode: the guard's settings (:class:`~.controller.AccuracyGuard`).
        warn: how warnings are reported.
    """

    def __init__(self, model: nn.Module, max_drop: float, mode: str, warn: Callable[[str], None]) -> None:
        self.guard = AccuracyGuard(max_drop, mode)
        self.decisions: list[GuardDecision] = []
        # the model as the last evaluation saw it (taken at `observe`), what a rollback returns to
        self.judged = JudgedModel(model)
        self.restored_value: float | None = None  # that value after a rollback that restored that model exactly
        self.resumed_copy = False  # the copy a rollback returns to came from a checkpoint (:meth:`load_state`)
        self.waited_for_quantization = 0  # events that waited for an evaluation of the model quantized
        self._join_next = False  # the next event runs beside the one awaiting judgement (:meth:`judgement_skipped`)
        self._saved_judgement: dict[str, Any] | None = None  # a checkpoint's `judged` entry, until adopted
        self._warn = warn

    def carry(self, previous: EventJudge) -> None:
        """Go on from the judge of an earlier run on this model: its guard and decisions."""
        self.guard, self.decisions = previous.guard, previous.decisions

    # ------------------------------------------------------------------ events
    def admit(self, t: int, judged_until: int | None, wait_for_baseline: bool, first_event: int) -> bool:
        """Whether the event due at ``t`` may run; one held back until an evaluation judges the model quantized as it
        is now is counted (:attr:`waited_for_quantization`). Raises when no baseline came before an event the caller
        does not wait for (``wait_for_baseline``; ``first_event``: when the first one was due)."""
        guard = self.guard
        if guard.baseline is None:
            if wait_for_baseline:
                return False
            raise ValueError(
                "the accuracy guard (`max_drop`) has no value before the first pruning event: evaluate and "
                f"`observe(value)` before step {first_event}, or set `max_drop=None`."
            )
        if guard.stopped or (guard.awaiting_check and not self._join_next):
            return False
        if judged_until is not None and t > judged_until:
            return False  # no evaluation before the end of the run would judge it
        if not self.judged.quantizes_alike():
            self.waited_for_quantization += 1
            return False  # quantization switched on since the last evaluation: it first judges the model so
        return True

    def copy_before_event(self, model: nn.Module) -> ModelSnapshot | None:
        """The copy a rollback of the coming event returns to, when none is held: the copy :meth:`observe` took is
        the model the last evaluation judged, and a resumed run has none yet. An event joining an unjudged one takes
        none: the copy would hold that event, which nothing judged."""
        return None if self.guard.awaiting_check or self.judged.held else ModelSnapshot(model)

    def event_applied(self, copy: ModelSnapshot | None, previous: float, now: float) -> None:
        """An event pruned from ``previous`` to ``now``; ``copy``: what :meth:`copy_before_event` took."""
        if copy is not None:  # taken now, after no evaluation: its value is not known
            self.judged.hold(copy, None)
        self.guard.event_applied(previous, now)
        self._join_next = False

    def judgement_skipped(self) -> None:
        """The evaluation that was to judge the event awaiting judgement will not come: the next event joins it."""
        self._join_next = self.guard.awaiting_check

    def moved(self) -> None:
        """An optimizer step moved the model from the judged copy."""
        self.judged.trained_since = True

    def shift_clock(self, delta: int) -> None:
        """The pruner's clock moved by ``delta`` without a step (:meth:`~.iterative.IterativePruner.set_clock`)."""
        if self.judged.steps is not None:
            self.judged.steps += delta

    # ------------------------------------------------------------------ evaluations
    def observe(
        self,
        value: float,
        steps: int,
        judged_until: int | None,
        undo: Callable[[], object],
        reached_target: Callable[[], bool],
        zero_optimizer_state: Callable[[], None],
    ) -> GuardDecision | None:
        """Feed an evaluation result at ``steps``; returns the guard's decision. A rejection undoes the event (``undo``:
        the masks before it) and puts the judged copy back."""
        guard = self.guard
        before = guard.baseline if not guard.started else None
        decision = guard.observe(value)
        self._join_next = self._join_next and guard.awaiting_check
        rolled_back = decision is not None and decision.action in ("rollback", "stop")
        if rolled_back and not self.judged.held and judged_until is not None and steps >= judged_until:
            # the last evaluation, and no copy of the model before the event (a resumed run): putting back only the
            # weights it pruned would leave a model trained without them that nothing scores (trial CI: 0.48 where
            # the rejected one scored 0.62); the scored model stays, and pruning stops
            assert decision is not None
            decision = GuardDecision("keep", decision.value, decision.drop, decision.step_cap)
            guard.stopped, rolled_back = True, False
        if decision is None and not self.judged.quantizes_alike():
            self._warn_if_quantization_costs_more(value)
        elif (
            before is not None
            and decision is not None
            and decision.action == "baseline"
            and not self.judged.quantizes_alike()
        ):
            self._warn_if_quantization_moved_the_baseline(before, value)
        self.restored_value = None
        if rolled_back:
            value_then = self.judged.value
            if self.roll_back(undo):  # the model is again the one the copy holds: the last one judged
                self.restored_value = value_then
                self.judged.steps = steps
                self.judged.trained_since = False
            zero_optimizer_state()
        if guard.stopped or (reached_target() and not guard.awaiting_check):
            self.judged.clear()  # no event follows: no copy to hold
        elif not rolled_back:
            self.judged.take(value, steps)  # what the next event's rollback returns to
        if decision is not None:
            self.decisions.append(decision)
        return decision

    def _warn_if_quantization_costs_more(self, value: float) -> None:
        """The first evaluation since quantization switched on scores the model quantized, with no event to judge:
        when that alone is beyond ``max_drop``, every event from now on is rolled back (a trial: the guard kept the
        first quantized model, 0.23 below the baseline, through every later rollback). Said, with what to change."""
        guard = self.guard
        drop = guard.drop(value)
        if guard.started and math.isfinite(drop) and drop > guard.max_drop:
            self._warn(
                f"IterativePruning: with quantization switched on the model scores {value:.4f}, {drop:.4f} from the "
                f"baseline {guard.baseline:.4f} before any new pruning event: more than `max_drop`={guard.max_drop}. "
                "Events are judged against that baseline, so each is rolled back, to this model. Raise `max_drop` "
                "to cover quantization's cost, or end pruning before quantization starts."
            )

    def _warn_if_quantization_moved_the_baseline(self, float_value: float, value: float) -> None:
        """Quantization switched on before the first pruning event: the baseline is now the quantized model's score,
        so quantization's own cost is judged by nothing (trial EH: 2-bit QAT first, the baseline fell from 0.9330 to
        0.7705 and the fit returned 0.7856 with every decision "accept", said nowhere). Said when that cost is beyond
        ``max_drop``."""
        guard = self.guard
        cost = float_value - value if guard.mode == "max" else value - float_value
        if math.isfinite(cost) and cost > guard.max_drop:
            self._warn(
                f"IterativePruning: quantization switched on before the first pruning event, and the model scores "
                f"{value:.4f}, {cost:.4f} from {float_value:.4f} before it: more than `max_drop`={guard.max_drop}. "
                f"That quantized score is now the accuracy guard's baseline: it judges what pruning costs beyond "
                "quantization, and nothing judges quantization's own cost. Quantize with more bits, or start "
                "quantization after pruning to have every event judged against the float model."
            )

    def roll_back(self, undo: Callable[[], object]) -> bool:
        """Undo the last event: the masks before it (``undo``), and the whole model as the last evaluation before the
        event saw it when this run took that copy. A run resumed from a checkpoint saved while the event awaited
        judgement has no copy: the pruned weights get their values back and the others keep their training. Returns
        whether the model is exactly the one that evaluation saw (not after a partial rollback, nor when
        quantization switched on in between)."""
        undo()  # the masks before the event (and the pruned weights' values at it)
        return self.judged.restore()  # then every tensor as the evaluation saw it (False without a copy)

    def finish(self, undo: Callable[[], object], sparsity: Callable[[], float]) -> Rollback | None:
        """At the end of training: roll back an event no evaluation judged (``sparsity``: the masks' now). Without a
        copy of the judged model the event stays (``Rollback.kept``): the weights trained with its masks since."""
        rolled = None
        if self.guard.awaiting_check:
            before = sparsity()
            if self.judged.held:
                self.roll_back(undo)
                rolled = Rollback(before, sparsity(), True)
            else:  # resumed while it awaited judgement: putting back only the weights it pruned would leave a model
                # trained without them (trial CH: 0.45 where the event's model scored 0.75); it stays, unjudged
                rolled = Rollback(before, before, False, kept=True)
            self.guard.awaiting_check = False
            self._join_next = False
        self.judged.clear()
        return rolled

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def empty_entries() -> dict[str, Any]:
        """:meth:`state_entries` of a pruner without the guard (``max_drop=None``)."""
        return {
            "guard": None, "judged": None, "join_next": False, "judged_quantizers": None, "judged_copy": None,
            "decisions": [],
        }  # fmt: skip

    def state_entries(self) -> dict[str, Any]:
        """The pruner state's entries for the guard: primitives and CPU tensors."""
        return {
            "guard": self.guard.state_dict(),
            "judged": self._judgement(),
            "join_next": self._join_next,
            "judged_quantizers": self.judged.flags(),
            "judged_copy": self._judged_copy(),
            # trial DP: a resumed fit listed only the decisions taken after the resume
            "decisions": [
                {"action": d.action, "value": d.value, "drop": d.drop, "step_cap": d.step_cap} for d in self.decisions
            ],
        }

    def _judged_copy(self) -> dict[str, Any] | None:
        """The copy a rollback returns to, for a checkpoint saved after the model moved away from it: an event awaits
        judgement, or an optimizer step ran since the evaluation (trial CM: resumed without it, the last validation's
        rejection kept a model 0.61 below the baseline; trial CN: with `every_n_steps`, steps between a validation
        and the next event). Right after the evaluation :meth:`_judgement` suffices: the model is the copy."""
        if not (self.guard.awaiting_check or self.judged.trained_since):
            return None
        return self.judged.state_dict()

    def _judgement(self) -> dict[str, Any] | None:
        """The value of the evaluation whose model the copy holds, while the model is still that one (no event
        since it), and how its quantizers stood: what :meth:`adopt_saved_judgement` needs after a resume."""
        return None if self.guard.awaiting_check else self.judged.record()

    def parse_copy(self, state: Mapping[str, Any]) -> Any:
        """A saved state's ``judged_copy`` read against this model, before anything changes (:meth:`load_state` holds
        it); ``ValueError`` naming the entry when it is not this model's or is damaged."""
        copy = state.get("judged_copy")
        if copy is None:
            return None
        try:
            return self.judged.parse(copy)
        except ValueError as err:
            raise ValueError(
                f"the pruning state's `judged_copy` (the model its last evaluation judged, which a rollback returns "
                f"to) {err}: it is not of this model, or the checkpoint is damaged. Resume from the checkpoint as it "
                "was saved, for this model."
            ) from None

    def load_state(self, state: Mapping[str, Any], parsed: Any) -> None:
        """Restore :meth:`state_entries` (checked by the pruner's state check); ``parsed``: :meth:`parse_copy`'s."""
        self._join_next = state.get("join_next") is True  # a second resume before the join (trial CH)
        if state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        self.decisions[:] = [
            GuardDecision(str(d["action"]), float(d["value"]), float(d["drop"]), _real_or_none(d["step_cap"]))
            for d in state.get("decisions", [])
        ]
        self._saved_judgement = state.get("judged")
        # events wait if quantization switched on since it
        self.judged.note_saved(self._saved_judgement, state.get("judged_quantizers"))
        # saved after the model moved from the judged one: the copy a rollback returns to, as the uninterrupted run
        # holds it
        self.resumed_copy = parsed is not None
        if parsed is not None:
            self.judged.hold_parsed(parsed)

    def adopt_saved_judgement(self, steps: int) -> bool:
        """After a resume, when nothing has trained since the checkpoint's last evaluation: take the copy a rollback
        returns to now, with that evaluation's value (see :meth:`~.iterative.IterativePruner.adopt_saved_judgement`)."""
        saved, self._saved_judgement = self._saved_judgement, None
        guard = self.guard
        if saved is None or guard.awaiting_check or guard.stopped:
            return False
        return self.judged.adopt(saved, steps)


def _real_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
