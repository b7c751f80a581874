"""State dict entries that are no tensors: a module's extra state (``get_extra_state``), which files and graphs of
weights cannot hold. nequip's training module keeps its loss and metrics' settings so, as a dict (trial GJ)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["check_storable_state", "check_traceable_state", "extra_state_entries", "submodule_note"]


def extra_state_entries(model: nn.Module, state: dict[str, Any] | None = None) -> dict[str, str]:
    """The entries of ``model``'s state dict (``state``, when it is at hand) that are not tensors: name -> type."""
    state = model.state_dict() if state is None else state
    return {name: type(value).__name__ for name, value in state.items() if not isinstance(value, Tensor)}


def submodule_note(model: nn.Module, entries: dict[str, str]) -> str:
    """The children of ``model`` that hold parameters and none of ``entries``, for a message (``"`model.net`"``): what
    to save or export instead (``module.model`` of nequip's training module); empty where there is none."""
    holders = [
        name
        for name, child in model.named_children()
        if any(True for _ in child.parameters()) and not any(e.startswith(f"{name}.") for e in entries)
    ]
    if not holders:
        return ""
    return ", ".join(f"`model.{name}`" for name in holders[:3])


def check_traceable_state(model: nn.Module) -> None:
    """torch's ONNX exporter detaches every state dict entry of the module it traces, so a non-tensor one fails
    inside it (trial GJ: nequip's training module, ``'dict' object has no attribute 'detach'``): refused first."""
    extra = extra_state_entries(model)
    if extra:
        raise ValueError(
            f"export_onnx cannot trace {type(model).__name__}: its state dict holds entries that are not tensors "
            f"({dict(list(extra.items())[:3])}: a module's `get_extra_state`), which torch's ONNX exporter cannot "
            f"take. Export the submodule whose forward computes the outputs{_among(submodule_note(model, extra))}."
        )


def _among(children: str) -> str:
    return f" (among those holding the weights: {children})" if children else ""


def check_storable_state(model: nn.Module, state: dict[str, Any] | None = None) -> None:
    """A compressed file stores tensors: a state dict entry that is none is refused, naming what to save instead."""
    extra = extra_state_entries(model, state)
    if extra:
        name = next(iter(extra))
        also = f"; also {list(extra)[1:4]}" if len(extra) > 1 else ""
        children = submodule_note(model, extra)
        raise TypeError(
            f"save_compressed stores tensors, but the state dict entry {name!r} is a {extra[name]} (a module's "
            f"`get_extra_state`{also}). Save the submodule that holds the weights{f' ({children})' if children else ''}"
            " and load it into that submodule, or save that state apart, e.g. with torch.save."
        )
