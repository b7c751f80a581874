"""torchmetrics metrics of compression."""

from .sparsity import Sparsity

__all__ = ["Sparsity"]
