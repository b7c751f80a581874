"""State dict entries that are no tensors: a module's extra state (``get_extra_state``), which files and graphs of
weights cannot hold. nequip's training module keeps its loss and metrics' settings so, as a dict (trial GJ)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from ..core.checks import caller_level

__all__ = ["check_traceable_state", "extra_state_entries", "submodule_note", "tensor_entries", "tensor_state"]


def extra_state_entries(model: nn.Module, state: dict[str, Any] | None = None) -> dict[str, str]:
    """The entries of ``model``'s state dict (``state``, when it is at hand) that are not tensors: name -> type."""
    state = model.state_dict() if state is None else state
    return {name: type(value).__name__ for name, value in state.items() if not isinstance(value, Tensor)}


def tensor_entries(state: dict[str, Any]) -> dict[str, Tensor]:
    """The entries of a state dict that are tensors: what a compressed file holds and loads."""
    return {name: value for name, value in state.items() if isinstance(value, Tensor)}


def submodule_note(model: nn.Module, entries: dict[str, str]) -> str:
    """The child of ``model`` that holds most of its parameters and none of ``entries``, for a message
    (``"`model.net`"``): what to export instead (``module.model`` of nequip's training module); empty where there is
    none."""
    total = sum(p.numel() for p in model.parameters())
    holders = [  # most of the weights: not a leaf layer beside the network (trial GM: the input layer was offered)
        name
        for name, child in model.named_children()
        if 2 * sum(p.numel() for p in child.parameters()) > total and not any(e.startswith(f"{name}.") for e in entries)
    ]
    return f"`model.{holders[0]}`" if holders else ""


def check_traceable_state(model: nn.Module) -> None:
    """torch's ONNX exporter detaches every state dict entry of the module it traces, so a non-tensor one fails
    inside it (trial GJ: nequip's training module, ``'dict' object has no attribute 'detach'``): refused first."""
    extra = extra_state_entries(model)
    if extra:
        raise ValueError(
            f"export_onnx cannot trace {type(model).__name__}: its state dict holds entries that are not tensors "
            f"({dict(list(extra.items())[:3])}: a module's `get_extra_state`, or a `state_dict` of its own), which "
            "torch's ONNX exporter cannot "
            f"take. Export the submodule whose forward computes the outputs{_among(submodule_note(model, extra))}."
        )


def _among(child: str) -> str:
    if child:
        return f" ({child} holds most of the weights and none of them)"
    return ", one without that state (`export_onnx(model.<submodule>, ...)`, after a fit)"


def tensor_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without its entries that are not tensors, said: a compressed file stores tensors, and
    :func:`~lightning_compress.load_compressed` leaves such entries as the model it loads into has them (a fresh
    instance's own). Trial GJ: nequip's metrics keep their settings as a module's extra state; trial GK:
    neuraloperator's models add their constructor's arguments as ``_metadata`` in ``state_dict``: neither saved."""
    extra = extra_state_entries(model, state)
    if not extra:
        return state
    warnings.warn(
        f"save_compressed leaves out the state dict entries that are not tensors, {list(extra)[:3]}"
        f"{' ...' * (len(extra) > 3)} ({', '.join(sorted(set(extra.values())))}: a module's `get_extra_state`, or "
        "a `state_dict` of its own): load_compressed leaves them as the model it loads into has them.",
        UserWarning,
        stacklevel=caller_level(),
    )
    return tensor_entries(state)
