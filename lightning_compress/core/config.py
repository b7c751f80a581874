"""``PruningConfig``: what an iterative pruning run does, validated once, before any model is touched.

Shared by :class:`~.iterative.IterativePruner` (plain PyTorch) and the ``IterativePruning``
callback, so both accept and refuse exactly the same arguments. *When* events happen (steps or
epochs) is not part of it: that is the caller's clock.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checks import check_choice, check_float, check_int
from .functional import (
    check_granularity,
    check_measure,
    check_round_to,
    default_scope,
    resolve_min_density,
    validate_fraction,
)
from .importance import Importance, resolve_importance
from .schedule import SCHEDULES
from .selection import normalize_patterns

__all__ = ["PruningConfig"]


@dataclass(frozen=True)
class PruningConfig:
    """The method of an iterative pruning run (see ``IterativePruning`` for every argument).

    ``max_drop=None`` turns the accuracy guard off; a float turns it on (the caller feeds it
    evaluation results). ``min_density=None`` resolves to ``0.1 * (1 - target_sparsity)``.
    ``scope=None`` resolves to ``"layer"`` for ``granularity="channel"``, ``"global"`` otherwise.
    """

    target_sparsity: float
    importance: str | Importance | Any = "auto"
    scope: str | None = None
    schedule: str | Callable[[int], float] = "cubic"
    granularity: str = "element"
    include: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    min_density: float | None = None
    regrow: float = 0.0
    max_drop: float | None = None
    mode: str = "max"
    seed: int = 0
    measure: str = "channels"
    round_to: int | None = None
    nm: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalized values are written once, here
        target = validate_fraction(self.target_sparsity, "target_sparsity")
        set_(self, "target_sparsity", target)
        set_(self, "seed", check_int(self.seed, "seed") or 0)
        resolve_importance(self.importance, self.seed)  # validates
        granularity, nm = check_granularity(self.granularity, target, self.importance)
        set_(self, "nm", nm)
        check_measure(self.measure, granularity)
        check_round_to(self.round_to, granularity)
        set_(self, "regrow", validate_fraction(self.regrow, "regrow"))
        if self.regrow > 0 and granularity != "element":
            raise ValueError(
                f"`regrow`={self.regrow} exchanges single weights: it needs granularity='element', "
                f"got `granularity`={granularity!r}."
            )
        scope = default_scope(self.scope, granularity)
        set_(self, "scope", scope)
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES and "." in self.schedule:
            set_(self, "schedule", _imported(self.schedule, "schedule"))  # a dotted path, as LightningCLI passes it
        if not callable(self.schedule):
            check_choice(self.schedule, "schedule", SCHEDULES)
        if self.regrow > 0 and self.schedule == "one_shot":  # a trial: the masks were regrow=0's, at 4 B per weight
            warnings.warn(
                f"`regrow`={self.regrow} does nothing with schedule='one_shot': regrowth exchanges weights at the "
                "events after the first, and a one-shot schedule has one. Use a gradual schedule, or leave `regrow` "
                "at 0.",
                UserWarning,
                stacklevel=3,
            )
        set_(self, "include", normalize_patterns(self.include, "include"))
        set_(self, "exclude", normalize_patterns(self.exclude, "exclude"))
        set_(self, "min_density", resolve_min_density(self.min_density, target, scope, "target_sparsity"))
        if self.max_drop is not None:
            set_(self, "max_drop", check_float(self.max_drop, "max_drop"))
        check_choice(self.mode, "mode", ("max", "min"))

    def make_importance(self) -> Importance:
        """A fresh importance object (the user's own object is returned as is)."""
        return resolve_importance(self.importance, self.seed)

    def identity(self) -> dict[str, object]:
        """What tells two runs apart (a callback's checkpoint key): no timing, no guard settings."""
        importance = self.importance if isinstance(self.importance, str) else type(self.importance).__name__
        # "auto" keeps the key of "magnitude", the default before it: checkpoints written then still resume
        importance = "magnitude" if importance == "auto" else importance
        return {
            "target_sparsity": self.target_sparsity,
            "importance": importance,
            "scope": self.scope,
            "include": self.include,
            "exclude": self.exclude,
            **({} if self.granularity == "element" else {"granularity": self.granularity}),
            **({} if self.measure == "channels" else {"measure": self.measure}),
            **({} if self.round_to is None else {"round_to": self.round_to}),
        }

    def describe(self) -> dict[str, object]:
        """Primitive values for logs and hyperparameters."""
        return {
            "target_sparsity": self.target_sparsity,
            "importance": str(self.importance),
            "scope": self.scope,
            "schedule": self.schedule if isinstance(self.schedule, str) else _dotted(self.schedule),
            "granularity": self.granularity,
            "measure": self.measure,
            "round_to": self.round_to,
        }


def _dotted(function: Any) -> str:
    """A callable's dotted name (``my_module.half``), as LightningCLI takes it back; not its address (trial CP)."""
    name = getattr(function, "__qualname__", None)
    return str(function) if name is None else f"{getattr(function, '__module__', None) or '?'}.{name}"


def _imported(path: str, argument: str) -> Any:
    """The callable a dotted path names (``"my_module.half"``): LightningCLI passes a callable argument so."""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"`{argument}`={path!r} is not one of {SCHEDULES}, and as a dotted path it names nothing importable "
            f"({err})."
        ) from None
    if not callable(found):
        raise ValueError(f"`{argument}`={path!r} names {type(found).__name__}, not a callable.")
    return found
