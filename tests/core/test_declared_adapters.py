"""LoRA layers that hold their base weight themselves and declare their adapters (torchtune's ``LoRALinear``, its
``AdapterModule`` protocol): the base weight is compressed as a layer's, the adapters are left out (trial GB)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import QuantConfig, compact, convert_to_qat, prune_
from lightning_compress.core.adapters import adapter_modules, declared_lora_base, lora_note
from lightning_compress.core.selection import select_targets


class LoRALinear(nn.Module):
    """torchtune's ``LoRALinear``, as it is written (torchtune is not a dependency): the base weight a Parameter of its
    own, multiplied with ``F.linear``, and the adapters ``lora_a``/``lora_b`` named by ``adapter_params()``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim).weight.detach().clone())
        self.bias = None
        self.dropout = nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.05)  # trained adapters (torchtune starts B at zero)

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + (self.alpha / self.rank) * self.lora_b(self.lora_a(self.dropout(x)))


class Block(nn.Module):
    """LoRA on two projections, a plain MLP beside them (as torchtune's Llama with `lora_attn_modules`)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = LoRALinear(16, 64)
        self.down = LoRALinear(64, 16)
        self.w1, self.w2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x + self.w2(torch.relu(self.w1(x))))


def test_the_base_weights_are_selected_and_the_declared_adapters_left_out():
    torch.manual_seed(0)
    model = Block()
    assert declared_lora_base(model.up) and not declared_lora_base(model.up.lora_a) and not declared_lora_base(model)
    assert [t.name for t in select_targets(model)] == ["up", "down", "w1", "w2", "head"]
    assert "torchtune" in adapter_modules(model)[id(model.up.lora_a)]
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    prune_(model, 0.8, importance="magnitude")
    assert float((model.up.weight == 0).float().mean()) > 0.5
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_" in n)  # dense
    named = select_targets(model, include=["up.lora_a"])  # an exact name still picks one
    assert [t.name for t in named] == ["up.lora_a"]


def test_quantization_says_the_base_weights_stay_float_and_leaves_the_adapters_float():
    model = Block()
    with pytest.warns(UserWarning, match=r"2 are torchtune LoRA layers, which multiply their base weight in their own"):
        assert convert_to_qat(model, QuantConfig(8, 8)) == ["w1", "w2", "head"]
    assert type(model.up.lora_a) is nn.Linear and type(model.up) is LoRALinear


def test_channel_pruning_keeps_the_rank_and_compacts_exactly():
    """Trial GB: the rank was cut 8 -> 4 (the adapters' channels pruned) and `LoRALinear.rank` still read 8."""
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_(model, 0.5, granularity="channel", example_inputs=x)
    with torch.no_grad():
        masked = model(x)
    compact(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=0)
    assert model.w1.out_features == 16  # the MLP beside them
    assert model.up.lora_a.out_features == 4 and model.up.lora_b.in_features == 4  # the rank kept


def test_the_merge_note_names_torchtunes_merge():
    note = lora_note(Block(), ["up", "down", "w1", "head"], "prunes")
    assert note is not None and "2 adapter layer(s) (torchtune: ['up', 'down'])" in note
    assert "`get_merged_lora_ckpt` adds the adapters' dense update" in note
