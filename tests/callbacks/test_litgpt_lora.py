"""LoRA layers of ``litgpt`` (trial FH), written here as litgpt writes them: the base layer is ``linear``, the adapters
the Parameters ``lora_A`` and ``lora_B``, whose product ``merge_lora_weights`` adds to the base weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import IterativePruning, QuantizationAwareTraining
from lightning_compress.core.adapters import lora_note
from tests.conftest import TinyModule, trainer


class _LoRALinear(nn.Module):
    def __init__(self, i: int, o: int, r: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o)
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(r, i) * 0.1), nn.Parameter(torch.zeros(o, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + x @ self.lora_A.T @ self.lora_B.T


class _WithLoRA(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net[0], self.net[2] = _LoRALinear(16, 32), _LoRALinear(32, 32)


def test_litgpt_lora_layers_are_named_with_what_merging_does():
    model = _WithLoRA()
    note = lora_note(model, ["net.0.linear", "net.2.linear", "net.4"], "prunes")
    assert note is not None and "2 adapter layer(s) (litgpt: ['net.0', 'net.2'])" in note
    assert "`merge_lora_weights(model)` adds the adapters' dense update" in note
    assert lora_note(model, ["net.4"], "prunes") is None
    assert lora_note(TinyModule(), ["net.0", "net.2"], "prunes") is None


@pytest.mark.parametrize(
    ("callback", "said"),
    [
        (lambda: IterativePruning(0.5, start_epoch=0, end_epoch=1), "prunes the base weights of 2"),
        (lambda: QuantizationAwareTraining(start_epoch=0), "fake-quantizes the base weights of 2"),
    ],
)
def test_the_callbacks_say_what_merging_litgpt_adapters_does(callback, said):
    """Trial FH: a 0.90 sparse litgpt LoRA model was 0.16 sparse once merged, and merged QAT logits moved by 0.45;
    peft's adapters got this warning, litgpt's none."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=rf"{said} adapter layer\(s\) \(litgpt: .*merge_lora_weights"):
        trainer(max_epochs=2, callbacks=[callback()]).fit(_WithLoRA())
