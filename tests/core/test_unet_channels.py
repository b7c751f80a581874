"""Channel pruning through the shapes of MONAI's UNets (trial FC, session 41), on models written here that reproduce
them: Torch-Pruning could not infer a concatenation's input widths, a list of deep supervision outputs could not be
copied, and a stateless InstanceNorm kept its old width after ``compact()``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_compress import compact, prune_
from lightning_compress.core.skeleton import deep_copy
from tests.conftest import prune_and_compact

pytest.importorskip("torch_pruning")


class _Residual(nn.Module):
    """MONAI's ResidualUnit: a convolution then a one-slope PReLU, plus the input (or a convolution of it)."""

    def __init__(self, i: int, o: int, stride: int = 1) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(i, o, 3, stride, 1), nn.PReLU()
        self.res = nn.Conv2d(i, o, 3, stride, 1) if (i != o or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + self.res(x)


class _UNet(nn.Module):
    """Two levels; each upsampling is a transposed convolution, a PReLU and a residual unit whose residual is its
    input, and the skips are concatenated: Torch-Pruning's shape inference reads the upsampled width as ``None``."""

    def __init__(self, raw_skip: bool = False) -> None:
        super().__init__()
        self.raw_skip = raw_skip
        self.down, self.mid = _Residual(1, 8, 2), _Residual(8, 16, 2)
        self.up0, self.a0, self.r0 = (
            nn.ConvTranspose2d(16, 16, 3, 2, 1, output_padding=1),
            nn.PReLU(),
            _Residual(16, 16),
        )
        self.up1, self.a1, self.r1 = nn.ConvTranspose2d(24, 8, 3, 2, 1, output_padding=1), nn.PReLU(), _Residual(8, 8)
        self.stem, self.head = nn.Conv2d(1, 4, 3, 1, 1), nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        m = self.r0(self.a0(self.up0(self.mid(d))))
        u = self.r1(self.a1(self.up1(torch.cat([d, m], 1))))
        skip = x.repeat(1, 4, 1, 1) if self.raw_skip else self.stem(x)  # the model's input: no gradient history
        return self.head(torch.cat([skip, u], 1))


def test_a_concatenation_whose_widths_the_tracer_cannot_infer_is_mapped_with_measured_ones():
    """Trial FC: MONAI's UNet was refused whole ("Torch-Pruning: TypeError: unsupported operand type(s) for +: 'int'
    and 'NoneType'"): the tracer summed a width it could not infer. The widths are measured in the traced forward."""
    torch.manual_seed(0)
    model, x = _UNet().eval(), torch.randn(2, 1, 32, 32)
    report = prune_and_compact(model, x, atol=1e-5)
    assert {"up1", "up0", "stem", "down.res", "mid.res"} <= set(report.channels)
    assert model.up1.out_channels == 4 and model.head.in_channels == 6


def test_a_concatenation_with_the_models_own_input_maps_no_channel_through_it_and_prunes_the_rest():
    """The model's input has no gradient history, so the tracer does not see it among the concatenation's inputs: the
    widths it sees do not add up, nothing is mapped through that concatenation, and its producer stays whole."""
    torch.manual_seed(0)
    model, x = _UNet(raw_skip=True).eval(), torch.randn(2, 1, 32, 32)
    report = prune_and_compact(model, x, atol=1e-5)
    assert "up1" not in report.channels and {"up0", "down.res", "mid.res"} <= set(report.channels)
    assert model.up1.out_channels == 8


class _DeepSupervision(nn.Module):
    """MONAI's DynUNet keeps its supervision heads' outputs in a list attribute during the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.side = nn.Conv2d(1, 8, 3, 1, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
        self.heads: list[torch.Tensor] = [torch.rand(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.heads[0] = self.side(h)
        return self.b(h) + self.heads[0]


def test_a_model_holding_outputs_with_a_gradient_history_in_a_list_is_copied_and_pruned():
    """Trial FC: DynUNet with deep supervision raised deepcopy's 'Only Tensors created explicitly by the user (graph
    leaves) support the deepcopy protocol' from the value trials' copy, after the trace's forward filled its list."""
    torch.manual_seed(0)
    model, x = _DeepSupervision().eval(), torch.randn(2, 1, 8, 8)
    with torch.enable_grad():
        model(x)
    assert not model.heads[0].is_leaf
    assert deep_copy(model).heads[0].is_leaf  # the copy holds it detached
    report = prune_and_compact(model, x, atol=1e-5)
    assert report.channels == {"a": (8, 4)}


class _StatelessNormBlock(nn.Module):
    """MONAI's UnetResBlock: a stateless InstanceNorm, then `out += residual` in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 8, 3, 1, 1, bias=False), nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.norm1, self.norm2, self.norm3 = nn.InstanceNorm2d(8), nn.InstanceNorm2d(8), nn.InstanceNorm2d(8)
        self.skip, self.head = nn.Conv2d(2, 8, 1, bias=False), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        out += self.norm3(self.skip(x))
        return self.head(torch.relu(out))


def test_compact_gives_a_stateless_instance_norm_the_width_it_now_sees():
    """Trial FC: MONAI's UNETR compacted with its norms' `num_features` at the old width (they hold no tensor to cut,
    and the in-place add lost them from the trace): torch warned on every forward of the compacted model."""
    torch.manual_seed(0)
    model, x = _StatelessNormBlock().eval(), torch.randn(2, 2, 8, 8)
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="input's size at dim=1 does not match num_features")
        report = compact(model, x)
        model(x)
    assert report.channels
    widths = {name: m.num_features for name, m in model.named_modules() if isinstance(m, nn.InstanceNorm2d)}
    assert widths == {"norm1": model.conv1.out_channels, "norm2": 4, "norm3": 4}


def test_a_compacted_file_loaded_with_inputs_gives_a_stateless_instance_norm_the_width_it_sees(tmp_path):
    """The file holds no tensor of a stateless InstanceNorm: a fresh model loaded from a compacted file kept its old
    `num_features`, and torch warned on every forward."""
    from lightning_compress import load_compressed, save_compressed

    torch.manual_seed(0)
    model, x = _StatelessNormBlock().eval(), torch.randn(2, 2, 8, 8)
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    compact(model, x)
    save_compressed(model, tmp_path / "m.lcz")
    fresh = _StatelessNormBlock().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="input's size at dim=1 does not match num_features")
        load_compressed(fresh, tmp_path / "m.lcz", example_inputs=x)
        assert torch.equal(fresh(x), model(x))
    assert [m.num_features for m in (fresh.norm2, fresh.norm3)] == [4, 4]


def test_a_group_whose_channels_are_the_output_through_a_residual_add_is_left_whole():
    """Trial FJ: MONAI's UNet ends in a residual unit, `act(conv(x)) + x`, whose sum is the output: its 1-channel group
    was kept, could never be cut, and the fit ended "short of target ... at their floors" naming it."""
    from lightning_compress.core.structure import build_channel_groups

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1), _Residual(2, 2))
    groups, left = build_channel_groups(model.eval(), torch.randn(2, 1, 8, 8))
    assert [g.name for g in groups] == ["0"]
    assert left["2"] == "its channels reach the model's output"
    assert left["3.conv"] == "its channels are 2's: its channels reach the model's output"
