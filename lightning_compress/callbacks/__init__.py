"""Lightning callbacks built on :mod:`lightning_compress.core`."""

from .pruning import IterativePruning

__all__ = ["IterativePruning"]
