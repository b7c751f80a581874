"""Sharded parameters (FSDP2 ``DTensor``): reading them whole or as this process's shard.

Under ``fully_shard`` a parameter is a ``DTensor`` outside its module's forward (each process
holds a slice of rows); inside the forward it is the whole tensor. Code that reads a weight outside
the forward (a metric, a scale search, an export) calls :func:`full` (an all-gather: collective, so
every process must call it) or :func:`local`. Without sharding both return the tensor itself.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["full", "is_sharded", "local"]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a distributed tensor (``torch.distributed.tensor.DTensor``)."""
    return callable(getattr(tensor, "full_tensor", None)) and callable(getattr(tensor, "to_local", None))


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (gathered from every process for a ``DTensor``: call it on every process)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a ``DTensor`` (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]
