"""lightning-compress: prune and quantize a model while it trains with PyTorch Lightning.

The Lightning callbacks are imported lazily, so ``lightning_compress.core`` works with torch alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.compact import CompactionError, CompactReport, compact
from .core.config import PruningConfig
from .core.functional import prune_, sparsity
from .core.importance import (
    BatchNormScaleImportance,
    Importance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from .core.iterative import IterativePruner
from .core.qat import QuantConfig, calibrate, convert_to_float, convert_to_qat, enable_fake_quant, learned_scales
from .core.schedule import PruningSchedule
from .export import (
    CompressedFileError,
    CompressionReport,
    export_onnx,
    from_pretrained,
    load_compressed,
    save_compressed,
)

if TYPE_CHECKING:
    from .callbacks import CompressionMonitor, IterativePruning, QuantizationAwareTraining
    from .checkpoint import load_qat_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BatchNormScaleImportance",
    "CompactReport",
    "CompactionError",
    "CompressedFileError",
    "CompressionMonitor",
    "CompressionReport",
    "Importance",
    "IterativePruner",
    "IterativePruning",
    "MagnitudeImportance",
    "PruningConfig",
    "PruningSchedule",
    "QuantConfig",
    "QuantizationAwareTraining",
    "RandomImportance",
    "TaylorImportance",
    "__version__",
    "calibrate",
    "compact",
    "convert_to_float",
    "convert_to_qat",
    "enable_fake_quant",
    "export_onnx",
    "from_pretrained",
    "learned_scales",
    "load_compressed",
    "load_qat_checkpoint",
    "prune_",
    "save_compressed",
    "sparsity",
]

_LAZY = {
    "CompressionMonitor": ".callbacks",
    "IterativePruning": ".callbacks",
    "QuantizationAwareTraining": ".callbacks",
    "load_qat_checkpoint": ".checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazily imported callbacks among them (trial DB: tab completion missed them)."""
    return sorted({*__all__, *globals()} - {"TYPE_CHECKING", "Any", "annotations"})
