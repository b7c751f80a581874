"""Sharded parameters (FSDP2 ``DTensor``): reading them whole or as this process's shard.

Under ``fully_shard`` a parameter is a ``DTensor`` outside its module's forward (each process
holds a slice of rows); inside the forward it is the whole tensor. Code that reads a weight outside
the forward (a metric, a scale search, an export) calls :func:`full` (an all-gather: collective, so
every process must call it) or :func:`local`. Without sharding both return the tensor itself.

Pruning works on the shards themselves: a parameter sharded by rows (``Shard(0)`` on a one-dimensional
mesh, what ``fully_shard`` does) has its elements, flattened, in rank order: process ``r``'s shard is one
contiguous run of the whole flattened tensor, starting at :func:`flat_offset`. :func:`gather_flat`
puts such runs back together and :func:`local_part` cuts a whole tensor down to this process's run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .collectives import Collectives

__all__ = [
    "check_row_sharded", "flat_offset", "full", "gather_flat", "is_sharded", "local", "local_part", "row_range",
    "unsharded",
]  # fmt: skip


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a distributed tensor (``torch.distributed.tensor.DTensor``)."""
    return callable(getattr(tensor, "full_tensor", None)) and callable(getattr(tensor, "to_local", None))


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (gathered from every process for a ``DTensor``: call it on every process)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a ``DTensor`` (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def check_row_sharded(tensor: Tensor, name: str) -> str | None:
    """Why ``tensor`` cannot be pruned shard by shard (``None``: it can, or it is not sharded).

    Supported: ``Shard(0)`` on a one-dimensional device mesh (``fully_shard``), whose process order is
    the global rank order.
    """
    if not is_sharded(tensor):
        return None
    placements = tuple(getattr(tensor, "placements", ()))
    mesh = getattr(tensor, "device_mesh", None)
    dims = getattr(placements[0], "dim", None) if len(placements) == 1 else None
    if mesh is None or mesh.ndim != 1 or dims != 0 or not placements[0].is_shard():
        return (
            f"{name} is distributed as {placements} over a {getattr(mesh, 'ndim', '?')}-D mesh; pruning supports "
            "parameters sharded by rows over one data-parallel mesh (FSDP2's `fully_shard`)"
        )
    if mesh.get_local_rank() != torch.distributed.get_rank():
        return f"{name}'s mesh does not order processes by global rank"
    return None


def flat_offset(tensor: Tensor) -> int:
    """Index of this process's first element in the flattened whole ``tensor`` (0 when not sharded).

    ``fully_shard`` splits rows as ``torch.chunk`` does: ``ceil(rows / world)`` per process, the last ones
    shorter or empty.
    """
    if not is_sharded(tensor):
        return 0
    rows = tensor.shape[0]
    world = tensor.device_mesh.size()  # type: ignore[attr-defined]
    per = -(-rows // world)
    start = min(per * tensor.device_mesh.get_local_rank(), rows)  # type: ignore[attr-defined]
    return start * (tensor.numel() // rows if rows else 0)


def row_range(tensor: Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the whole ``tensor`` that this process's shard holds (all rows if not sharded)."""
    rows = tensor.shape[0] if tensor.dim() else 1
    if not is_sharded(tensor):
        return 0, rows
    start = flat_offset(tensor) // (tensor.numel() // rows) if rows and tensor.numel() else 0
    return start, start + local(tensor).shape[0]


def local_part(tensor: Tensor, whole: Tensor) -> Tensor:
    """The part of ``whole`` (shaped like the whole ``tensor``) that this process's shard holds."""
    if not is_sharded(tensor):
        return whole
    shard = local(tensor)
    start = flat_offset(tensor)
    return whole.reshape(-1)[start : start + shard.numel()].view(shard.shape)


def gather_flat(part: Tensor, collectives: Collectives, counts: Tensor | None = None) -> Tensor:
    """Every process's 1-D ``part`` concatenated in rank order, on every process (two sums).

    Parts may differ in length. Bool parts are gathered as bytes and returned as bool. ``counts``: every
    process's length, when the caller already has them (one sum then).
    """
    world = collectives.world_size
    if world == 1:
        return part
    if counts is None:
        counts = torch.zeros(world, dtype=torch.int64, device=part.device)
        counts[collectives.rank] = part.numel()
        counts = collectives.all_reduce(counts, "sum")
    start = int(counts[: collectives.rank].sum())
    dtype = torch.uint8 if part.dtype == torch.bool else part.dtype
    buffer = torch.zeros(int(counts.sum()), dtype=dtype, device=part.device)
    buffer[start : start + part.numel()] = part.to(dtype)
    gathered = collectives.all_reduce(buffer, "sum")
    return gathered.bool() if part.dtype == torch.bool else gathered


@contextmanager
def unsharded(module: nn.Module, root: nn.Module) -> Iterator[None]:
    """Inside, ``module``'s parameters are whole (FSDP2 ``unshard()`` of the ``fully_shard`` unit that owns it,
    ``module`` itself or its nearest ancestor in ``root``), so it can run on its own outside the root's forward;
    resharded after. A collective: every process must enter it. Nothing happens without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    parents = {child: parent for parent in root.modules() for child in parent.children()}
    owner: nn.Module | None = module
    while owner is not None and not isinstance(owner, FSDPModule):
        owner = parents.get(owner)
    if owner is None:
        yield
        return
    owner.unshard()
    try:
        yield
    finally:
        owner.reshard()


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back to its shards. A forward without backward (validation) leaves the
    root unit's parameters gathered, and the next training forward reuses that gathered copy: weights written to
    the shards in between (a pruning event, a rollback) would not reach it. A no-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def model_class_name(model: nn.Module) -> str:
    """``model``'s class name as its user wrote it: FSDP2's ``fully_shard`` gives a module it shards a class of its
    own, ``FSDP<name>``, a subclass of the user's (a trial: a compressed file named the model 'FSDPMLP')."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return type(model).__name__
    if not isinstance(model, FSDPModule):
        return type(model).__name__
    return next(b for b in type(model).__mro__ if not issubclass(b, FSDPModule)).__name__
