"""Quantization error as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["QuantizationError"]


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
        if not isinstance(reference, Tensor) or not isinstance(quantized, Tensor):
            raise TypeError("`reference` and `quantized` must be torch.Tensors.")
        if reference.shape != quantized.shape:
            raise ValueError(
                f"`reference` {tuple(reference.shape)} and `quantized` {tuple(quantized.shape)} differ in shape."
            )
        ref = reference.detach().double()
        self.squared_error += ((ref - quantized.detach().double()) ** 2).sum().to(self.squared_error.device)
        self.squared_reference += (ref**2).sum().to(self.squared_reference.device)

    def compute(self) -> Tensor:
        if self.squared_reference == 0:
            return (self.squared_error > 0).float()
        return (self.squared_error / self.squared_reference).float()
