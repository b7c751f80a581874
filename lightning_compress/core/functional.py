"""Lightning-free entry points: prune a model once, measure its sparsity."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_int, check_module, is_real
from .collectives import TorchDistributed
from .importance import Importance, auto_importance_of, resolve_importance
from .mask_counts import zero_counts
from .masks import compute_masks, zero_pruned_
from .nm import dense_layers_note, parse_nm
from .rules import rule_for
from .selection import select_targets

__all__ = [
    "check_granularity",
    "check_masks",
    "check_measure",
    "check_round_to",
    "default_scope",
    "prune_",
    "sparsity",
    "validate_fraction",
]


def validate_fraction(value: object, argument: str, *, upper_inclusive: bool = False) -> float:
    """Check that ``value`` is a real number in [0, 1) (or [0, 1]) and return it as float."""
    if not is_real(value):
        raise TypeError(f"`{argument}` must be a float, got {type(value).__name__} ({value!r}).")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        allowed = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"`{argument}`={value} is outside {allowed}.")
    return value


FLOOR_OF_TARGET_DENSITY = 0.1
"""The default ``min_density`` as a fraction of the density at the target: no layer ends more
than ten times sparser than the whole selection."""


def resolve_min_density(value: object, sparsity: float, scope: str, argument: str = "sparsity") -> float:
    """Validate ``min_density`` (``None``: :data:`FLOOR_OF_TARGET_DENSITY` ``* (1 - sparsity)``).

    ``argument`` names the sparsity in messages (``"target_sparsity"`` for the callback).
    """
    if value is None:  # rounded against float noise, yet positive below a target of 1 (1 - 1e-12 emptied layers)
        floor = FLOOR_OF_TARGET_DENSITY * (1.0 - sparsity)
        return round(floor, 12) or floor
    min_density = validate_fraction(value, "min_density", upper_inclusive=True)
    if scope == "global" and min_density > 1.0 - sparsity + 1e-9:
        raise ValueError(
            f"`min_density`={min_density} leaves no room for `{argument}`={sparsity}: "
            f"it must be at most 1 - {argument} = {1.0 - sparsity:.4g}."
        )
    return min_density


def warn_if_min_density_idle(value: object, scope: str, granularity: str, stacklevel: int = 3) -> None:
    """Say when a ``min_density`` the user gave cannot act: element pruning per layer prunes every layer to the
    target alone, and N:M fixes each block; it floors one global threshold and channel groups."""
    if value is None or granularity == "channel" or (scope == "global" and granularity == "element"):
        return
    why = "every layer is pruned to the target alone" if granularity == "element" else f"{granularity!r} fixes blocks"
    warnings.warn(
        f"`min_density`={value} has no effect with `scope`={scope!r} and `granularity`={granularity!r} ({why}): it "
        "is the floor of one global threshold (`scope='global'`) and of channel groups.",
        UserWarning,
        stacklevel=stacklevel,
    )


def check_masks(masks: object, targets: Sequence[Any]) -> dict[str, Tensor] | None:
    """Validate ``prune_(masks=...)``: a mapping from selected weights' names to masks of their shape."""
    if masks is None:
        return None
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"`masks` must be a dict of parameter name -> mask (as `prune_` returns), got {type(masks).__name__}."
        )
    shapes = {t.param_name: tuple(t.param.shape) for t in targets}
    checked = {}
    for name, mask in masks.items():
        if name not in shapes:
            raise ValueError(
                f"`masks` has {name!r}, which is not a selected weight; selected: {list(shapes)[:5]}"
                f"{' ...' if len(shapes) > 5 else ''}."
            )
        if not isinstance(mask, Tensor):
            raise TypeError(f"`masks`[{name!r}] must be a tensor, got {type(mask).__name__}.")
        if tuple(mask.shape) != shapes[name]:
            raise ValueError(f"`masks`[{name!r}] has shape {tuple(mask.shape)}; the weight has {shapes[name]}.")
        checked[name] = mask
    return checked


def default_scope(scope: object, granularity: str) -> str:
    """Validate ``scope``; ``None`` is ``"layer"`` for channels (the same fraction of every layer: at the same
    compute it was more accurate and faster than one global threshold on every model measured,
    BENCHMARKS.md "A compute budget"), ``"global"`` otherwise."""
    if scope is None:
        return "layer" if granularity == "channel" else "global"
    if scope not in ("global", "layer"):
        raise ValueError(f"`scope`={scope!r} is not one of ('global', 'layer').")
    return str(scope)


def check_round_to(round_to: object, granularity: str) -> int | None:
    """Validate ``round_to``: ``None`` or a positive integer, for ``granularity="channel"`` only."""
    value = check_int(round_to, "round_to", minimum=1, optional=True)
    if value is not None and granularity != "channel":
        raise ValueError(
            f"`round_to`={value} rounds the channels a layer keeps: it needs granularity='channel', got "
            f"`granularity`={granularity!r}."
        )
    return value


def check_measure(measure: object, granularity: str) -> str:
    """Validate ``measure``: ``"channels"`` or ``"macs"``, the latter for ``granularity="channel"`` only."""
    if measure not in ("channels", "macs"):
        raise ValueError(f"`measure`={measure!r} is not one of ('channels', 'macs').")
    if measure == "macs" and granularity != "channel":
        raise ValueError(
            f"`measure`='macs' counts what removing channels saves: it needs granularity='channel', "
            f"got `granularity`={granularity!r}."
        )
    return str(measure)


def check_granularity(
    granularity: object, target: float, importance: object, argument: str = "target_sparsity"
) -> tuple[str, tuple[int, int] | None]:
    """Validate ``granularity`` against the target and importance; returns it and ``(N, M)`` or ``None``."""
    if not isinstance(granularity, str):
        raise TypeError(f"`granularity` must be 'element', 'channel' or 'N:M' such as '2:4', got {granularity!r}.")
    nm = parse_nm(granularity)
    if nm is None and granularity not in ("element", "channel"):
        raise ValueError(f"`granularity`={granularity!r} is not one of 'element', 'channel' or 'N:M' such as '2:4'.")
    kind = "N:M" if nm is not None else granularity
    allowed = resolve_importance(importance).granularities
    if allowed is not None and kind not in allowed:
        needs = " or ".join(f"granularity={a!r}" for a in allowed)
        raise ValueError(
            f"`importance`={importance!r} scores only some granularities: it needs {needs}, "
            f"got `granularity`={granularity!r}."
        )
    if nm is not None and abs(target - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise ValueError(
            f"`granularity`={granularity!r} ends at sparsity 1 - {nm[0]}/{nm[1]} = {1.0 - nm[0] / nm[1]:.4g}: "
            f"set `{argument}`={1.0 - nm[0] / nm[1]:.4g}, got {target}."
        )
    return granularity, nm


def prune_(
    model: nn.Module,
    sparsity: float,
    importance: str | Importance = "auto",
    scope: str | None = None,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_density: float | None = None,
    masks: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    granularity: str = "element",
    example_inputs: Any = None,
    measure: str = "channels",
    round_to: int | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` in place to ``sparsity`` and return the masks.

    One shot: the zeros are written once, and training the model afterwards moves them (trial FP: 0.90 sparse fell to
    0.05 after one skorch epoch). To train on with them, zero the pruned weights after every optimizer step with the
    returned masks (``weight.data.mul_(mask)``), or prune while training: :class:`~lightning_compress.IterativePruner`
    (any loop) or the ``IterativePruning`` callback (Lightning).

    Args:
        model: any ``nn.Module``.
        sparsity: fraction in [0, 1) of the selected weights that are zero afterwards (absolute:
            calling twice with 0.5 leaves 50%, not 75%).
        importance: ``"auto"`` (``"lamp"`` for element-wise pruning where a BatchNorm follows a selected layer,
            else ``"magnitude"``), ``"magnitude"``, ``"lamp"``, ``"taylor"`` (needs ``.grad``), ``"random"`` or an
            :class:`~lightning_compress.core.importance.Importance` object.
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"``. ``None``: ``"layer"``
            for ``granularity="channel"``, ``"global"`` otherwise.
        include: glob patterns over module names (see :func:`~.selection.select_targets`).
        exclude: glob patterns over module names to leave dense (with ``granularity="channel"``: an excluded layer
            keeps its output channels, and loses the input columns of channels the layers feeding it lose).
        min_density: with ``scope="global"``, the smallest fraction each layer keeps, so one
            threshold cannot wipe out a layer. ``None``: a tenth of the density at ``sparsity``,
            ``0.1 * (1 - sparsity)``.
        masks: masks from an earlier call: those weights stay pruned.
        seed: seed of ``importance="random"``.
        granularity: ``"element"``, ``"channel"`` (``sparsity`` is then the fraction of
            channels; needs ``example_inputs``; follow with :func:`~lightning_compress.compact`)
            or ``"N:M"`` such as ``"2:4"`` (``sparsity`` must be ``1 - N/M``).
        example_inputs: what the model's ``forward`` takes (tensor, tuple or dict), for ``"channel"``.
        measure: with ``"channel"``: what ``sparsity`` counts, ``"channels"`` or ``"macs"`` (the fraction
            of the model's multiply-accumulates on ``example_inputs`` removed; global scope then ranks
            channels by score per MAC).
        round_to: with ``"channel"``: every group keeps a multiple of this many channels (rounded down, so more
            are pruned; heads and groups read in quantization blocks aside), for widths fast convolution layouts
            take whole. ``None``: any count.

    Returns:
        ``{parameter name: bool mask}``, ``True`` where the weight is kept (with ``"channel"`` also
        the biases and BatchNorm parameters of the pruned channels).

    Example:
        >>> import torch
        >>> from lightning_compress import prune_, sparsity
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = prune_(model, 0.5)
        >>> round(sparsity(model), 2)
        0.5
    """
    check_module(model, materialized=True)
    sparsity = validate_fraction(sparsity, "sparsity")
    seed = check_int(seed, "seed") or 0  # checked whatever the importance, as the callback does
    granularity, nm = check_granularity(granularity, sparsity, importance, "sparsity")
    scope = default_scope(scope, granularity)
    warn_if_min_density_idle(min_density, scope, granularity)
    min_density = resolve_min_density(min_density, sparsity, scope)
    measure = check_measure(measure, granularity)
    check_round_to(round_to, granularity)
    imp = resolve_importance(importance, seed)
    targets = select_targets(model, include, exclude, module_tensors=True)
    if granularity == "element":
        masks = check_masks(masks, targets)
    if importance == "auto":
        kind = "N:M" if nm is not None else granularity
        imp, why = auto_importance_of(model, targets, kind)
        logging.getLogger(__name__).info(f"prune_: importance='auto' scores by {why}.")
    if granularity == "element":  # computes and zeroes in one pass over the weights
        return compute_masks(targets, imp, sparsity, scope, min_density, masks, apply=True)
    if granularity == "channel" and example_inputs is None:
        raise ValueError("`granularity`='channel' traces the model: pass `example_inputs` (a tensor, tuple or dict).")
    rule, left_alone = rule_for(
        model, targets, granularity, nm, imp, scope, min_density, example_inputs, measure, round_to=round_to
    )
    masks = check_masks(masks, rule.targets)  # channel masks hold the biases and BatchNorm entries they cut too
    if left_alone and nm is not None:
        warnings.warn(
            f"prune_: {dense_layers_note(list(left_alone), nm[1], granularity)}",
            UserWarning,
            stacklevel=2,
        )
    elif left_alone:
        logging.getLogger(__name__).info(
            "prune_: channels left whole: " + "; ".join(f"{n} ({why})" for n, why in left_alone.items())
        )
    current = {k: v.to(torch.bool) for k, v in (masks or {}).items()}
    new = rule.compute(sparsity, current)
    with torch.no_grad():
        for target in rule.targets:
            zero_pruned_(target.param, new[target.param_name])  # NaN-safe: pruned entries become exact zeros
    return new


def sparsity(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> float:
    """Fraction of exactly-zero entries among the selected weights (default: those pruning selects by default).
    Under FSDP2 it counts every process's shards: call it on every process (a trial: each process counted its own
    shard against the whole weight, 0.3965 for 0.7999).

    Args:
        model: the model.
        include: glob patterns over module names, as for pruning.
        exclude: glob patterns over module names to leave out.

    Example:
        >>> import torch
        >>> from lightning_compress import sparsity
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        >>> sparsity(layer)
        0.5
    """
    targets = select_targets(model, include, exclude, module_tensors=True, note_left_out=False)  # said by pruning
    zeros = sum(zero_counts(targets, TorchDistributed()).values())  # every process's shards of sharded weights
    total = sum(t.numel for t in targets)
    return zeros / total if total else 0.0
