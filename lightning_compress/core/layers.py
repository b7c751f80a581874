"""Linear-like layers: which module types compression treats as ``y = x W (+ b)``, and their weight axes.

``nn.Linear`` and every ``nn.ConvNd`` store the weight as ``(out, in, ...)``. ``transformers``'
``Conv1D`` (GPT-2, GPT, ...) stores it as ``(in, out)``: its output channels are along axis 1.
It is recognized when ``transformers`` is already imported (a model that has one imported it);
this package never imports ``transformers`` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, cast

from torch import nn

__all__ = [
    "class_label",
    "linear_like_types",
    "parametrization_kinds",
    "registered_names",
    "restore_training",
    "transformers_conv1d",
    "weight_axes",
]


def transformers_conv1d() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` if ``transformers`` is loaded, else ``None``."""
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None) if module is not None else None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def is_pretrained_model(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``PreTrainedModel`` (none can exist unless ``transformers`` is
    loaded)."""
    loaded = sys.modules.get("transformers")
    base = getattr(loaded, "PreTrainedModel", None) if loaded is not None else None
    return isinstance(base, type) and isinstance(module, base)


def foreign_linear_types() -> tuple[type[nn.Module], ...]:
    """Layers of other libraries that are not ``nn.Linear`` but hold its ``(out, in)`` weight and compute its
    ``F.linear(x, weight, bias)``: PyTorch Geometric's ``torch_geometric.nn.Linear`` (the ``lin`` of GCNConv, SAGEConv,
    GATConv; trial FD: left out of every selection), if it is loaded."""
    module = sys.modules.get("torch_geometric.nn.dense.linear")
    found = getattr(module, "Linear", None) if module is not None else None
    return (found,) if isinstance(found, type) and issubclass(found, nn.Module) else ()


def linear_like_types() -> tuple[type[nn.Module], ...]:
    """Module types whose ``weight`` is selected by default: Linear, every Conv, ``transformers`` Conv1D, and the
    :func:`foreign_linear_types`."""
    conv1d = transformers_conv1d()
    base: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, *foreign_linear_types())
    return base if conv1d is None else (*base, conv1d)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or a layer of another library that computes what it does (:func:`foreign_linear_types`)."""
    return isinstance(module, (nn.Linear, *foreign_linear_types()))


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """``(output axis, input axis)`` of ``module.weight``: ``(1, 0)`` for ``transformers`` Conv1D and transposed
    convolutions (weights stored as ``(in, out, ...)``), else ``(0, 1)``."""
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return (1, 0)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (1, 0)
    return (0, 1)


def registered_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module of ``model`` is registered under, first name first, keyed by ``id(module)`` (a module
    may be a child of two parents, or twice of one: ``self.backbone`` that is also ``self.model[0]``)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def restore_training(modes: Iterable[tuple[nn.Module, bool]]) -> None:
    """Put each module back in its recorded training mode (``modes`` in ``model.modules()`` order). A module whose
    class overrides ``train`` is put back through it, since the override may do more than set the flag
    (transformers' LeViT clears its eval-mode attention-bias cache in ``train(True)``; a trial: assigning the flag
    left the cache of a trace, and the trained model's eval outputs were computed with stale biases, 2.17 off)."""
    for module, mode in modes:  # parents before children: ``train`` recurses, and each child is set after
        if type(module).train is not nn.Module.train:
            module.train(mode)
        else:
            module.training = mode


def class_label(module: nn.Module) -> str:
    """``module``'s class name for a message, qualified by its module where another library reuses a name of
    ``torch.nn`` (trial GJ: e3nn's ``Linear`` was said not to be a Linear)."""
    kind = type(module)
    if hasattr(nn, kind.__name__) and getattr(nn, kind.__name__) is not kind:
        return f"{kind.__module__}.{kind.__qualname__}"
    return kind.__name__


def parametrization_kinds(module: nn.Module, attr: str | None = None) -> str:
    """The classes of the parametrizations computing ``module``'s ``attr`` (every parametrized tensor's for ``None``),
    for a message (trial GI: braindecode's max-norm was said to be ``weight_norm``)."""
    lists = cast(Any, module).parametrizations
    chosen = lists.values() if attr is None else [lists[attr]]
    return ", ".join(sorted({type(p).__name__ for plist in chosen for p in plist}))
