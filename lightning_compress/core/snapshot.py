"""A copy of a model's parameters and buffers to go back to: what the accuracy guard returns to when it rolls
an event back, so that the model is again the one an evaluation judged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ModelSnapshot"]


class ModelSnapshot:
    """Every parameter and buffer of ``model`` as they are now (this process's shards of sharded ones)."""

    def __init__(self, model: nn.Module) -> None:
        self._tensors: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        with torch.no_grad():
            for _, tensor in named:
                if tensor is None or id(tensor) in seen:  # a tied parameter is copied once
                    continue
                seen.add(id(tensor))
                self._tensors.append((tensor, tensor.detach().clone()))

    def restore(self) -> None:
        """Write the saved values back, in place (the tensors the optimizer holds stay the same objects)."""
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
