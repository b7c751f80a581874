"""Lightning callbacks built on :mod:`lightning_compress.core`."""

from .monitor import CompressionMonitor
from .pruning import IterativePruning
from .qat import QuantizationAwareTraining

__all__ = ["CompressionMonitor", "IterativePruning", "QuantizationAwareTraining"]
