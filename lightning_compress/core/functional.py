"""Lightning-free entry points: prune a model once, measure its sparsity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .importance import Importance, resolve_importance
from .masks import compute_masks
from .selection import select_targets

__all__ = ["prune_", "sparsity", "validate_fraction"]


def validate_fraction(value: object, argument: str, *, upper_inclusive: bool = False) -> float:
    """Check that ``value`` is a real number in [0, 1) (or [0, 1]) and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argument}` must be a float, got {type(value).__name__} ({value!r}).")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        allowed = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"`{argument}`={value} is outside {allowed}.")
    return value


def prune_(
    model: nn.Module,
    sparsity: float,
    importance: str | Importance = "magnitude",
    scope: str = "global",
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_density: float = 0.0,
    masks: Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Prune ``model`` in place to ``sparsity`` and return the masks.

    Args:
        model: any ``nn.Module``.
        sparsity: fraction in [0, 1) of the selected weights that are zero afterwards (absolute:
            calling twice with 0.5 leaves 50%, not 75%).
        importance: ``"magnitude"``, ``"taylor"`` (needs ``.grad``), ``"random"`` or an
            :class:`~lightning_compress.core.importance.Importance` object.
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"``.
        include: glob patterns over module names (see :func:`~.selection.select_targets`).
        exclude: glob patterns over module names to leave dense.
        min_density: with ``scope="global"``, the smallest fraction each layer keeps.
        masks: masks from an earlier call: those weights stay pruned.
        seed: seed of ``importance="random"``.

    Returns:
        ``{parameter name: bool mask}``, ``True`` where the weight is kept.

    Example:
        >>> import torch
        >>> from lightning_compress import prune_, sparsity
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = prune_(model, 0.5)
        >>> round(sparsity(model), 2)
        0.5
    """
    sparsity = validate_fraction(sparsity, "sparsity")
    min_density = validate_fraction(min_density, "min_density", upper_inclusive=True)
    if scope not in ("global", "layer"):
        raise ValueError(f"`scope`={scope!r} is not one of ('global', 'layer').")
    if scope == "global" and min_density > 1.0 - sparsity + 1e-9:
        raise ValueError(
            f"`min_density`={min_density} leaves no room for `sparsity`={sparsity}: "
            f"it must be at most 1 - sparsity = {1.0 - sparsity:.4g}."
        )
    imp = resolve_importance(importance, seed)
    targets = select_targets(model, include, exclude)
    return compute_masks(targets, imp, sparsity, scope, min_density, masks, apply=True)


def sparsity(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> float:
    """Fraction of exactly-zero entries among the selected weights (default: Linear/Conv).

    Example:
        >>> import torch
        >>> from lightning_compress import sparsity
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        >>> sparsity(layer)
        0.5
    """
    targets = select_targets(model, include, exclude)
    zeros = sum(int((t.param == 0).sum()) for t in targets)
    total = sum(t.numel for t in targets)
    return zeros / total if total else 0.0


def masked_fraction(masks: Mapping[str, Tensor]) -> float:
    """Fraction of ``False`` entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0
