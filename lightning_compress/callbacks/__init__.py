"""Lightning callbacks built on :mod:`lightning_compress.core`."""

from .pruning import IterativePruning
from .qat import QuantizationAwareTraining

__all__ = ["IterativePruning", "QuantizationAwareTraining"]
