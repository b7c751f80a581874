"""Models inside wrappers: `torch.compile`'s, activation checkpointing's, a compiled `forward`, a wrapper handing its
state to an inner module.

Pure torch. The package's tracers and file formats see a model through these: its plain names and its own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from torch import nn

__all__ = ["eager", "inner_module", "is_compiled", "modules_by_name", "plain_name", "state_root", "uncompiled"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile`` returns for a module (an ``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def inner_module(module: nn.Module) -> nn.Module | None:
    """The module a wrapper stands for, whose names a plain instance has: the module ``torch.compile`` compiled
    (``_orig_mod``, its documented handle), or the one an activation checkpointing or offloading wrapper runs
    (``torch.distributed``'s ``checkpoint_wrapper``, which torchtune's and FSDP recipes apply: its state dict drops the
    ``_checkpoint_wrapped_module.`` prefix); ``None`` for any other module."""
    if is_compiled(module):
        return cast(nn.Module, module._orig_mod)
    children = dict(module.named_children())
    wrapped = children.get("_checkpoint_wrapped_module")
    return wrapped if wrapped is not None and len(children) == 1 else None


_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def plain_name(name: str) -> str:
    """``name`` without the activation checkpointing wrappers' segments (``blocks.0._checkpoint_wrapped_module.fc1``
    -> ``blocks.0.fc1``): the name a plain instance, and the wrapped model's state dict, give the module."""
    return (
        ".".join(part for part in name.split(".") if part != _CHECKPOINT_WRAPPED)
        if _CHECKPOINT_WRAPPED in name
        else name
    )


def modules_by_name(model: nn.Module) -> dict[str, Any]:
    """``model``'s modules by name, and by their :func:`plain_name` too (a layer wrapped alone: its plain name is the
    layer's, not its wrapper's): names taken before activation checkpointing wrapped the model (Lightning's
    ``configure_model`` runs after ``setup``: trial GD) still find their modules."""
    named = dict(model.named_modules())
    found = dict(named)
    for name, module in named.items():  # outer modules first: a wrapped layer's plain name ends at the layer
        plain = plain_name(name)
        if plain != name and (plain not in named or _CHECKPOINT_WRAPPED in dict(named[plain].named_children())):
            found[plain] = module
    return found


@contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each wrapped submodule swapped for the module its wrapper stands for (:func:`inner_module`),
    meanwhile: its names are a plain instance's (a compiled submodule's ``_orig_mod.``: a trial's file loaded only into
    a model compiled alike; trial GB: an activation-checkpointed block's ``_checkpoint_wrapped_module.``, into none),
    and the layers are the same objects. Each wrapper is put back where the module it stands for is still in place; a
    layer replaced meanwhile (by a QAT conversion while loading) keeps its replacement, inside its activation wrapper
    (trial GB), and without its ``torch.compile`` wrapper."""
    places: dict[tuple[int, str], tuple[nn.Module, str, nn.Module, nn.Module]] = {}
    for qualified, child in model.named_modules(remove_duplicate=False):  # every name (trial DF: a wrapper
        inner = inner_module(child) if qualified else None  # registered twice stayed under its second name)
        parent_name, _, name = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if inner is not None else None
        if inner is None or parent is None or inner_module(parent) is not None:
            continue  # (a wrapper inside a wrapper is swapped out with it)
        while (deeper := inner_module(inner)) is not None:
            inner = deeper
        places.setdefault((id(parent), name), (parent, name, child, inner))
    swapped: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    try:
        for parent, name, child, inner in places.values():
            swapped.append((parent, name, child, inner))
            setattr(parent, name, inner)
        yield cast(nn.Module, model._orig_mod) if is_compiled(model) else model
    finally:
        for parent, name, child, inner in reversed(swapped):
            now = getattr(parent, name, None)
            if now is not inner and isinstance(now, nn.Module) and not is_compiled(child) and inner_module(child):
                # an activation wrapper runs whatever it holds: it wraps the replacement (a compiled module's code
                # was compiled for the module it replaced)
                child.register_module("_checkpoint_wrapped_module", now)
                now = inner
            if now is inner:
                setattr(parent, name, child)


@contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` running its modules' own code meanwhile, for a tracer (the ONNX exporter, the channel dependency
    graph) that cannot enter code ``torch.compile`` compiled: a ``forward`` compiled on the instance (what Lightning
    does to a compiled LightningModule passed to ``fit``; ``module.forward = torch.compile(module.forward)``) is the
    function it wraps (``__wrapped__``), and ``module.compile()``'s compiled call is set aside (its only handle,
    ``_compiled_call_impl``). Everything is put back after (trials: ``export_path`` failed after training, and channel
    pruning of a compiled module found no layer)."""
    undo: list[tuple[nn.Module, str, object]] = []
    try:
        for module in model.modules():
            compiled = vars(module).get("forward")
            own = getattr(compiled, "__wrapped__", None)
            if compiled is not None and callable(own) and getattr(own, "__self__", None) is module:
                undo.append((module, "forward", compiled))
                module.forward = own
            if vars(module).get("_compiled_call_impl") is not None:
                undo.append((module, "_compiled_call_impl", module._compiled_call_impl))
                module._compiled_call_impl = None
        yield model
    finally:
        for module, name, value in reversed(undo):
            setattr(module, name, value)


def state_root(model: nn.Module) -> nn.Module:
    """The module whose names a fresh instance's state dict uses: ``model`` itself, the inner module a wrapper hands
    its state to (``lightning.fabric``'s ``_FabricModule`` keys its state without its ``_forward_module.`` prefix;
    read from where the state dict's first tensor sits among the named parameters and buffers), or the module
    ``torch.compile`` compiled (its ``_orig_mod.`` prefix: a trial's file from a compiled model did not load into
    a fresh instance)."""
    if is_compiled(model):
        return state_root(cast(nn.Module, model._orig_mod))
    state = model.state_dict(keep_vars=True)
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for key, tensor in state.items():
        name = names.get(id(tensor))
        if name is None:
            continue
        if name == key or not name.endswith("." + key):
            return model
        inner = model.get_submodule(name[: -len(key) - 1])
        return inner if inner.state_dict(keep_vars=True).keys() == state.keys() else model
    return model
