"""torchmetrics metrics of compression."""

from .quant_error import QuantizationError
from .sparsity import Sparsity

__all__ = ["QuantizationError", "Sparsity"]
