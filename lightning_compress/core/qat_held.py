"""Layers a model holds outside its module tree, which a QAT conversion must reach too. Pure torch.

A module may keep a layer in a plain Python list, tuple, set or dict beside its submodules (darts' N-BEATS calls its
blocks' layers through such a list), or in an object that is no module (torchtune's ``TiedLinear`` output head holds
the token embedding). :func:`replace_held` points the containers at the layers a conversion put in place; an object
holding a replaced layer is warned about (:func:`warn_held_by_objects`), since what it computes is not known.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any, cast

from torch import Tensor, nn

__all__ = ["replace_held", "warn_held_by_objects"]


_HELD_DEPTH = 8  # a layer at most this many containers deep is followed (trial FY: 6 lists deep was missed at 6)
_HELD_TYPES = (list, tuple, dict, set, frozenset, collections.deque)
_PLAIN = (*_HELD_TYPES, str, bytes, int, float, bool, type(None))  # what holds no layer as an attribute


def replace_held(model: nn.Module, swapped: dict[int, tuple[nn.Module, nn.Module]]) -> None:
    """Point the plain Python lists, tuples and dicts a module of ``model`` keeps (nested ones too, and dict keys) at
    the layers that replaced the ones they held (``swapped``: ``id(old) -> (old, new)``). darts' N-BEATS keeps each
    block's layers in a list beside their ``nn.ModuleList`` and calls them through it (trial FU: 94% of its weights
    trained float, every converted layer said to "never run its forward"); trial FW: lists of lists, and a dict keyed
    by layers (a `KeyError` at the first forward)."""
    if not swapped:
        return

    def new_of(item: object) -> object:
        found = swapped.get(id(item))
        return found[1] if found is not None and found[0] is item else item

    def repointed(value: object, depth: int) -> object:
        """``value`` with the swapped layers replaced: a list or dict changed in place, a tuple rebuilt."""
        if depth > _HELD_DEPTH:
            return value
        if isinstance(value, (list, collections.deque)):
            for index, item in enumerate(list(value)):
                new = repointed(item, depth + 1)
                if new is not item:
                    value[index] = new
            return value
        if isinstance(value, (set, frozenset)):
            members = [(repointed(item, depth + 1), item) for item in value]
            if all(new is old for new, old in members):
                return value
            if isinstance(value, set):
                value.clear()
                value.update(new for new, _ in members)
                return value
            return type(value)(new for new, _ in members)
        if isinstance(value, dict):
            items = [(repointed(k, depth + 1), k, repointed(v, depth + 1), v) for k, v in value.items()]
            if any(nk is not k for nk, k, _, _ in items):
                value.clear()  # a key replaced: rebuilt in its order
                value.update((nk, nv) for nk, _, nv, _ in items)
            else:
                for nk, _, nv, v in items:
                    if nv is not v:
                        value[nk] = nv
            return value
        if isinstance(value, tuple):
            rebuilt = [repointed(item, depth + 1) for item in value]
            if all(new is old for new, old in zip(rebuilt, value, strict=True)):
                return value
            if hasattr(value, "_fields"):  # a namedtuple
                return cast(Any, type(value))(*rebuilt)
            try:  # a tuple subclass keeps its type where it is built from an iterable, as `tuple` is (trial FY)
                return cast(Any, type(value))(rebuilt)
            except Exception:
                return tuple(rebuilt)
        return new_of(value)

    for module in model.modules():
        for key, value in list(vars(module).items()):
            if key not in ("_modules", "_parameters", "_buffers") and isinstance(value, _HELD_TYPES):
                new = repointed(value, 1)
                if new is not value:
                    vars(module)[key] = new


def warn_held_by_objects(model: nn.Module, swapped: dict[int, tuple[nn.Module, nn.Module]]) -> None:
    """Warn where an object a module keeps as an attribute, not a module nor a container, holds a layer this conversion
    replaced (torchtune's ``TiedLinear`` output head holds the token embedding and multiplies its ``weight``: trial GB,
    the embedding quantized, the head computed with the float weight, and a reloaded file's logits differed by 0.15)."""
    layer_names = {id(m): n for n, m in model.named_modules()}
    found: list[str] = []
    for owner, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_modules", "_parameters", "_buffers") or isinstance(value, (nn.Module, Tensor, *_PLAIN)):
                continue
            try:
                items = list(vars(value).values())
            except Exception:  # no `__dict__` (slots, builtins), or a proxy that fails to give one
                continue
            for item in items:
                pair = swapped.get(id(item))
                if pair is not None and pair[0] is item:
                    held = layer_names.get(id(pair[1]), type(item).__name__)
                    found.append(f"{owner + '.' if owner else ''}{key} ({type(value).__name__}) holds {held!r}")
    if found:
        warnings.warn(
            f"quantization-aware training: {found[:3]}{' ...' if len(found) > 3 else ''}, outside the module tree "
            "(as torchtune's TiedLinear head holds the token embedding): what it computes with that layer is not "
            "quantized (a read of its weight is the float weight, a call runs the float layer), and a model reloaded "
            "from a compressed file reads the quantized weight there, so its outputs differ from the trained model's. "
            "Leave that layer float, or make the head an `nn.Linear` tied to the weight (quantized as one with it).",
            UserWarning,
            stacklevel=3,
        )
