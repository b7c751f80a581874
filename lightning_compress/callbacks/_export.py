"""Export at the end of ``fit`` for both callbacks (``export_path=``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from ..core.compact import compact
from ..core.sharding import is_sharded
from ..export.compressed import save_compressed
from ..export.onnx import export_onnx
from ..export.report import CompressionReport


def check_export_path(path: Any) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, (str, Path)):
        raise TypeError(f"`export_path` must be a path (str or pathlib.Path) or None, got {path!r}.")
    return Path(path)


def check_export_ready(path: Path | None, pl_module: pl.LightningModule) -> None:
    """``.onnx`` needs example inputs: fail at setup, not after hours of training."""
    if path is not None and path.suffix == ".onnx" and pl_module.example_input_array is None:
        raise ValueError(
            f"`export_path`={str(path)!r} is an ONNX file, which needs example inputs: set "
            f"`self.example_input_array` in {type(pl_module).__name__}.__init__ (a tensor, tuple or dict)."
        )


def example_inputs(pl_module: pl.LightningModule) -> Any:
    """``example_input_array`` through the module's batch-transfer hooks, on its device (``None`` if unset)."""
    example = pl_module.example_input_array
    if example is None:
        return None
    example = pl_module.on_before_batch_transfer(example, 0)
    example = pl_module.transfer_batch_to_device(example, pl_module.device, 0)
    return pl_module.on_after_batch_transfer(example, 0)


def export_at_fit_end(
    trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, compacted: bool = False
) -> CompressionReport | None:
    """Write the model (unchanged) to ``path`` on global rank zero; ``.onnx`` gives ONNX, anything else our format.

    ``compacted``: export a compacted copy (pruned channels removed); the model in training keeps its shapes.
    A model sharded by FSDP2 is gathered by every process and written by rank zero (our format only: the
    callbacks refuse ``.onnx`` then, at setup).
    """
    if any(is_sharded(p) for p in pl_module.parameters()):
        report = save_compressed(pl_module, path)  # every process gathers; rank zero writes
        rank_zero_info(f"Exported the compressed model:\n{report}")
        return report
    if trainer.global_rank != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(pl_module)
    model: pl.LightningModule = pl_module
    if compacted:
        model = copy.deepcopy(pl_module)  # LightningModule.__getstate__ drops the trainer
        rank_zero_info(f"Compacted the exported copy:\n{compact(model, example)}")
    report = export_onnx(model, path, example) if path.suffix == ".onnx" else save_compressed(model, path)
    rank_zero_info(f"Exported the compressed model:\n{report}")
    return report
