"""The collectives compression needs across processes, in one place.

Everything that talks to other processes goes through a :class:`Collectives` object: the
Lightning callbacks pass one that calls ``trainer.strategy``; outside Lightning,
:class:`TorchDistributed` uses ``torch.distributed`` when a process group is initialized and is a
no-op otherwise.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Collectives", "TorchDistributed", "broadcast_masks"]

REDUCE_OPS = ("sum", "mean", "min", "max")


class Collectives(Protocol):
    """All-reduce over the processes of a run (``op`` in ``"sum" | "mean" | "min" | "max"``)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """The reduced tensor (``tensor`` itself may be reduced in place)."""
        ...


class TorchDistributed:
    """:class:`Collectives` over the default ``torch.distributed`` process group; a no-op without one."""

    @staticmethod
    def _active() -> bool:
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if self._active() else 0

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if self._active() else 1

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        if op not in REDUCE_OPS:
            raise ValueError(f"`op`={op!r} is not one of {REDUCE_OPS}.")
        if not self._active():
            return tensor
        dist = torch.distributed
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}.get(
            op, dist.ReduceOp.MAX
        )
        device = tensor.device
        if dist.get_backend() == "nccl" and device.type != "cuda":  # NCCL reduces CUDA tensors only
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tensor, op=reduce_op)
        tensor = tensor.div_(dist.get_world_size()) if op == "mean" else tensor
        return tensor.to(device)


def broadcast_masks(masks: dict[str, Tensor], collectives: Collectives) -> dict[str, Tensor]:
    """Rank 0's bool masks on every process: one sum over all masks, in which every other rank adds zeros."""
    if collectives.world_size == 1 or not masks:
        return masks
    flat = [mask.reshape(-1) for mask in masks.values()]
    device = flat[0].device
    total = sum(f.numel() for f in flat)
    if collectives.rank == 0:
        buffer = torch.cat([f.to(device, torch.uint8) for f in flat])
    else:
        buffer = torch.zeros(total, dtype=torch.uint8, device=device)
    reduced = collectives.all_reduce(buffer, "sum").bool()
    out, offset = {}, 0
    for (name, mask), f in zip(masks.items(), flat, strict=True):
        out[name] = reduced[offset : offset + f.numel()].reshape(mask.shape).to(mask.device)
        offset += f.numel()
    return out
