"""What a module's channels are: which modules can be cut along them and which parameters a cut reaches."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.core.groups import (
    is_depthwise,
    nonzero_channels,
    param_slices,
    per_channel,
    per_position,
    slice_bound,
    supported,
    unshifted_mean,
)


def test_supported_modules_are_those_whose_channels_can_be_removed_exactly():
    assert supported(nn.Linear(3, 4))
    assert supported(nn.Conv2d(3, 4, 3))
    assert supported(nn.Conv2d(4, 4, 3, groups=4))  # depthwise
    assert not supported(nn.Conv2d(4, 8, 3, groups=2))  # grouped, not depthwise
    assert supported(nn.ConvTranspose2d(3, 4, 3))
    assert not supported(nn.ConvTranspose2d(4, 4, 3, groups=2))
    assert supported(nn.BatchNorm2d(4)) and supported(nn.GroupNorm(2, 4))
    assert not supported(nn.GroupNorm(2, 4, affine=False))
    assert not supported(nn.LayerNorm(4))
    assert supported(nn.PReLU(4)) and not supported(nn.PReLU())


def test_param_slices_name_each_parameter_a_cut_reaches_and_its_axis():
    assert param_slices(nn.Linear(3, 4), "out") == [("weight", 0), ("bias", 0)]
    assert param_slices(nn.Linear(3, 4), "in") == [("weight", 1)]
    assert param_slices(nn.Linear(3, 4, bias=False), "out") == [("weight", 0)]
    assert param_slices(nn.ConvTranspose2d(3, 4, 3), "out") == [("weight", 1), ("bias", 0)]
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert is_depthwise(depthwise)
    assert param_slices(depthwise, "in") == [("weight", 0), ("bias", 0)]  # its input channel is its output channel
    assert param_slices(nn.BatchNorm2d(4), "in") == [("weight", 0), ("bias", 0)]
    assert param_slices(nn.BatchNorm2d(4, affine=False), "in") == []


def test_slice_bound_counts_positions_along_outputs_or_inputs():
    assert slice_bound(nn.Linear(3, 4), "out") == 4 and slice_bound(nn.Linear(3, 4), "in") == 3
    assert slice_bound(nn.Conv2d(3, 5, 1), "in") == 3
    assert slice_bound(nn.ConvTranspose2d(3, 5, 1), "out") == 5
    assert slice_bound(nn.BatchNorm1d(6), "out") == 6
    assert slice_bound(nn.GroupNorm(2, 8), "in") == 8
    assert slice_bound(nn.PReLU(7), "in") == 7


def test_a_norm_without_a_shift_keeps_a_running_mean_a_cut_must_zero():
    assert per_channel(nn.BatchNorm2d(4)) and per_channel(nn.InstanceNorm2d(4))
    assert unshifted_mean(nn.BatchNorm2d(4, affine=False))
    assert not unshifted_mean(nn.BatchNorm2d(4))  # its shift is masked with the channel
    assert not unshifted_mean(nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    assert not unshifted_mean(nn.LayerNorm(4))


def test_per_position_sums_each_slice_and_nonzero_channels_maps_them_to_channels():
    values = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0]])  # rows 0..2 along dim 0
    index = torch.tensor([0, 1, 2])
    assert per_position(values, 0, index).tolist() == [1.0, 0.0, 5.0]
    # positions 0 and 1 belong to channel 0, position 2 to channel 1 (a flatten maps one channel to several)
    channel = torch.tensor([0, 0, 1])
    assert nonzero_channels(values, 0, index, channel, 3).tolist() == [True, True, False]
