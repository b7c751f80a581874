"""N:M masks: exact N per block at the end, monotone on the way, blocks along the input dimension."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.importance import MagnitudeImportance, RandomImportance
from lightning_compress.core.nm import NMRule, block_view, from_block_view, is_nm, parse_nm
from lightning_compress.core.pruner import Pruner
from lightning_compress.core.selection import select_targets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 3), nn.Flatten(), nn.Linear(8 * 6, 4))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("importance", [MagnitudeImportance(), RandomImportance(1)])
def test_ramp_ends_in_an_exact_pattern(n, m, scope, importance):
    model = _model()
    targets = select_targets(model)
    pruner = Pruner(NMRule(targets, importance, n, m, scope))
    final = 1 - n / m
    previous = None
    for sparsity in (final / 3, 2 * final / 3, final):
        pruner.prune_to(sparsity)
        masks = pruner.bool_masks()
        if previous is not None:
            assert all(bool((masks[k] <= previous[k]).all()) for k in masks)
        assert abs(pruner.masked_sparsity() - sparsity) <= 1 / pruner.total or scope == "layer"
        previous = masks
    for target in targets:
        mask = pruner.bool_masks()[target.param_name]
        assert is_nm(mask, n, m)
        assert bool((block_view(mask, m).sum(-1) == n).all())  # exactly n kept per block
        assert bool((target.param[~mask] == 0).all())


def test_blocks_run_along_the_input_dimension():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    blocks = block_view(weight, 4)
    assert blocks.shape == (2, 3, 2, 4)
    assert torch.equal(blocks[0, 0, 0], weight[0, 0:4, 0])  # consecutive input channels at one kernel position
    assert torch.equal(from_block_view(blocks, weight), weight)


def test_magnitude_keeps_the_largest_of_each_block():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
    pruner = Pruner(NMRule(select_targets(nn.Sequential(layer)), MagnitudeImportance(), 2, 4, "layer"))
    pruner.prune_to(0.5)
    assert layer.weight.tolist() == [[0.0, -3.0, 2.0, 0.0]]


@pytest.mark.parametrize("spec,expected", [("2:4", (2, 4)), ("1:8", (1, 8)), ("element", None), ("2-4", None)])
def test_parse(spec, expected):
    assert parse_nm(spec) == expected


@pytest.mark.parametrize("spec", ["4:4", "0:4", "5:4", "1:128"])
def test_parse_rejects_impossible_patterns(spec):
    with pytest.raises(ValueError, match="N:M needs 0 < N < M"):
        parse_nm(spec)


def test_prune_warns_about_layers_2_4_cannot_apply_to():
    from lightning_compress import prune_

    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 8))  # 6 inputs: no blocks of 4
    with pytest.warns(
        UserWarning, match=r"prune_: layer\(s\) \['0'\] stay dense: their input size is not a multiple of 4"
    ):
        masks = prune_(model, 0.5, granularity="2:4")
    assert list(masks) == ["2.weight"] and bool(model[0].weight.ne(0).all())


def test_complex_weights_are_ranked_by_their_modulus_in_n_m_blocks():
    """Trial GM: 2:4 cast a complex weight to float before taking its magnitude, so it kept the smallest moduli."""
    from lightning_compress import prune_

    class Spectral(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([[0.01 + 5j, 0.02 + 4j, 0.5 + 0j, 0.6 + 0j]]))

    model = torch.nn.Sequential(Spectral())
    prune_(model, 0.5, include=["0"], granularity="2:4")
    assert (model[0].weight != 0).tolist() == [[True, True, False, False]]
