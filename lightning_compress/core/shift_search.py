"""Power-of-two shifts chosen on real inputs (the seed article's fixed point, ``W_int = round(W * 2^p)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .collectives import Collectives, TorchDistributed
from .fake_quant import FakeQuantizer
from .qat_layers import QATLayer
from .quant import int_range, power_of_two_scale
from .sharding import full

__all__ = ["search_power_of_two_shifts"]


@torch.no_grad()
def search_power_of_two_shifts(
    module: nn.Module,
    inputs: Sequence[Tensor],
    span: Sequence[int] = (-1, 0, 1, 2),
    collectives: Collectives | None = None,
) -> tuple[int, int | None, float]:
    """Choose the weight and input shifts of one power-of-two QAT layer on real inputs.

    Candidates are the no-clipping shift ``p0`` (from the current ranges) plus ``span``; the pair
    with the smallest mean squared error of the layer output against the float output wins and
    is fixed (:meth:`FakeQuantizer.set_shift`). Returns ``(weight shift, input shift, error)``.

    ``collectives``: with several processes (DDP, FSDP2), each passes its own inputs; the input range and
    every candidate's error are reduced over all of them (one collective each), so every process
    fixes the same shifts, those the union of the inputs would choose (each uses as many batches as the
    process with the fewest). ``None``: ``torch.distributed`` when initialized. Under FSDP2 run it inside
    :func:`~.sharding.unsharded` when the layer is not its own ``fully_shard`` unit.
    """
    group = collectives or TorchDistributed()
    if not isinstance(module, QATLayer):
        raise TypeError(f"expected a QAT layer, got {type(module).__name__}")
    wq = module.weight_fake_quant
    aq = module.input_fake_quant if isinstance(module.input_fake_quant, FakeQuantizer) else None
    if not inputs:
        raise ValueError("shift search needs at least one captured input batch.")
    if group.world_size > 1:  # every process runs as many forwards (FSDP2 may all-gather in each)
        inputs = inputs[: int(group.all_reduce(torch.tensor([len(inputs)]), "min").item())]
    dtype = cast(Tensor, module.weight).dtype  # inputs captured under autocast (bf16-mixed) are in its dtype
    inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    states = [(q, q.fake_quant_enabled, q.observer_enabled) for q in (wq, aq) if q is not None]
    for q, _, _ in states:
        q.fake_quant_enabled = False
        q.observer_enabled = False
    reference = [module(x) for x in inputs]
    _, w_qmax = int_range(wq.bits, True)
    w0 = int(power_of_two_scale(full(cast(Tensor, module.weight)).abs().max(), w_qmax)[0])
    a0 = None
    if aq is not None:
        lo = -float(group.all_reduce(torch.tensor([-min(float(x.min()) for x in inputs)]), "max").item())
        hi = float(group.all_reduce(torch.tensor([max(float(x.max()) for x in inputs)]), "max").item())
        aq.set_signed(lo < 0)
        _, a_qmax = aq.qrange
        a0 = int(power_of_two_scale(torch.tensor(max(abs(lo), abs(hi))), a_qmax)[0])
    best: tuple[float, int, int | None] | None = None
    for dw in span:
        for da in span if aq is not None else [0]:
            wq.set_shift(w0 + dw)
            wq.fake_quant_enabled = True
            if aq is not None and a0 is not None:
                aq.set_shift(a0 + da)
                aq.fake_quant_enabled = True
            local = sum(float(((module(x) - ref) ** 2).mean()) for x, ref in zip(inputs, reference, strict=True))
            error = float(group.all_reduce(torch.tensor([local], dtype=torch.float64), "sum").item())
            if best is None or error < best[0]:
                best = (error, w0 + dw, None if a0 is None else a0 + da)
    assert best is not None
    error, w_shift, a_shift = best
    wq.set_shift(w_shift)
    if aq is not None and a_shift is not None:
        aq.set_shift(a_shift)
    for q, enabled, observing in states:
        q.fake_quant_enabled = enabled
        q.observer_enabled = observing
    return w_shift, a_shift, error
