"""Importance criteria: how to score weights. What to remove is decided in :mod:`.masks`.

An importance is any object with a ``score(name, weight) -> Tensor`` method (the
:class:`Importance` protocol): a tensor of the weight's shape, higher meaning more important.
Scores must be deterministic between two calls at the same event (they are read twice) and
finite. Optional methods, used when present:

* ``observe(name, weight, grad)``: called once per optimizer step with the final gradient
  (after accumulation and, under DDP, after the all-reduce), while pruning events remain.
* ``reset()``: called after every pruning event.
* ``state_dict()`` / ``load_state_dict(state)``: tensors and primitives, saved in checkpoints.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "IMPORTANCES",
    "BatchNormScaleImportance",
    "Importance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "resolve_importance",
]


@runtime_checkable
class Importance(Protocol):
    """Scores weights; higher is more important."""

    def score(self, name: str, weight: Tensor) -> Tensor:
        """Return a tensor shaped like ``weight`` (any float dtype, any device)."""
        ...


class MagnitudeImportance:
    """``|w|``: the classic magnitude criterion (Han et al. 2015)."""

    def score(self, name: str, weight: Tensor) -> Tensor:
        return weight.detach().abs()

    def __repr__(self) -> str:
        return "MagnitudeImportance()"


class TaylorImportance:
    """First-order Taylor importance ``sum_t |w_t * dL/dw_t|`` (Molchanov et al. 2019).

    Accumulated over the optimizer steps since the last pruning event. Before any step has been
    observed, the current ``weight.grad`` is used; without one, scoring raises.
    """

    def __init__(self) -> None:
        self._acc: dict[str, Tensor] = {}

    def observe(self, name: str, weight: Tensor, grad: Tensor) -> None:
        contribution = (weight.detach() * grad.detach()).abs_().float()
        acc = self._acc.get(name)
        if acc is None or acc.shape != contribution.shape or acc.device != contribution.device:
            self._acc[name] = contribution
        else:
            acc.add_(contribution)

    def score(self, name: str, weight: Tensor) -> Tensor:
        acc = self._acc.get(name)
        if acc is not None:
            return acc
        if weight.grad is not None:
            return (weight.detach() * weight.grad.detach()).abs().float()
        raise ValueError(
            f"importance='taylor' has no gradient for layer {name!r}: run backward() before pruning, "
            "or prune from the IterativePruning callback, which accumulates gradients while training."
        )

    def reset(self) -> None:
        self._acc.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"acc": {k: v.detach().cpu() for k, v in self._acc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._acc = {k: v.clone() for k, v in state.get("acc", {}).items()}

    def to(self, device: torch.device) -> None:
        self._acc = {k: v.to(device) for k, v in self._acc.items()}

    def __repr__(self) -> str:
        return "TaylorImportance()"


class BatchNormScaleImportance(MagnitudeImportance):
    """``|gamma|`` of the BatchNorm after a layer (network slimming, Liu et al. 2017).

    Channel granularity only: a channel's score is the sum of the BatchNorm scales in its group.
    """

    def __repr__(self) -> str:
        return "BatchNormScaleImportance()"


class RandomImportance:
    """Uniform random scores: the seed article's sparsity-based random pruning.

    Reproducible and identical on every process: the scores of a layer depend only on
    ``seed``, the number of pruning events so far and the layer name.
    """

    def __init__(self, seed: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        self.seed = seed
        self.events = 0

    def score(self, name: str, weight: Tensor) -> Tensor:
        key = zlib.crc32(f"{self.seed}/{self.events}/{name}".encode())
        generator = torch.Generator(device=weight.device)
        generator.manual_seed(key)
        return torch.rand(weight.shape, generator=generator, device=weight.device)

    def reset(self) -> None:
        self.events += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.events = int(state["events"])

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


IMPORTANCES = {
    "magnitude": MagnitudeImportance,
    "taylor": TaylorImportance,
    "random": RandomImportance,
    "bn_scale": BatchNormScaleImportance,
}


def resolve_importance(spec: object, seed: int = 0) -> Importance:
    """Turn ``"magnitude" | "taylor" | "random"`` or an :class:`Importance` object into an object."""
    if isinstance(spec, str):
        if spec not in IMPORTANCES:
            raise ValueError(f"`importance`={spec!r} is not one of {sorted(IMPORTANCES)} or an Importance object.")
        if spec == "random":
            return RandomImportance(seed)
        return cast(Importance, IMPORTANCES[spec]())
    if isinstance(spec, Importance):
        return spec
    raise TypeError(
        f"`importance` must be one of {sorted(IMPORTANCES)} or an object with a "
        f"`score(name, weight) -> Tensor` method, got {type(spec).__name__}."
    )
