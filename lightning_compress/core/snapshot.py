"""A copy of a model's parameters and buffers to go back to: what the accuracy guard returns to when it rolls
an event back, so that the model is again the one an evaluation judged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fake_quant import FakeQuantizer
from .sharding import is_sharded

__all__ = ["ModelSnapshot", "quantizer_flags"]


def quantizer_flags(model: nn.Module) -> list[int]:
    """Each fake quantizer's flags (on, observing, initialized), in module order: whether two moments of a model
    quantize alike."""
    return [int(m.state) for m in model.modules() if isinstance(m, FakeQuantizer)]


class ModelSnapshot:
    """Every parameter and buffer of ``model`` as they are now (this process's shards of sharded ones). The
    quantizers' scales and ranges go back only when their flags (fake quantization on, observing, initialized) are
    what they were: a rollback across the switch to fake quantization would otherwise restore quantizers that were
    off, with their default scale of 1, under a layer that now quantizes; there they keep their state, and the model
    is the judged one but for its quantizers (:meth:`restore` says which). Quantizers that only started observing
    (fake quantization off then and now) keep their ranges too: they do not change outputs."""

    def __init__(self, model: nn.Module) -> None:
        self._tensors: list[tuple[Tensor, Tensor]] = []
        quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
        with torch.no_grad():
            self._quantizer_state = [  # the flags, then each scale, zero point and range as they are now
                (q, int(q.state), [(t, t.detach().clone()) for t in [*q.parameters(), *q.buffers()] if t is not flags])
                for q in quantizers
                for flags in [q.state]
            ]
            self._quantizing = [q.fake_quant_enabled for q in quantizers]
        self.quantizer_flags = [flags for _, flags, _ in self._quantizer_state]  # as :func:`quantizer_flags` reads
        seen = {id(t) for q in quantizers for t in [*q.parameters(), *q.buffers()]}
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

    def restore(self) -> bool:
        """Write the saved values back, in place (the tensors the optimizer holds stay the same objects). When the
        quantizers' scales stay as they are, a weight whose quantizer takes its scale from it gets that scale again
        (eval mode does not recompute it).

        Returns whether the model now computes exactly what the copied one did: ``False`` when a quantizer's flags
        changed since (its scales and ranges were left as they are) and it quantizes now or did then. A quantizer
        off then and now (observers calibrating, fake quantization not yet on) passes values through: it keeps
        what it observed since, and the model is still the copied one."""
        same = [int(q.state) == flags for q, flags, _ in self._quantizer_state]
        states = zip(self._quantizer_state, self._quantizing, strict=True)
        off = [not was and not q.fake_quant_enabled for (q, _, _), was in states]
        exact = all(s or o for s, o in zip(same, off, strict=True))
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
            for (_, _, values), restore in zip(self._quantizer_state, same, strict=True):
                for tensor, saved in values if exact and restore else []:
                    tensor.copy_(saved)
            for quantizer, weight in [] if exact else self._quantized:
                # from its weight, as a training forward would (a sharded weight's next forward does it)
                own_scale = quantizer.fake_quant_enabled and quantizer.initialized and not quantizer.is_learned
                if own_scale and not is_sharded(weight):
                    quantizer.observe(weight)
        return exact
