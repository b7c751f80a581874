"""The zeros of a model pruned before, as masks (what ``IterativePruner.keep_zeros`` starts the schedule from)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.core.earlier_pruning import initialized_zeros, zeros_as_masks
from lightning_compress.core.selection import select_targets


def test_initialized_zeros_are_a_zero_weight_or_one_value_beside_zeros():
    assert initialized_zeros(torch.zeros(4, 4))  # a LoRA-style B matrix
    assert initialized_zeros(torch.eye(4))  # eye_, dirac_
    assert initialized_zeros(-2 * torch.eye(3))
    pruned = torch.tensor([[0.0, 0.5], [-0.3, 0.0]])
    assert not initialized_zeros(pruned)
    assert not initialized_zeros(torch.ones(2, 2) + torch.eye(2))  # no zero but two values


def test_zeros_become_masks_except_initialized_and_floored_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight[:, :5] = 0  # pruned to 50%
        model[1].weight.copy_(torch.eye(10))  # an initialization
        model[2].weight.zero_()
        model[2].weight[0, :2] = torch.tensor([0.7, -0.2])  # 2% density: under a 5% floor
    masks, sparsity, left = zeros_as_masks(select_targets(model), min_density=0.05)
    assert set(masks) == {"0.weight"} and masks["0.weight"].dtype == torch.bool
    assert torch.equal(masks["0.weight"], model[0].weight != 0)
    assert sparsity == 50 / 400  # counted over every selected weight, dense ones too
    assert left == ["1.weight", "2.weight"]  # model[3] is dense: neither masked nor left out
    _, _, without_floor = zeros_as_masks(select_targets(model), min_density=0.0)
    assert without_floor == ["1.weight"]
