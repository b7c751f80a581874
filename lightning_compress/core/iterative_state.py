"""What an :class:`~.iterative.IterativePruner` state holds, and the checks a state passes before it is restored:
primitives and CPU tensors, versioned, refused whole (naming the entry) before any mask changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .checks import is_integer

__all__ = ["STATE_VERSION", "check_state", "migrate_state"]

STATE_VERSION = 2


def migrate_state(state: Any) -> Mapping[str, Any]:
    """``state`` in this version's form: version 1 (the callback's format before ``IterativePruner``) is migrated;
    anything else is refused."""
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a dict from `state_dict()`, got {type(state).__name__}.")
    version = state.get("version")
    if version == 1:
        return {**state, "steps": state.get("last_t"), "events": 0}
    if version != STATE_VERSION:
        raise ValueError(f"IterativePruning state version {version!r} is not supported (expected {STATE_VERSION}).")
    return state


def check_state(state: Mapping[str, Any], weights: Iterable[str], guard_keys: Iterable[str] | None) -> None:
    """Refuse a state that a pruner of these ``weights`` (parameter names under masks) and of a guard whose state
    has ``guard_keys`` (``None``: no guard) could not have written."""
    steps, events = state.get("steps"), state.get("events", 0)
    if not is_integer(steps) or int(steps) < 0 or not is_integer(events) or int(events) < 0:
        raise ValueError(f"`state` has steps={steps!r}, events={events!r}: both must be ints >= 0.")
    pruner = state.get("pruner")
    masks = pruner.get("masks") if isinstance(pruner, Mapping) else None
    mine = sorted(set(weights))
    if not isinstance(masks, Mapping) or not set(masks) <= set(mine):
        names = sorted(masks) if isinstance(masks, Mapping) else masks
        raise ValueError(
            f"`state['pruner']` holds masks for {str(names)[:200]}, not for this pruner's weights "
            f"{mine[:5]}{' ...' if len(mine) > 5 else ''}: a state of another model or selection "
            "(`include`/`exclude`)."
        )
    guard = state.get("guard")
    if (
        guard is not None
        and guard_keys is not None
        and (not isinstance(guard, Mapping) or not set(guard) <= set(guard_keys))
    ):
        raise ValueError(f"`state['guard']` is not an accuracy guard's state: {str(guard)[:200]}.")
