"""Sparsity schedules: pure functions of training time.

Time ``t`` counts completed units (epochs, or optimizer steps in step mode). Pruning events
happen at ``start < t <= end`` every ``every`` units, plus one at ``t == end``; the sparsity at
an event is ``curve(progress)`` with ``progress = (t - start) / (end - start)``, so the target is
reached exactly at ``end``. In epoch mode ``t = current_epoch + 1`` at the end of an epoch:
pruning happens at the end of epochs ``start_epoch ... end_epoch - 1`` (0-indexed); in step mode (the callback's
default) between the optimizer steps of those epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .checks import is_integer, is_real

__all__ = ["SCHEDULES", "PruningSchedule", "schedule_curve", "step_interval"]

SCHEDULES = ("cubic", "linear", "geometric", "one_shot")


def schedule_curve(kind: str, target: float, progress: float, initial: float = 0.0) -> float:
    """Sparsity of a built-in schedule at ``progress`` in [0, 1] (clamped), from ``initial`` (``s_i``: the sparsity
    of the model the schedule starts from, 0 for a dense one) to ``target`` (``s_f``).

    * ``cubic``: Zhu & Gupta 2017, ``s_f + (s_i - s_f)(1 - progress)^3``.
    * ``linear``: ``s_i + (s_f - s_i) progress``.
    * ``geometric``: the same fraction of the *remaining* weights at every step,
      ``1 - (1 - s_i)((1 - s_f) / (1 - s_i))^progress`` ("repeat until the ratio is reached").
    * ``one_shot``: ``s_f`` from the first event on.
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "cubic":
        return target + (initial - target) * (1.0 - p) ** 3
    if kind == "linear":
        return initial + (target - initial) * p
    if kind == "geometric":
        return 1.0 - (1.0 - initial) * ((1.0 - target) / (1.0 - initial)) ** p
    if kind == "one_shot":
        return target if p > 0 else initial
    raise ValueError(f"`schedule`={kind!r} is not one of {SCHEDULES} or a callable.")


def step_interval(window_steps: int, events: int) -> int:
    """Optimizer steps between events so that a window of ``window_steps`` holds about ``events`` of them."""
    if events < 1:
        raise ValueError(f"`events`={events} must be at least 1.")
    return max(1, window_steps // events)


@dataclass(frozen=True)
class PruningSchedule:
    """When to prune and how much.

    Args:
        kind: a name in :data:`SCHEDULES` or a callable ``time -> sparsity`` (called with the
            0-indexed epoch that just ended, or the global step in step mode): the path before ``end``,
            capped at ``target``; ``target`` is reached at ``end`` whatever it returns.
        target: final sparsity in [0, 1).
        start: ``t`` before the first event (first event at ``start + every``, capped at end).
        end: ``t`` of the last event, where ``target`` is reached.
        every: units between events.
        initial: the sparsity the schedule starts from (``s_i``): 0 for a dense model, the model's own for one
            pruned before; a callable's values below it are raised to it.
    """

    kind: str | Callable[[int], float]
    target: float
    start: int
    end: int
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if not callable(self.kind) and self.kind not in SCHEDULES:
            raise ValueError(f"`kind`={self.kind!r} is not one of {SCHEDULES} or a callable.")
        if not is_real(self.target):
            raise TypeError(f"`target` must be a float in [0, 1), got {type(self.target).__name__} ({self.target!r}).")
        target = float(self.target)
        object.__setattr__(self, "target", target)
        if not 0.0 <= target < 1.0:
            raise ValueError(f"`target`={target} is outside [0, 1).")
        for argument in ("start", "end", "every"):
            value = getattr(self, argument)
            if not is_integer(value):
                raise TypeError(f"`{argument}` must be an int, got {type(value).__name__} ({value!r}).")
            object.__setattr__(self, argument, int(value))
        if self.start < 0:
            raise ValueError(f"`start`={self.start} must be >= 0.")
        if self.end <= self.start:
            raise ValueError(f"`end`={self.end} must be greater than `start`={self.start}.")
        if self.every < 1:
            raise ValueError(f"`every`={self.every} must be >= 1.")
        if not is_real(self.initial) or not 0.0 <= float(self.initial) <= target:
            raise ValueError(f"`initial`={self.initial!r} must be a float in [0, `target`={target}].")
        object.__setattr__(self, "initial", float(self.initial))

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens at time ``t``."""
        return self.start < t <= self.end and ((t - self.start) % self.every == 0 or t == self.end)

    def events(self) -> list[int]:
        """All event times, in order."""
        return [t for t in range(self.start + 1, self.end + 1) if self.is_event(t)]

    def sparsity_at(self, t: int, user_time: int | None = None) -> float:
        """Scheduled sparsity after the event at ``t`` (pure; ``target`` from ``end`` on).

        ``user_time`` is what a callable schedule receives (defaults to ``t``).
        """
        if t <= self.start:
            return self.initial
        if t >= self.end:
            return self.target  # a callable's too: it draws the path, the target is the target
        if callable(self.kind):
            returned = self.kind(t if user_time is None else user_time)
            if not is_real(returned) or not math.isfinite(returned):
                raise TypeError(f"the `schedule` callable returned {returned!r}; it must return a float in [0, 1).")
            value = float(returned)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"the `schedule` callable returned {value}; sparsity must be in [0, 1).")
            return max(min(value, self.target), self.initial)
        return schedule_curve(self.kind, self.target, (t - self.start) / (self.end - self.start), self.initial)
