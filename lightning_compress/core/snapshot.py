"""A copy of a model's parameters and buffers to go back to: what the accuracy guard returns to when it rolls
an event back, so that the model is again the one an evaluation judged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fake_quant import FakeQuantizer
from .sharding import is_sharded

__all__ = ["ModelSnapshot"]


class ModelSnapshot:
    """Every parameter and buffer of ``model`` as they are now (this process's shards of sharded ones), but for
    the quantizers' state: fake quantization's switch, scales and ranges belong to quantization-aware training, not
    to the model an evaluation judged (a rollback across the switch would restore quantizers that were off, with
    their default scale of 1, under a layer that quantizes)."""

    def __init__(self, model: nn.Module) -> None:
        self._tensors: list[tuple[Tensor, Tensor]] = []
        seen = {id(t) for m in model.modules() if isinstance(m, FakeQuantizer) for t in [*m.parameters(), *m.buffers()]}
        self._quantized: list[tuple[FakeQuantizer, Tensor]] = [  # (a weight's quantizer, the weight)
            (q, m.weight)
            for m in model.modules()
            if isinstance(q := getattr(m, "weight_fake_quant", None), FakeQuantizer) and isinstance(m.weight, Tensor)
        ]
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        with torch.no_grad():
            for _, tensor in named:
                if tensor is None or id(tensor) in seen:  # a tied parameter is copied once
                    continue
                seen.add(id(tensor))
                self._tensors.append((tensor, tensor.detach().clone()))

    def restore(self) -> None:
        """Write the saved values back, in place (the tensors the optimizer holds stay the same objects); a weight
        whose quantizer takes its scale from it gets that scale again (eval mode does not recompute it)."""
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
            for quantizer, weight in self._quantized:
                # from its weight, as a training forward would (a sharded weight's next forward does it)
                own_scale = quantizer.fake_quant_enabled and quantizer.initialized and not quantizer.is_learned
                if own_scale and not is_sharded(weight):
                    quantizer.observe(weight)
