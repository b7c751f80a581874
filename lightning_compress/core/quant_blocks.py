"""Channel removal that keeps group-wise weight quantization intact.

A layer quantized with scales per group of ``g`` consecutive input weights (``QuantConfig(group_size=g)``,
the int4 LLM recipe) holds one scale per block ``[k*g, (k+1)*g)`` of its inputs. Removing some input
columns of a block would shift every later column into another block, under another scale: the
compacted layer would not compute what was trained. Removing whole blocks leaves every other block,
its codes and its scale as they were. So :func:`keep_whole_blocks` keeps the pruned channels that
share a block with a surviving input (they stay, exactly zero) and :func:`cut_quant_groups` removes
the scales of the blocks that go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .groups import ChannelGroup
from .wrappers import modules_by_name

__all__ = ["channel_blocks", "cut_quant_groups", "grouped_consumers", "keep_whole_blocks", "quant_group_size"]


def quant_group_size(module: nn.Module) -> int | None:
    """The input weights per scale of ``module``'s group-wise weight quantizer (``None``: no groups)."""
    quantizer: Any = getattr(module, "weight_fake_quant", None)
    if quantizer is None or not getattr(quantizer, "groups", 0):
        return None
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight.numel() // quantizer.scale.numel()


def grouped_consumers(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, int]:
    """The layers whose inputs are channels of ``groups`` and whose weights are quantized in groups of input weights
    (name: group size): there a channel can leave only with every other channel of its block."""
    modules = modules_by_name(model)
    found = {s.module: quant_group_size(modules[s.module]) for g in groups for s in g.slices if s.kind == "in"}
    return {name: size for name, size in found.items() if size is not None}


def channel_blocks(modules: dict[str, nn.Module], groups: list[ChannelGroup]) -> list[Tensor | None]:
    """Per group, which of its channels share a quantization block of a layer they feed (a label per channel:
    channels with one label leave together, or ``compact`` cannot remove them); ``None`` where every channel is a
    block of its own (no layer it feeds quantizes its inputs in groups)."""
    out: list[Tensor | None] = []
    for group in groups:
        label = torch.arange(group.size)
        keys = []
        for s in group.slices:
            size = quant_group_size(modules[s.module]) if s.kind == "in" else None
            if size is not None:
                keys.append((s.index // size, s.channel))
        changed = bool(keys)
        while changed:  # every channel takes the smallest label of the channels it shares a block with
            changed = False
            for block, channel in keys:
                smallest = torch.full((int(block.max()) + 1,), group.size, dtype=torch.long)
                smallest.scatter_reduce_(0, block, label[channel], reduce="amin")
                new = torch.minimum(label[channel], smallest[block])
                if bool((new != label[channel]).any()):
                    label.scatter_reduce_(0, channel, new, reduce="amin")
                    changed = True
        out.append(label if keys and bool((label != torch.arange(group.size)).any()) else None)
    return out


def cut_quant_groups(quantizer: Any, in_keep: Tensor, group_size: int) -> None:
    """Keep the scales of the blocks ``in_keep`` (sorted input positions, whole aligned blocks) consists of."""
    blocks = in_keep.reshape(-1, group_size) if in_keep.numel() % group_size == 0 else None
    offsets = torch.arange(group_size, device=in_keep.device)
    if blocks is None or not bool((blocks == blocks[:, :1] + offsets).all()) or bool((blocks[:, 0] % group_size).any()):
        raise ValueError(
            f"the kept inputs must be whole groups of {group_size} (group-wise weight quantization); removing part "
            "of a group would put the inputs after it under other scales."
        )
    kept = (blocks[:, 0] // group_size).to(quantizer.scale.device)
    scale = quantizer.scale.detach().index_select(1, kept).clone()
    if isinstance(quantizer.scale, nn.Parameter):
        quantizer.scale = nn.Parameter(scale, requires_grad=quantizer.scale.requires_grad)
    else:
        quantizer.scale = scale
    quantizer.groups = int(kept.numel())


def keep_whole_blocks(model: nn.Module, groups: list[ChannelGroup], dead: list[Tensor]) -> dict[str, int]:
    """Take back from ``dead`` (per group, the channels to remove; changed in place) every channel whose input
    position shares a quantization block with one that stays; return how many each group keeps so.

    A group keeps at least one channel (as :func:`~lightning_compress.core.compact.plan` does), and a channel
    kept for one layer is kept in every layer it feeds, so this repeats until nothing changes.
    """
    modules = modules_by_name(model)
    sizes = grouped_consumers(model, groups)
    kept = dict.fromkeys((g.name for g in groups), 0)
    for channels in dead:
        if bool(channels.all()):
            channels[0] = False
    while sizes:
        gone: dict[str, Tensor] = {}
        for i, group in enumerate(groups):
            for s in group.slices:
                if s.module in sizes and s.kind == "in":
                    inputs = modules[s.module].weight.numel() // modules[s.module].weight_fake_quant.scale.shape[0]
                    mask = gone.setdefault(s.module, torch.zeros(int(inputs), dtype=torch.bool))
                    mask[s.index[dead[i][s.channel]]] = True
        changed = False
        for name, mask in gone.items():
            blocks = mask.reshape(-1, sizes[name])
            partial = (blocks.any(dim=1) & ~blocks.all(dim=1)).repeat_interleave(sizes[name]) & mask
            for i, group in enumerate(groups):
                for s in group.slices:
                    if s.module != name or s.kind != "in":
                        continue
                    back = s.channel[partial[s.index] & dead[i][s.channel]].unique()
                    if back.numel():
                        dead[i][back] = False
                        kept[group.name] += int(back.numel())
                        changed = True
        if not changed:
            break
    return {name: n for name, n in kept.items() if n}
