"""The strategies the callbacks run under, and the collectives they use through them."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.checks import check_choice, check_float, check_int

__all__ = ["StrategyCollectives", "check_choice", "check_float", "check_int", "check_strategy"]


def check_strategy(trainer: Any, callback: str) -> None:
    """Sharded strategies flatten or shard parameters: masks and fake-quant layers cannot attach to them."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{callback} does not support {type(strategy).__name__}: it shards or flattens the parameters, so "
            "per-weight masks and fake-quant layers cannot attach to them. Use strategy='ddp' (tested with "
            "2 processes) or a single device."
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
        if self.world_size == 1:
            return tensor
        return self.strategy.reduce(tensor, reduce_op=op)
