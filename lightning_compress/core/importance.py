"""Importance criteria: how to score weights. What to remove is decided by the mask rules.

An importance is an :class:`Importance` object. The engine only *calls* it; it never asks its
type. What a criterion can do is declared on the class:

* :meth:`Importance.score` ``(name, weight) -> Tensor``: one score per weight, higher = keep.
  Scores must be finite and deterministic between two calls at the same event (they are read twice).
* :meth:`Importance.ranking` ``(name, weight) -> (values, by_magnitude)``: what element-wise rules
  rank. The default is ``(score(...), False)``; magnitude returns the weight itself with
  ``by_magnitude=True``, so a 100M-weight model is ranked without an ``|w|`` copy.
* :meth:`Importance.channel_contribution` ``(name, weight, module) -> Tensor | None``: what one
  parameter of a channel group adds to its channels' scores (``None``: nothing).
* :meth:`Importance.cannot_score` ``(modules) -> str | None``: why a channel group cannot be scored.
* :attr:`Importance.granularities`: the granularities it can score (``None``: all).
* :attr:`Importance.scores_shards`: ``False`` when it needs whole weights (LAMP), refused for sharded ones.
* :attr:`Importance.accumulates`: ``True`` when :meth:`observe` must see every optimizer step's
  gradient; :meth:`reset` runs after every pruning event; :meth:`state_dict` /
  :meth:`load_state_dict` / :meth:`to` carry its state through checkpoints.

Any object with a ``score(name, weight)`` method is accepted too (:func:`resolve_importance` wraps
it); one that also defines ``observe``/``reset``/``state_dict`` must subclass :class:`Importance`
so those are declared, not guessed.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .checks import is_integer
from .sharding import is_sharded

__all__ = [
    "IMPORTANCES",
    "BatchNormScaleImportance",
    "Importance",
    "LampImportance",
    "MagnitudeImportance",
    "MaskPlanError",
    "RandomImportance",
    "TaylorImportance",
    "auto_importance",
    "auto_importance_of",
    "check_scores",
    "normalized_layers",
    "resolve_importance",
]


class MaskPlanError(ValueError):
    """Scores that cannot be ranked: wrong shape, NaN or Inf. Raised before any weight changes."""


def check_scores(importance: object, where: str, scores: object, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The one check of an importance's output: a tensor of ``shape``. Returns it.

    Finiteness is checked by the rules where they already read every value (the radix histogram
    of the element rule finds NaN/Inf buckets without another pass).
    """
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(shape):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise MaskPlanError(
            f"`importance` {importance!r} returned scores of shape {got} for {where}; expected {tuple(shape)}."
        )
    return scores


def nonfinite_error(where: str) -> MaskPlanError:
    return MaskPlanError(
        f"importance scores of {where} contain NaN or Inf; check the weights and gradients of that layer."
    )


class Importance:
    """Base class of importance criteria (see the module docstring for the contract)."""

    accumulates: ClassVar[bool] = False
    granularities: ClassVar[tuple[str, ...] | None] = None
    scores_shards: ClassVar[bool] = True  # False: needs whole weights (refused under FSDP2 before training)

    def score(self, name: str, weight: Tensor) -> Tensor:
        """A tensor shaped like ``weight`` (any float dtype, any device); higher = more important."""
        raise NotImplementedError(f"{type(self).__name__} must implement `score(name, weight)`.")

    def __call__(self, name: str, weight: Tensor) -> Tensor:
        return self.score(name, weight)

    def ranking(self, name: str, weight: Tensor) -> tuple[Tensor, bool]:
        """What element-wise rules rank, and whether by absolute value."""
        return check_scores(self, f"layer {name!r}", self.score(name, weight), weight.shape), False

    def shard_ranking(self, name: str, shard: Tensor, offset: int) -> tuple[Tensor, bool]:
        """:meth:`ranking` of one process's shard of a sharded (FSDP2) weight: the elements ``offset``,
        ``offset + 1``, ... of the whole weight flattened. Criteria that only look at each element's value and
        gradient (all but random) rank the shard alone, which is this default."""
        return self.ranking(name, shard)

    def channel_contribution(self, name: str, weight: Tensor, module: nn.Module) -> Tensor | None:
        """What ``weight`` (a parameter of ``module`` in a channel group) adds to its channels' scores."""
        return check_scores(self, f"{name!r}", self.score(name, weight), weight.shape).detach()

    def shard_channel_contribution(self, name: str, shard: Tensor, module: nn.Module, offset: int) -> Tensor | None:
        """:meth:`channel_contribution` of one process's shard of a sharded (FSDP2) parameter, whose first
        element is element ``offset`` of the whole parameter flattened. The default scores the shard alone."""
        return self.channel_contribution(name, shard, module)

    def cannot_score(self, modules: Sequence[nn.Module]) -> str | None:
        """Why a channel group made of ``modules`` cannot be scored by this criterion (``None``: it can)."""
        return None

    def observe(self, name: str, weight: Tensor, grad: Tensor) -> None:
        """Called once per optimizer step with the final gradient, when :attr:`accumulates`."""

    def reset(self) -> None:
        """Called after every pruning event."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def to(self, device: torch.device) -> Importance:
        """Move any tensors of the state to ``device``."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeImportance(Importance):
    """``|w|``: the classic magnitude criterion (Han et al. 2015); channels by their squared L2 norm."""

    def score(self, name: str, weight: Tensor) -> Tensor:
        return weight.detach().abs()

    def ranking(self, name: str, weight: Tensor) -> tuple[Tensor, bool]:
        return weight.detach(), True

    def channel_contribution(self, name: str, weight: Tensor, module: nn.Module) -> Tensor | None:
        return weight.detach().abs().float().square()  # a complex weight's modulus (trial GK: FNO's spectral)


def _product_magnitude(weight: Tensor, grad: Tensor) -> Tensor:
    """``|w * g|`` in float32 (a complex weight's: the modulus, trial GK: FNO's spectral weights were ranked by the
    real part)."""
    if weight.is_complex():
        return (weight.detach().to(torch.complex64) * grad.detach().to(torch.complex64)).abs()
    return (weight.detach().float() * grad.detach().float()).abs_()


class TaylorImportance(Importance):
    """First-order Taylor importance ``sum_t |w_t * dL/dw_t|`` (Molchanov et al. 2019).

    Accumulated over the optimizer steps since the last pruning event. A layer no gradient reached since then (one a
    `layerdrop` skipped) keeps its sums of the last interval that had some; one no gradient has ever reached while
    others' did (a pooler the loss does not use) scores 0. Before any step has been observed, the current
    ``weight.grad`` is used; without one, scoring raises.
    """

    accumulates = True

    def __init__(self) -> None:
        self._acc: dict[str, Tensor] = {}
        self._fresh: set[str] = set()  # the layers whose sums are of the steps since the last event

    def observe(self, name: str, weight: Tensor, grad: Tensor) -> None:
        # formed in float32: a float16 product underflows to 0 for the smallest (trial ED: 6.5% of a q_proj's scores)
        contribution = _product_magnitude(weight, grad)
        acc = self._acc.get(name)
        if (
            name not in self._fresh
            or acc is None
            or acc.shape != contribution.shape
            or acc.device != contribution.device
        ):
            self._acc[name] = contribution  # the first step of an interval replaces an earlier interval's sums
            self._fresh.add(name)
        else:
            acc.add_(contribution)

    def score(self, name: str, weight: Tensor) -> Tensor:
        acc = self._acc.get(name)
        if acc is not None:  # this interval's sums, or the last ones a gradient reached it in (trial BQ: `layerdrop`
            return acc  # skipped a layer for every step since the last event, and the fit failed)
        if weight.grad is not None:
            return _product_magnitude(weight, weight.grad)
        if self._fresh and weight.requires_grad:  # other layers had gradients: the loss does not reach this one
            return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if not weight.requires_grad:
            raise ValueError(
                f"importance='taylor' scores weights by their gradients, but layer {name!r} is frozen "
                "(requires_grad=False): `exclude` it, unfreeze it before pruning, or use importance='magnitude'."
            )
        raise ValueError(
            f"importance='taylor' has no gradient for layer {name!r}: run backward() before pruning (with "
            "IterativePruner: `before_optimizer_step()` between `backward()` and `optimizer.step()`, or `step()` "
            "before `optimizer.zero_grad()`), or prune with IterativePruner / the IterativePruning callback, which "
            "accumulate gradients."
        )

    def reset(self) -> None:
        self._fresh.clear()  # the sums stay, for layers no gradient reaches before the next event

    def state_dict(self) -> dict[str, Any]:
        return {"acc": {k: v.detach().cpu() for k, v in self._acc.items()}, "fresh": sorted(self._fresh)}

    def check_state(self, state: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a saved state that is not sums of this model's weights' shapes (``shapes``: layer -> shape), before
        anything is cloned (a trial: an expanded tensor of 2e9 entries in a 17 KB checkpoint cost 8 GB)."""
        acc = state.get("acc", {}) if isinstance(state, Mapping) else None
        if not isinstance(acc, Mapping):
            raise ValueError(f"the Taylor importance's state is not a dict of sums: {str(state)[:200]}.")
        for name, value in acc.items():
            if name not in shapes or not isinstance(value, Tensor) or tuple(value.shape) != shapes[name]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"the Taylor importance's state holds {str(name)[:80]!r} ({shape}), not the sums of a selected "
                    "weight of this model."
                )
        fresh = state.get("fresh", [])
        if not isinstance(fresh, (list, tuple)) or not all(isinstance(n, str) and n in acc for n in fresh):
            raise ValueError(
                f"the Taylor importance's state names {str(fresh)[:200]} as this interval's sums: not layers it holds."
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._acc = {k: v.clone() for k, v in state.get("acc", {}).items()}
        # a state saved before `fresh` was kept: its sums were all of the interval in progress
        self._fresh = set(state.get("fresh", self._acc))

    def to(self, device: torch.device) -> TaylorImportance:
        self._acc = {k: v.to(device) for k, v in self._acc.items()}
        return self


class BatchNormScaleImportance(Importance):
    """``|gamma|`` of the BatchNorm after a layer (network slimming, Liu et al. 2017).

    Channel granularity only: a channel's score is the sum of the BatchNorm scales in its group;
    a group without a BatchNorm cannot be scored.
    """

    granularities = ("channel",)

    def score(self, name: str, weight: Tensor) -> Tensor:
        raise ValueError(
            f"{self!r} scores channels by their BatchNorm scale: it needs granularity='channel' (layer {name!r})."
        )

    def channel_contribution(self, name: str, weight: Tensor, module: nn.Module) -> Tensor | None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # its scale and shift
            return weight.detach().float().abs()
        return None

    def cannot_score(self, modules: Sequence[nn.Module]) -> str | None:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
            return None
        return "needs a BatchNorm in every pruned channel group"


class LampImportance(Importance):
    """LAMP (Lee et al. 2021): ``w_i**2 / sum of w_j**2 over the weights j of the layer at least as large``.

    Monotone in ``|w|`` within a layer, so a layer keeps its largest weights, as with magnitude; but the scores are
    free of each layer's scale (a layer's largest weight scores 1), so one global threshold compares layers by the
    shape of their weight distributions, not by their scale. That is what a layer followed by a BatchNorm needs:
    the BatchNorm makes its weight scale arbitrary (training moves it freely), and global magnitude reads that
    arbitrary scale as importance. ``importance="auto"`` (the default) picks it for such models
    (:func:`auto_importance`). Element-wise pruning only; a sharded (FSDP2) weight cannot be scored shard by shard.
    """

    granularities = ("element",)
    scores_shards = False

    def score(self, name: str, weight: Tensor) -> Tensor:
        magnitude = weight.detach().abs().float().flatten()  # (a complex weight's modulus)
        largest = magnitude.max() if magnitude.numel() else magnitude.new_ones(())
        tiny = torch.finfo(torch.float32).tiny
        # relative to the layer's largest weight: the scores are the same, and the squares neither overflow
        # (|w| > 1e19) nor all underflow (|w| < 1e-19) in float32
        square = (magnitude / largest.clamp_min(tiny)).square()
        # the bits of a float32 >= 0 order as int32s do, and torch sorts integers by radix: the order (ties too,
        # the sort is stable) and the sorted values of sorting the floats, several times faster on a large layer
        bits, order = torch.sort(square.view(torch.int32), stable=True)
        ordered = bits.view(torch.float32)
        suffix = ordered.flip(0).cumsum(0).flip(0)  # sum of the squares at least as large as each
        scores = torch.empty_like(square).scatter_(0, order, ordered / suffix.clamp_min(tiny))
        return scores.view(weight.shape)

    def shard_ranking(self, name: str, shard: Tensor, offset: int) -> tuple[Tensor, bool]:
        raise ValueError(
            f"{self!r} scores a weight against the whole layer, but {name!r} is sharded (FSDP2): use "
            "importance='magnitude' (what importance='auto' picks for sharded models)."
        )


class RandomImportance(Importance):
    """Uniform random scores: the seed article's sparsity-based random pruning.

    Reproducible and identical on every process: the scores of a layer depend only on
    ``seed``, the number of pruning events so far and the layer name. They are drawn in blocks of
    :attr:`BLOCK` consecutive elements, each from its own generator, so a shard of a weight (FSDP2) gets
    exactly the scores the whole weight would have there.
    """

    BLOCK: ClassVar[int] = 1 << 16

    def __init__(self, seed: int = 0) -> None:
        if not is_integer(seed):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"`seed`={seed} must be >= 0.")
        self.seed = seed
        self.events = 0

    def score(self, name: str, weight: Tensor) -> Tensor:
        return self._draw(name, weight, 0)

    def shard_ranking(self, name: str, shard: Tensor, offset: int) -> tuple[Tensor, bool]:
        return self._draw(name, shard, offset), False

    def shard_channel_contribution(self, name: str, shard: Tensor, module: nn.Module, offset: int) -> Tensor | None:
        return self._draw(name, shard, offset)

    def _draw(self, name: str, weight: Tensor, offset: int) -> Tensor:
        """Scores of the elements ``offset .. offset + weight.numel()`` of the whole flattened weight."""
        out = torch.empty(weight.numel(), device=weight.device)
        generator = torch.Generator(device=weight.device)
        first, end = offset // self.BLOCK, offset + weight.numel()
        for block in range(first, -(-end // self.BLOCK)):
            generator.manual_seed(zlib.crc32(f"{self.seed}/{self.events}/{name}/{block}".encode()))
            values = torch.rand(self.BLOCK, generator=generator, device=weight.device)
            lo, hi = max(block * self.BLOCK, offset), min((block + 1) * self.BLOCK, end)
            out[lo - offset : hi - offset] = values[lo - block * self.BLOCK : hi - block * self.BLOCK]
        return out.view(weight.shape)

    def reset(self) -> None:
        self.events += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.events = int(state["events"])

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


class _ScoreObject(Importance):
    """A plain object with a ``score(name, weight)`` method, as an :class:`Importance`."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def score(self, name: str, weight: Tensor) -> Tensor:
        return self.wrapped.score(name, weight)

    def __repr__(self) -> str:
        return repr(self.wrapped)


IMPORTANCES: dict[str, type[Importance]] = {
    "auto": MagnitudeImportance,  # resolved per model by auto_importance; magnitude where no model is given
    "magnitude": MagnitudeImportance,
    "lamp": LampImportance,
    "taylor": TaylorImportance,
    "random": RandomImportance,
    "bn_scale": BatchNormScaleImportance,
}

_UNDECLARED = ("observe", "reset", "state_dict", "load_state_dict")


def normalized_layers(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Names of the ``modules`` whose output a BatchNorm normalizes: the next layer of ``model`` in registration
    order (``conv, bn`` in a ``Sequential`` or as attributes ``conv1``, ``bn1``), past identities, dropouts and drop
    paths (trial DU: PatchTST's ``out_proj, dropout_path1, norm_sublayer1.batchnorm``), is a BatchNorm over as many
    channels as the layer has outputs."""
    wanted = {id(m) for m in modules}
    units: list[tuple[str, nn.Module]] = []  # leaves, and the selected layers whole (a QAT layer has quantizers)
    inside = ""
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if id(m) in wanted:
            units.append((name, m))
            inside = f"{name}."
        elif next(m.children(), None) is None and not _passes_scale(m):
            units.append((name, m))
    found = []
    for (name, layer), (_, after) in itertools.pairwise(units):
        weight = getattr(layer, "weight", None)
        if (
            id(layer) in wanted
            and isinstance(after, nn.modules.batchnorm._BatchNorm)
            and isinstance(weight, Tensor)
            and weight.dim() >= 2
            and after.num_features == _outputs(layer, weight)
        ):
            found.append(name)
    return found


def _passes_scale(module: nn.Module) -> bool:
    """A module between a layer and its BatchNorm that leaves the layer's scale to the norm: an identity, a dropout,
    a drop path (stochastic depth: each sample kept whole or zeroed)."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    return "droppath" in type(module).__name__.lower().replace("_", "") and not any(module.parameters())


def _outputs(layer: nn.Module, weight: Tensor) -> int:
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    return int(weight.shape[1] * getattr(layer, "groups", 1)) if transposed else int(weight.shape[0])


def auto_importance(
    model: nn.Module, modules: Sequence[nn.Module], granularity: str, sharded: bool
) -> tuple[Importance, str]:
    """What ``importance="auto"`` scores with, and why: :class:`LampImportance` for element-wise pruning of a
    model where a BatchNorm normalizes the output of a selected layer (its weight scale is arbitrary there), else
    :class:`MagnitudeImportance` (channels, N:M, models without such a BatchNorm, sharded weights).

    Chosen on the model zoo of BENCHMARKS.md ("Session 14"): scale-free LAMP won every BatchNorm model and lost
    the models without one, where magnitudes across layers are on one scale."""
    normalized = normalized_layers(model, modules) if granularity == "element" else []
    if normalized and not sharded:
        names = f"{normalized[:3]}{' ...' if len(normalized) > 3 else ''}"
        return LampImportance(), f"LAMP (a BatchNorm normalizes the outputs of {names})"
    if normalized:
        return MagnitudeImportance(), "magnitude (LAMP cannot score sharded weights)"
    return MagnitudeImportance(), "magnitude"


def auto_importance_of(model: nn.Module, targets: Sequence[Any], granularity: str) -> tuple[Importance, str]:
    """:func:`auto_importance` for selected targets (``.module`` and ``.param``: sharded when any is)."""
    sharded = any(is_sharded(t.param) for t in targets)
    return auto_importance(model, [t.module for t in targets], granularity, sharded)


def resolve_importance(spec: object, seed: int = 0) -> Importance:
    """``"auto" | "magnitude" | "lamp" | "taylor" | "random" | "bn_scale"`` (shorthands) or an object, as an
    :class:`Importance`. ``"auto"`` needs the model to be decided (:func:`auto_importance`); here it is magnitude."""
    if isinstance(spec, str):
        if spec not in IMPORTANCES:
            # a dotted path: how a LightningCLI user names a class (trial BV: jsonargparse's message did not say)
            cli = (
                " A custom Importance on the LightningCLI is given by its class: "
                f"`--trainer.callbacks.importance.class_path={spec}` (YAML: `importance: {{class_path: {spec}}}`)."
                if "." in spec.strip(".")
                else ""
            )
            raise ValueError(f"`importance`={spec!r} is not one of {sorted(IMPORTANCES)} or an Importance object.{cli}")
        return RandomImportance(seed) if spec == "random" else IMPORTANCES[spec]()
    if isinstance(spec, Importance):
        return spec
    if callable(getattr(spec, "score", None)):
        declared = [m for m in _UNDECLARED if callable(getattr(spec, m, None))]
        if declared:
            raise TypeError(
                f"`importance` {type(spec).__name__} defines {declared} without subclassing "
                "lightning_compress.Importance: subclass it so they are called (set `accumulates = True` to "
                "receive gradients)."
            )
        return _ScoreObject(spec)
    raise TypeError(
        f"`importance` must be one of {sorted(IMPORTANCES)} or an object with a "
        f"`score(name, weight) -> Tensor` method, got {type(spec).__name__}."
    )
