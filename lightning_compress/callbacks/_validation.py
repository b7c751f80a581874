"""The strategies the callbacks run under, and the collectives they use through them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..core.checks import check_choice, check_float, check_int

__all__ = [
    "StrategyCollectives", "check_choice", "check_float", "check_int", "check_strategy", "sharded_export_conflict",
]  # fmt: skip


def check_strategy(trainer: Any, callback: str, sharded_conflicts: Sequence[str] | None = None) -> None:
    """Refuse strategies the callback cannot run under.

    ``sharded_conflicts``: ``None`` if the callback cannot run with sharded parameters at all; else
    the arguments set that cannot, each with why (empty: FSDP2 through ``ModelParallelStrategy`` is supported).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    fsdp2 = "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` in configure_model"
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        supported = (
            f"strategy='ddp', a single device or FSDP2 ({fsdp2})"
            if sharded_conflicts is not None
            else ("strategy='ddp' (tested with 2 processes) or a single device")
        )
        raise ValueError(
            f"{callback} does not support {type(strategy).__name__}: it flattens or wraps the parameters, so "
            f"per-weight masks and fake-quant layers cannot attach to them. Use {supported}."
        )
    if isinstance(strategy, ModelParallelStrategy):
        if sharded_conflicts is None:
            raise ValueError(
                f"{callback} does not support sharded parameters yet ({type(strategy).__name__}): its masks would "
                "have to live with each process's shard. Use strategy='ddp' or a single device."
            )
        if sharded_conflicts:
            raise ValueError(
                f"{callback} runs under {type(strategy).__name__} (FSDP2), but not with "
                + "; ".join(sharded_conflicts)
                + ". Leave them at their defaults, or use strategy='ddp'."
            )


def sharded_export_conflict(export_path: Path | None) -> tuple[str, bool]:
    """``export_path`` as a conflict for :func:`check_strategy`: an ONNX file cannot be exported from shards."""
    return (
        "export_path to an .onnx file (ONNX export traces the model whole: write a compressed file, e.g. "
        "export_path='model.lcz', then load_compressed it into the unsharded model and export_onnx)",
        export_path is not None and export_path.suffix == ".onnx",
    )


class StrategyCollectives:
    """:class:`~lightning_compress.core.collectives.Collectives` through ``trainer.strategy``."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def rank(self) -> int:
        return int(self.strategy.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.strategy.world_size)

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Reduced on the strategy's device (NCCL reduces CUDA tensors only), returned on ``tensor``'s."""
        if self.world_size == 1:
            return tensor
        return self.strategy.reduce(tensor.to(self.strategy.root_device), reduce_op=op).to(tensor.device)
