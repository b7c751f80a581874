"""Operations torch's TorchScript ONNX exporter (the one :func:`export_onnx` runs) converts at no opset, traced as the
composite operations that compute them.

* ``F.rms_norm`` (``nn.RMSNorm``'s forward, torchtune's ``RMSNorm``): ``aten::rms_norm`` has no symbolic (trial GB:
  every torchtune decoder was refused).
* ``scatter_reduce(..., include_self=False)``: "ONNX does not support include_self=False for scatter_reduce" (trial
  GE: chemprop's message passing). The positions that receive values are set to the reduction's identity, then
  reduced with ``include_self=True`` (ONNX ``ScatterElements`` with ``add``, ``mul``, ``max``, ``min``); a mean is a
  sum over a count. PyTorch Geometric's ``scatter`` takes a path of its own while torch exports, which this never
  sees: its max and min start from zero (:func:`pyg_extreme_aggregations` names the modules that aggregate so).

Each is computed as torch computes it, within rounding; everything else runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["composite_ops", "pyg_extreme_aggregations"]


def _rms_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, eps: float | None = None
) -> Tensor:
    """``F.rms_norm`` in operations every opset has, computed as torch computes it (in float for half types, the
    weight applied after the cast back)."""
    dims = tuple(range(-len(normalized_shape), 0))
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    out = (x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)).to(input.dtype)
    return out if weight is None else out * weight


_IDENTITY = {"sum": 0.0, "prod": 1.0, "amax": float("-inf"), "amin": float("inf")}


def _scatter_reduce(
    self: Tensor, dim: int, index: Tensor, src: Tensor, reduce: str, *, include_self: bool = True
) -> Tensor:
    """``self.scatter_reduce(dim, index, src, reduce, include_self=False)`` through ``include_self=True``: the
    positions ``index`` reaches start from the reduction's identity instead of ``self``'s values."""
    count = torch.zeros_like(self).scatter_add(dim, index, torch.ones_like(src))  # (a scalar scatter fails to trace)
    touched = count > 0
    if reduce == "mean":
        total = self.masked_fill(touched, 0).scatter_add(dim, index, src)
        return torch.where(touched, total / count.clamp(min=1), self)
    base = self.masked_fill(touched, _IDENTITY[reduce])
    if reduce == "sum":
        return base.scatter_add(dim, index, src)
    return base.scatter_reduce(dim, index, src, reduce, include_self=True)


def _rewritable_scatter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of a ``scatter_reduce`` call this module rewrites (``include_self=False``, a reduction it knows,
    floating point values), by name; ``None`` for one it leaves to the exporter."""
    names = ("self", "dim", "index", "src", "reduce")
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k != "input"}
    if "input" in kwargs:  # torch.scatter_reduce(input=...)
        bound["self"] = kwargs["input"]
    if bound.get("include_self", True) or set(bound) != {*names, "include_self"}:
        return None
    if bound["reduce"] not in (*_IDENTITY, "mean") or not isinstance(bound["self"], Tensor):
        return None
    return bound if bound["self"].is_floating_point() else None


class _Composites(TorchFunctionMode):
    """Runs the operations this module rewrites as their composites, everything else as it is."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.rms_norm or func is torch.rms_norm:
            return _rms_norm(*args, **kwargs)
        if func in (torch.Tensor.scatter_reduce, torch.scatter_reduce, torch.Tensor.scatter_reduce_):
            bound = _rewritable_scatter(tuple(args), kwargs)
            if bound is not None:
                out = _scatter_reduce(**bound)
                return bound["self"].copy_(out) if func is torch.Tensor.scatter_reduce_ else out
        return func(*args, **kwargs)


@contextmanager
def composite_ops() -> Iterator[None]:
    """While exporting: the operations this module rewrites traced as their composite operations."""
    with _Composites():
        yield


def pyg_extreme_aggregations(model: Any) -> list[str]:
    """The modules of ``model`` that aggregate by max or min through PyTorch Geometric's ``scatter``
    (``MaxAggregation``, ``MinAggregation``: ``SAGEConv(aggr="max")``'s ``aggr_module``). While torch exports to ONNX,
    ``scatter`` starts these from zero (trial GF: a graph computing max(0, ·), 1.36 off outputs up to 3.12)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__module__.startswith("torch_geometric")
        and type(module).__name__ in ("MaxAggregation", "MinAggregation")
    ]
