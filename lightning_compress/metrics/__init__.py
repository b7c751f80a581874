"""torchmetrics metrics of compression."""

from .quant_error import QuantizationError, quantization_error
from .sparsity import Sparsity, zero_fraction

__all__ = ["QuantizationError", "Sparsity", "quantization_error", "zero_fraction"]
