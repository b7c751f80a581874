"""Quantization error as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["QuantizationError", "quantization_error"]


class QuantizationError(Metric):
    """Relative squared error ``sum (x - q(x))^2 / sum x^2`` over every pair passed to :meth:`update`.

    0 means lossless; 1 means the error is as large as the signal. Sums are reduced across processes.

    Example:
        >>> import torch
        >>> from lightning_compress.metrics import QuantizationError
        >>> metric = QuantizationError()
        >>> metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        >>> metric.compute()
        tensor(0.2000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    squared_error: Tensor
    squared_reference: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("squared_error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squared_reference", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reference: Tensor, quantized: Tensor) -> None:
        """Add one ``(float tensor, its quantized version)`` pair of the same shape."""
        squared_error, squared_reference = _squared_sums(reference, quantized)
        self.squared_error += squared_error.to(self.squared_error.device)
        self.squared_reference += squared_reference.to(self.squared_reference.device)

    def compute(self) -> Tensor:
        return _relative(self.squared_error, self.squared_reference)


def quantization_error(reference: Tensor, quantized: Tensor) -> Tensor:
    """Functional twin of :class:`QuantizationError`: ``sum (x - q(x))^2 / sum x^2`` for one pair.

    Args:
        reference: the float tensor ``x``.
        quantized: its quantized values ``q(x)``, of the same shape.

    Example:
        >>> import torch
        >>> from lightning_compress.metrics import quantization_error
        >>> quantization_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        tensor(0.2000)
    """
    return _relative(*_squared_sums(reference, quantized))


def _squared_sums(reference: Tensor, quantized: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(reference, Tensor) or not isinstance(quantized, Tensor):
        raise TypeError("`reference` and `quantized` must be torch.Tensors.")
    if reference.shape != quantized.shape:
        raise ValueError(
            f"`reference` {tuple(reference.shape)} and `quantized` {tuple(quantized.shape)} differ in shape."
        )
    ref, quant = (_dense(t, name) for t, name in ((reference, "reference"), (quantized, "quantized")))
    return ((ref - quant.to(ref.device)) ** 2).sum(), (ref**2).sum()


def _dense(tensor: Tensor, argument: str) -> Tensor:
    if tensor.is_meta:
        raise ValueError(f"`{argument}` is on the meta device: it holds no values to compare.")
    tensor = tensor.detach()
    return (tensor if tensor.layout == torch.strided else tensor.to_dense()).double()


def _relative(squared_error: Tensor, squared_reference: Tensor) -> Tensor:
    if squared_reference == 0:
        return (squared_error > 0).float()
    return (squared_error / squared_reference).float()
