"""Channel pruning through GroupNorm: a GroupNorm's group of channels is the unit, kept or removed whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import compact, prune_
from lightning_compress.core.groups import ChannelGroup, LayerSlice
from lightning_compress.core.resize import resize_module
from lightning_compress.core.shrink import check_shapes
from lightning_compress.core.structure import _norm_group_units, build_channel_groups
from tests.conftest import prune_and_compact


class _Block(nn.Module):
    def __init__(self, c: int, groups: int, second_groups: int | None = None) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(second_groups or groups, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))


def _gn_net(groups: int = 4, second_groups: int | None = None, affine: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(groups, 16, affine=affine), nn.ReLU(),
        _Block(16, groups, second_groups), nn.Conv2d(16, 32, 3, stride=2), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for m in model.modules():  # scales and shifts away from 1 and 0, so that a channel left half-cut would show
        if isinstance(m, nn.GroupNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _x() -> torch.Tensor:
    return torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_group_norm_groups_are_pruned_whole_and_compacted_exactly():
    """GroupNorm's channels were left whole ("normalizes over several channels"): a diffusers UNet's convolutions,
    GroupNorm after each, gave channel pruning nothing but its time embedding (trial ES). A whole group zeroed (its
    inputs, scale and shift) gives zeros, as removing it does, so the group is the unit."""
    model = _gn_net()
    groups, skipped = build_channel_groups(model, _x())
    by_name = {g.name: g for g in groups}
    assert {g.name: (g.size, g.unit_channels) for g in groups} == {"4": (8, 4), "3.c2": (4, 4), "3.c1": (4, 4)}
    assert not any("GroupNorm" in why for why in skipped.values())
    assert by_name["3.c2"].modules() == ["0", "1", "3.c1", "3.c2", "3.n2", "4"]  # the residual chain, both norms
    report = prune_and_compact(model, _x(), atol=1e-5)
    assert report.channels == {"4": (32, 16), "3.c2": (16, 8), "3.c1": (16, 8)}  # counted in channels
    assert (model[1].num_groups, model[1].num_channels) == (2, 8)
    assert (model[3].n1.num_groups, model[5].num_groups, model[5].num_channels) == (2, 4, 16)
    assert model[3].c1.weight.shape == (8, 8, 3, 3)


def test_masks_cut_whole_groups_of_every_group_norm_before_compaction():
    model = _gn_net()
    prune_(model, 0.5, granularity="channel", example_inputs=_x())
    for norm in (model[1], model[3].n1, model[3].n2, model[5]):
        width = norm.num_channels // norm.num_groups
        zero = (norm.weight == 0).reshape(-1, width)
        assert bool((zero.all(1) | ~zero.any(1)).all())  # a group is all zero or all kept
        assert int(zero.all(1).sum()) == norm.num_groups // 2
        assert torch.equal(norm.weight == 0, norm.bias == 0)


def test_group_norms_of_different_widths_in_one_chain_remove_channels_in_units_both_keep_whole():
    """GroupNorm(4, 16) and GroupNorm(2, 16) in one residual chain: a unit is a group of the wider (8 channels)."""
    model = _gn_net(groups=4, second_groups=2)
    groups, _ = build_channel_groups(model, _x())
    chain = next(g for g in groups if g.name == "3.c2")
    assert (chain.size, chain.unit_channels) == (2, 8)
    report = prune_and_compact(model, _x(), atol=1e-5)
    assert report.channels["3.c2"] == (16, 8)
    assert (model[1].num_groups, model[3].n2.num_groups) == (2, 1)


class _Concat(nn.Module):
    """Six channels of one conv and ten of another concatenated into GroupNorm(4, 16): its second group holds
    channels of both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 10, 3, padding=1)
        self.norm, self.head = nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 1)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))
        return self.out(h.mean((2, 3)))


def test_a_concatenation_splitting_a_group_norm_group_leaves_both_sides_whole_with_the_reason():
    groups, skipped = build_channel_groups(_Concat(), _x())
    assert [g.name for g in groups] == ["head"]
    for name in ("a", "b"):
        assert (
            "norm (GroupNorm, 4 groups of 4 channels) normalizes these channels together with others" in (skipped[name])
        )


def test_a_group_norm_without_scale_and_shift_leaves_its_channels_whole_with_the_reason():
    groups, skipped = build_channel_groups(_gn_net(affine=False), _x())
    assert "3.c2" not in {g.name for g in groups}
    assert "1 (GroupNorm without a scale and shift, affine=False)" in skipped["3.c2"]


def test_round_to_counts_a_group_norms_channels():
    """`round_to=8` with groups of 4 channels: two groups at a time, so every kept width is a multiple of 8."""
    model = _gn_net()
    prune_(model, 0.3, granularity="channel", example_inputs=_x(), round_to=8)
    report = compact(model.eval(), _x())
    assert all(after % 8 == 0 for _, after in report.channels.values())
    assert any(after < before for before, after in report.channels.values())


def test_a_group_norm_is_cut_only_by_whole_groups():
    norm = nn.GroupNorm(4, 16)
    with pytest.raises(ValueError, match=r"GroupNorm \(4 groups of 4 channels\) keeps whole groups"):
        resize_module(norm, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"GroupNorm \(4 groups of 4 channels\) keeps whole groups"):
        resize_module(norm, torch.tensor([1, 2, 3, 4]))  # four channels, not one group
    assert (norm.num_groups, norm.weight.shape) == (4, (16,))
    resize_module(norm, torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]))
    assert (norm.num_groups, norm.num_channels, norm.weight.shape) == (2, 8, (8,))


def test_a_record_of_sizes_that_splits_a_group_norm_group_is_refused():
    """A file or config that gives a GroupNorm a width that is not whole groups (a hostile or damaged one)."""
    model = _gn_net()
    with pytest.raises(ValueError, match=r"compacted sizes that do not fit Sequential: \['1.weight: \[6\]"):
        check_shapes(model, {"1.weight": [6]})
    check_shapes(model, {"1.weight": [8]})


def test_units_of_different_sizes_are_refused():
    """A GroupNorm(2, 8) reading 8 of a layer's 16 channels would make units of 4 and of 1 channel (the tracer does
    not follow the split that gives such a model, so the records are made by hand)."""
    every, half = torch.arange(16), torch.arange(8)
    group = ChannelGroup("a", 16, [LayerSlice("a", "out", every, every), LayerSlice("n", "out", half, half)])
    units, why = _norm_group_units(group, {"n": nn.GroupNorm(2, 8)})
    assert units is None
    said = "['n'] (GroupNorm) group its channels in units of different sizes ([1, 4] channels: a norm reads only"
    assert why == said + " some of them), which are not pruned"
    whole = ChannelGroup("a", 8, [LayerSlice("a", "out", half, half), LayerSlice("n", "out", half, half)])
    units, _ = _norm_group_units(whole, {"n": nn.GroupNorm(2, 8)})
    assert units is not None and (units.size, units.unit_channels) == (2, 4)
    assert units.slices[0].channel.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_group_norm_with_one_group_leaves_its_channels_whole_with_the_reason():
    """Trial FE: GroupNorm(1, C) made the whole chain one unit, which the floor (at least one) kept: channel pruning
    did nothing and said nothing (a diffusers UNet with norm_num_groups=1 cut only its time embedding)."""
    groups, skipped = build_channel_groups(_gn_net(groups=1), _x())
    assert "3.c2" not in {g.name for g in groups}
    assert skipped["3.c2"] == (
        "['1', '3.n2'] (GroupNorm) normalize all 16 of its channels as one group (num_groups=1, or groups of different "
        "sizes that join into one unit): none can leave without the others"
    )


def test_the_floor_warning_counts_a_group_norms_channels():
    """Trial FG: it said "4/4 channels kept" of a 16-channel layer (its GroupNorm's groups)."""
    with pytest.warns(UserWarning, match=r"at their floors \(.*3\.c2 16/16, .*channels kept"):
        prune_(_gn_net(), 0.5, granularity="channel", example_inputs=_x(), round_to=16)
