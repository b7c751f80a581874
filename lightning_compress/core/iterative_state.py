"""What an :class:`~.iterative.IterativePruner` state holds, and the checks a state passes before it is restored:
primitives and CPU tensors, versioned, refused whole (naming the entry) before any mask changes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .checks import is_integer, is_real
from .controller import check_guard_state
from .pruner import check_mask_shapes

__all__ = ["STATE_VERSION", "check_compatible", "check_state", "migrate_state"]

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


def check_state(
    state: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    guard_keys: Iterable[str] | None,
    importance: Any = None,
    statistic_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse a state that a pruner of these weights (``shapes``: parameter name under a mask -> its shape) and of a
    guard whose state has ``guard_keys`` (``None``: no guard) could not have written: every entry's type, names and
    shapes, before anything is restored (a trial: a refused state left the masks replaced, a mask of 0.5 scaled a
    layer, and a 17 KB Taylor accumulator of 2e9 entries was cloned into 8 GB)."""
    steps, events = state.get("steps"), state.get("events", 0)
    if not is_integer(steps) or int(steps) < 0 or not is_integer(events) or int(events) < 0:
        raise ValueError(f"`state` has steps={repr(steps)[:40]}, events={repr(events)[:40]}: both must be ints >= 0.")
    pruner = state.get("pruner")
    masks = pruner.get("masks") if isinstance(pruner, Mapping) else None
    mine = sorted(shapes)
    if not isinstance(masks, Mapping) or not set(masks) <= set(mine):
        names = sorted(map(str, masks)) if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(
            f"`state['pruner']` holds masks for {str(names)[:200]}, not for this pruner's weights "
            f"{mine[:5]}{' ...' if len(mine) > 5 else ''}: a state of another model or selection "
            "(`include`/`exclude`)."
        )
    assert isinstance(pruner, Mapping)
    check_mask_shapes(dict(masks), {n: tuple(s) for n, s in shapes.items()})
    for name, mask in masks.items():
        _check_tensor(mask, f"the mask of {name!r}", shapes[name], zero_one=True)
    rollback = pruner.get("rollback")
    if rollback is not None:
        if not isinstance(rollback, Mapping) or not set(rollback) <= set(masks):
            raise ValueError(
                f"`state['pruner']['rollback']` is not an undo record of its masks: {str(rollback)[:200]}."
            )
        for name, record in rollback.items():
            if not isinstance(record, (list, tuple)) or len(record) != 2:
                raise ValueError(
                    f"the undo record of {name!r} must be [previous mask, values], got {str(record)[:80]}."
                )
            previous, values = record
            _check_tensor(previous, f"the undo record's mask of {name!r}", shapes[name], zero_one=True)
            revived = int((previous.bool() & ~masks[name].bool()).sum())
            _check_tensor(values, f"the undo record's values of {name!r}", (revived,))
    for entry in ("grads", "rewind"):
        tensors = pruner.get(entry)
        if tensors is None:
            continue
        if not isinstance(tensors, Mapping) or not set(tensors) <= set(mine):
            raise ValueError(
                f"`state['pruner'][{entry!r}]` is not keyed by this pruner's weights: {str(tensors)[:200]}."
            )
        for name, tensor in tensors.items():
            _check_tensor(tensor, f"the {entry} of {name!r}", shapes[name])
    check = getattr(importance, "check_state", None)
    if "importance" in pruner and callable(check):  # its statistics, keyed by layer (``statistic_shapes``)
        check(pruner["importance"], shapes if statistic_shapes is None else statistic_shapes)
    guard = state.get("guard")
    if (
        guard is not None
        and guard_keys is not None
        and (not isinstance(guard, Mapping) or not set(guard) <= set(guard_keys))
    ):
        raise ValueError(f"`state['guard']` is not an accuracy guard's state: {str(guard)[:200]}.")
    if guard is not None and guard_keys is not None:
        check_guard_state(guard)
    decisions = state.get("decisions", [])  # absent before session 30
    if not isinstance(decisions, (list, tuple)) or not all(
        isinstance(d, Mapping)
        and set(d) == {"action", "value", "drop", "step_cap"}
        and d["action"] in ("baseline", "accept", "rollback", "stop", "keep")
        and is_real(d["value"])
        and is_real(d["drop"])
        and (d["step_cap"] is None or is_real(d["step_cap"]))
        for d in decisions
    ):
        raise ValueError(f"`state['decisions']` is not a list of the guard's decisions: {str(decisions)[:200]}.")
    flags = state.get("judged_quantizers")
    if flags is not None and not (isinstance(flags, (list, tuple)) and all(is_integer(f) for f in flags)):
        raise ValueError(f"`state['judged_quantizers']` is not a list of quantizer flags: {str(flags)[:200]}.")
    judged = state.get("judged")
    if judged is not None and not (
        isinstance(judged, Mapping)
        and is_real(judged.get("value"))
        and isinstance(judged.get("quantizers"), (list, tuple))
        and all(is_integer(flags) for flags in judged["quantizers"])
        and (judged.get("steps") is None or is_integer(judged["steps"]))
    ):
        raise ValueError(f"`state['judged']` is not the record of a judged evaluation: {str(judged)[:200]}.")


def check_compatible(
    state: Mapping[str, Any],
    granularity: str,
    target_sparsity: float,
    importance: str,
    schedule_end: int,
    warn: Callable[[str], None],
) -> None:
    """Refuse a checked state whose masks have another structure than this pruner's ``granularity`` (a trial:
    element masks loaded into a 2:4 pruner ended off the 2:4 pattern); say when the rest of the schedule runs to
    another target or is scored by another importance (``importance``: the class name) than the saved one's."""
    saved = state.get("granularity")
    if saved is not None and saved != granularity:
        raise ValueError(
            f"the state was saved by a pruner with granularity={saved!r}, this one has {granularity!r}: its masks do "
            "not have this pruner's structure (a trial: element masks loaded into a 2:4 pruner ended off the 2:4 "
            "pattern). Build the pruner with the saved granularity."
        )
    if int(state["steps"]) >= schedule_end:
        return
    target = state.get("target_sparsity")
    if target is not None and target != target_sparsity:
        warn(
            f"IterativePruning: the state was saved by a pruner with target_sparsity={target}, this one has "
            f"{target_sparsity}: the rest of the schedule runs to {target_sparsity}."
        )
    scored_by = state.get("importance")
    if scored_by is not None and scored_by != importance:
        warn(
            f"IterativePruning: the checkpoint's masks were scored by {scored_by}, this run scores by {importance} "
            "(the `importance` argument, or what importance='auto' picks, differs): the rest of the schedule is "
            f"pruned by {importance}. Pass the checkpoint's importance to continue as it ran."
        )


def _check_tensor(value: Any, what: str, shape: tuple[int, ...], *, zero_one: bool = False) -> None:
    """``value`` is a real tensor of ``shape`` with data (not on the meta device); ``zero_one``: only 0 and 1."""
    if not isinstance(value, Tensor) or value.is_meta or value.is_complex():
        raise ValueError(f"{what} must be a tensor with data, got {type(value).__name__}.")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(value.shape)}, this model's is {tuple(shape)}.")
    if zero_one and value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{what} holds values other than 0 and 1: a mask keeps a weight or prunes it.")
