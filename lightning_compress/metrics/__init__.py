"""torchmetrics metrics of compression."""

from .quant_error import QuantizationError
from .sparsity import Sparsity, zero_fraction

__all__ = ["QuantizationError", "Sparsity", "zero_fraction"]
