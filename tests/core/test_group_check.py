"""Channel groups the dependency graph gets wrong are left whole, with the reason, before any mask is computed:
operations that move channels without parameters, layers only training calls, parametrized and tied weights,
weights used through functional calls. And ``compact`` judges its output change relatively, on noisy inputs too."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_compress import CompactionError, compact, prune_
from lightning_compress.core.group_check import MIXED, TRAINING_ONLY, faithful_groups, output_change
from lightning_compress.core.structure import build_channel_groups
from lightning_compress.core.tracing import jittered, noisy_checks


class Flip(nn.Module):
    """``flip`` reverses the channel order between ``a`` and ``b``: the graph reads it as element-wise."""

    def __init__(self, head_scale: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
            self.head.bias.mul_(head_scale)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)).flip(1))).mean((2, 3)))


class PixelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = F.relu(self.b(F.pixel_shuffle(F.relu(self.a(x)), 2)))
        return self.head(F.relu(self.c(y)).mean((2, 3)))


class AuxHead(nn.Module):
    """``aux`` reads ``a``'s channels in training mode only (GoogLeNet's auxiliary classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        out = self.head(F.relu(self.b(y)).mean((2, 3)))
        return out + 0.3 * self.aux(y.mean((2, 3))) if self.training else out


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.head(F.relu(self.d(y)).mean((2, 3)))


class Tied(Chain):
    """``c`` holds ``b``'s weight: one tensor, two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c.weight = self.b.weight


class Functional(nn.Module):
    """``w``'s weight is used through ``einsum``; the graph never sees ``w`` called."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.w = nn.Linear(16, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.einsum("bi,oi->bo", F.relu(self.a(x)), self.w.weight) + self.w.bias
        return self.head(F.relu(self.b(F.relu(y))))


def _groups(model: nn.Module, x: torch.Tensor) -> tuple[list, dict[str, str]]:
    groups, _ = build_channel_groups(model, x)
    return faithful_groups(model, x, groups)


def test_a_flip_between_layers_leaves_their_group_whole_even_on_all_zero_example_inputs():
    torch.manual_seed(0)
    model = Flip().eval()
    zeros = torch.zeros(1, 1, 8, 8)  # a LightningModule's example_input_array: no bias, so all zeros inside
    kept, left = _groups(model, zeros)
    assert left == {"a": MIXED}
    assert [g.name for g in kept] == ["b"]
    masks = prune_(model, 0.5, granularity="channel", example_inputs=zeros)
    assert "a.weight" not in masks and not (model.a.weight == 0).any()  # the group it cannot follow is not masked
    pruned = copy.deepcopy(model)
    compact(model, zeros)
    assert model.b.out_channels == 8 and model.a.out_channels == 16
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        change = output_change([pruned(x)], [model(x)])[1]
    assert change < 1e-5


def test_a_pixel_shuffle_leaves_the_group_whole_instead_of_failing():
    torch.manual_seed(0)
    model = PixelShuffle()
    x = torch.randn(2, 3, 8, 8)
    masks = prune_(model, 0.5, granularity="channel", example_inputs=x)  # was an IndexError inside the pruner
    assert "a.weight" not in masks and not (model.a.weight == 0).any()
    assert not masks["c.weight"].all()
    report = compact(model, x)
    assert model.a.out_channels == 16 and report.channels["c"] == (6, 3)


def test_a_layer_only_training_calls_leaves_the_group_it_reads_whole():
    torch.manual_seed(0)
    model = AuxHead()
    x = torch.randn(2, 1, 8, 8)
    kept, left = _groups(model, x)
    assert left == {"a": TRAINING_ONLY}
    assert [g.name for g in kept] == ["b"]
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    compact(model, x)
    model.train()
    model(x).sum().backward()  # the compacted model still trains (was: a shape error in `aux`)
    assert model.a.out_channels == model.aux.in_features == 16


def test_the_check_leaves_the_model_and_the_global_random_state_alone():
    torch.manual_seed(0)
    model = AuxHead()
    with torch.no_grad():
        model.a.weight.mul_(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _groups(model, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training == training


def test_a_parametrized_consumer_leaves_its_group_whole_with_the_reason():
    model = Chain()
    weight_norm(model.b)
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="computed by a parametrization"):  # selection leaves `b` out
        masks = prune_(model, 0.5, granularity="channel", example_inputs=x)
    assert not any(name.startswith(("a.", "b.")) for name in masks)
    assert not (model.a.weight == 0).any()  # zeroing a's channels would have masked nothing in b
    assert not masks["d.weight"].all()
    _, left = build_channel_groups(model, x)
    assert "parametrization" in left["a"]


def test_tied_layers_leave_their_groups_whole_and_stay_tied():
    model = Tied()
    x = torch.randn(2, 1, 8, 8)
    _, left = build_channel_groups(model, x)
    assert "shares a parameter with c (tied weights)" in left["b"]
    assert "tied weights" in left["a"]
    masks = prune_(model, 0.5, granularity="channel", example_inputs=x)
    assert not (model.b.weight == 0).any() and not (model.a.weight == 0).any()
    assert not masks["d.weight"].all()
    compact(model, x)
    assert model.b.weight is model.c.weight and model.d.out_channels == 4


def test_layers_the_graph_cannot_follow_are_named_with_a_reason(caplog):
    model = Functional()
    x = torch.randn(4, 10)
    with caplog.at_level(logging.INFO, logger="lightning_compress"):
        masks = prune_(model, 0.5, granularity="channel", example_inputs=x)
    assert not masks["b.weight"].all()
    assert "w (the traced forward never calls it as a module" in caplog.text
    assert "a (its outputs go into a product with another activation" in caplog.text


class DroppedHead(nn.Module):
    """A reconstruction head the forward calls and drops (only a training step would use it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.head = nn.Linear(16, 3)
        self.decoder = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        self.reconstruction = self.decoder(h)
        return self.head(h)


def test_a_layer_whose_output_the_forward_drops_is_not_said_never_called():
    """Trial BX: an autoencoder's decoder, called by the forward but used only by `training_step`, was said to be
    used through F.linear or einsum."""
    _, left = build_channel_groups(DroppedHead(), torch.randn(4, 10))
    said = (
        "the forward calls it, but the traced graph does not hold its output: its output does not reach the forward's"
    )
    assert left["decoder"].startswith(said + " outputs (a head only the training code uses)")


def _zero_as_the_graph_maps_it(model: Flip) -> None:
    """Half of ``a``'s channels zeroed, and the same columns of ``b``: where the flip does not send them."""
    with torch.no_grad():
        model.a.weight[:8] = 0
        model.b.weight[:, :8] = 0


def test_compact_judges_the_output_change_relative_to_small_outputs(monkeypatch):
    # outputs around 1e-6: an absolute tolerance of 1e-4 let a wrong compaction through
    import lightning_compress.core.compact as compact_module

    monkeypatch.setattr(compact_module, "faithful_groups", lambda model, inputs, groups: (groups, {}))
    torch.manual_seed(0)
    model = Flip(head_scale=1e-6)
    _zero_as_the_graph_maps_it(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactionError, match="of their largest value"):
        compact(model, torch.randn(4, 1, 8, 8))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_compact_also_checks_noisy_inputs_when_the_example_is_all_zeros(monkeypatch):
    import lightning_compress.core.compact as compact_module

    monkeypatch.setattr(compact_module, "faithful_groups", lambda model, inputs, groups: (groups, {}))
    torch.manual_seed(0)
    model = Flip()
    _zero_as_the_graph_maps_it(model)
    with pytest.raises(CompactionError, match="would change the outputs"):
        compact(model, torch.zeros(1, 1, 8, 8))  # zeros map to zeros: only the noisy copy shows the change


def test_jittered_inputs_keep_structure_dtype_and_non_float_values():
    ids = torch.tensor([[1, 2, 3]])
    inputs = {"x": torch.zeros(2, 3, dtype=torch.float64), "ids": ids, "pair": (torch.ones(4), 7)}
    noisy = jittered(inputs)
    assert noisy["ids"] is ids and noisy["pair"][1] == 7
    assert noisy["x"].dtype == torch.float64 and noisy["x"].shape == (2, 3)
    assert not torch.equal(noisy["x"], inputs["x"]) and not torch.equal(noisy["pair"][0], inputs["pair"][0])
    assert torch.equal(jittered(inputs)["x"], noisy["x"])  # its own fixed generator


class _Indexed(nn.Module):
    """Float inputs made into embedding indices: noise added to them gives indices out of range."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.a, self.b = nn.Embedding(17, 8), nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.embed((x * 16).round().long()).mean(1))))


def test_a_model_that_cannot_take_noisy_inputs_is_checked_on_its_example_alone():
    """Trial EQ: the checks also run on noisy copies of float example inputs; a forward that makes them indices
    failed there (IndexError out of `prune_`). Such a model is checked on its example alone, and compacts exactly."""
    torch.manual_seed(0)
    model, example = _Indexed(), torch.rand(2, 4)
    assert noisy_checks(example, model) == [example]
    assert len(noisy_checks(torch.full((2, 4), 0.5), nn.Identity())) == 2
    assert len(noisy_checks(torch.tensor([[1, 2]]), nn.Identity())) == 1  # no float tensor: nothing to add noise to
    prune_(model, 0.5, granularity="channel", example_inputs=example)
    pruned = model(example)
    report = compact(model, example)
    assert model.a.out_features == 8 and report.max_abs_diff < 1e-6
    assert torch.allclose(model(example), pruned, atol=1e-6)


class _Vae(nn.Module):
    """pytorch/examples' VAE, narrow: its forward draws the latent sample with `torch.randn_like`."""

    def __init__(self, python_random: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(16, 24), nn.Linear(24, 4), nn.Linear(24, 4)
        self.fc3, self.fc4 = nn.Linear(4, 24), nn.Linear(24, 16)
        self.python_random = python_random

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        if self.python_random:
            import random

            noise = torch.full_like(mu, random.random())
        else:
            noise = torch.randn_like(mu)
        return torch.sigmoid(self.fc4(torch.relu(self.fc3(mu + noise * torch.exp(0.5 * logvar)))))


def test_a_forward_that_draws_random_numbers_is_compared_with_the_same_draws():
    """Trial EP: pytorch/examples' VAE (`torch.randn_like` in its forward) had every channel group refused as
    'zeroing its channels is not the same as removing them ... a flip, roll, pixel shuffle': two forwards drew
    different noise. Both now draw the same (and the check leaves the global random state as it was); fc1 and fc3
    lose half their neurons. Random numbers from outside torch are named as the reason instead."""
    torch.manual_seed(0)
    model, example = _Vae(), torch.rand(4, 16)
    groups, state = build_channel_groups(model, example)[0], torch.get_rng_state()
    kept, _ = faithful_groups(model, example, groups)
    assert torch.equal(torch.get_rng_state(), state) and len(kept) == 2  # fc1's and fc3's neurons
    prune_(model, 0.5, granularity="channel", example_inputs=example)
    report = compact(model, example)
    assert (model.fc1.out_features, model.fc3.out_features) == (12, 12) and report.max_abs_diff < 1e-6
    with pytest.raises(
        ValueError, match=r"gives other outputs on the same inputs with torch's default generators seeded"
    ):
        prune_(_Vae(python_random=True), 0.5, granularity="channel", example_inputs=example)


class _NoisyActivations(nn.Module):
    """Multiplicative noise on a layer's activations: the draw is sized by its channels."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.a, self.b, self.generator = nn.Linear(8, 16), nn.Linear(16, 2), generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        noise = torch.randn(h.shape, generator=self.generator) if self.generator is not None else torch.randn_like(h)
        return self.b(h * (1 + 0.1 * noise))


def test_a_random_draw_sized_by_the_channels_is_named_in_the_reason():
    """Trial ER: noise drawn in the shape of a layer's activations lands on other channels once some are removed;
    the group was refused as if a flip or a pixel shuffle moved its channels. A generator of the model's own was
    told to draw from torch, which it did."""
    with pytest.raises(ValueError, match=r"a pixel shuffle.*; the forward draws random numbers, and a draw sized by"):
        prune_(_NoisyActivations(), 0.5, granularity="channel", example_inputs=torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"another source: a `torch.Generator` of its own"):
        model = _NoisyActivations(torch.Generator().manual_seed(0))
        prune_(model, 0.5, granularity="channel", example_inputs=torch.randn(4, 8))


class _FusedGateUp(nn.Module):
    """One Linear for the gate and the up projection, split by `chunk`: channel i pairs with channel i + 16."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def test_a_fused_gate_and_up_projection_is_left_whole_with_a_reason_that_names_it():
    """Trial EQ: GLM-4's `gate_up_proj` and ModernBERT's `Wi` were left whole 'feeding an operation the dependency
    graph does not see', the split that pairs their halves unnamed."""
    with pytest.raises(ValueError, match=r"found no channel group it can prune(.|\n)*a fused gate and up projection"):
        prune_(_FusedGateUp(), 0.5, granularity="channel", example_inputs=torch.randn(2, 8))


class _ReadsItsWidth(nn.Module):
    """A forward that fails with an error of its own when a layer is narrower than it was built."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1.weight.shape[0] != 16:
            raise LookupError("no lookup table for this model")
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_forward_failing_with_its_own_error_is_not_blamed_on_a_chunk_or_split():
    """Trial EY: the reason for a model's own error went on 'such as the halves of one layer's output split apart'."""
    with pytest.raises(
        ValueError, match=r"the forward without half of its channels fails \(LookupError: no lookup"
    ) as e:
        prune_(_ReadsItsWidth(), 0.5, granularity="channel", example_inputs=torch.randn(2, 8))
    assert "chunk" not in str(e.value)


class _DeadLastResidual(nn.Module):
    """A WaveNet-style stack whose last residual convolution is computed and dropped (only the skips reach the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, 16, 1)
        self.conv = nn.ModuleList([nn.Conv1d(16, 16, 2, dilation=d) for d in (1, 2, 4)])
        self.res = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(3)])
        self.skip = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(3)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.inp(x), 0
        for conv, res, skip in zip(self.conv, self.res, self.skip, strict=True):
            h = torch.relu(conv(F.pad(x, (conv.dilation[0], 0))))
            skips = skips + skip(h)
            x = x + res(h)  # the last one is never read
        return self.fc(torch.relu(skips)[:, :, -1])


def test_a_chain_held_whole_by_a_layer_whose_output_is_dropped_names_that_cause(caplog):
    """Trial EX: the residual stream's reason named only a chunk or split."""
    with caplog.at_level(logging.INFO):
        prune_(_DeadLastResidual(), 0.5, granularity="channel", example_inputs=torch.randn(2, 1, 32))
    assert "or a layer of the same chain whose output the forward drops" in caplog.text


def test_channel_masks_from_prune_go_back_in_as_masks():
    # they hold the biases (and BatchNorm entries) channels cut: `masks=` refused them as "not a selected weight"
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(2, 1, 8, 8)
    first = prune_(model, 0.25, granularity="channel", example_inputs=x)
    assert "a.bias" in first
    second = prune_(model, 0.5, granularity="channel", example_inputs=x, masks=first)
    assert all(bool((second[k] <= first[k]).all()) for k in first)  # what was pruned stays pruned
    with pytest.raises(ValueError, match=r"'head\.bias', which is not a selected weight"):
        prune_(model, 0.5, granularity="channel", example_inputs=x, masks={"head.bias": torch.ones(10)})


class InstanceNormPReLU(nn.Module):
    """Style-transfer shapes: InstanceNorm and a per-channel PReLU treat each channel on their own."""

    def __init__(self, affine: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = nn.InstanceNorm2d(16, affine=affine, track_running_stats=affine)
        self.a1 = nn.PReLU(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.a1(self.n1(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_and_per_channel_prelu_lose_channels_with_their_layer(tmp_path, affine):
    # a trial: both were "mixes or cannot lose channels", and a conv -> InstanceNorm -> conv network had no group
    from lightning_compress import load_compressed, save_compressed

    torch.manual_seed(0)
    model = InstanceNormPReLU(affine)
    x = torch.randn(2, 3, 8, 8)
    if affine:
        model.train()(torch.randn(8, 3, 8, 8))  # running statistics
    model.eval()
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    masked = copy.deepcopy(model)
    report = compact(model, x)
    assert report.channels["c1"] == (16, 8) and model.a1.num_parameters == 8 and model.n1.num_features == 8
    if affine:
        assert model.n1.weight.shape == model.n1.running_var.shape == (8,)
    fresh = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert output_change([masked(fresh)], [model(fresh)])[1] < 1e-5
    save_compressed(model, tmp_path / "m.lcz")
    reloaded = InstanceNormPReLU(affine).eval()
    load_compressed(reloaded, tmp_path / "m.lcz")
    with torch.no_grad():
        assert torch.equal(reloaded(fresh), model(fresh))


class DepthwiseBranch(nn.Module):
    """The stem feeds a depthwise branch and a 1x1 branch (ShuffleNetV2's downsampling unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw1 = nn.Conv2d(16, 8, 1)
        self.pw2 = nn.Conv2d(16, 8, 1, stride=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.pw1(self.dw(x)), self.pw2(x)], 1).mean((2, 3)))


class GruClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.gru(x)[0][:, -1])))


class RmsNormMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.norm = nn.RMSNorm(16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_the_reasons_name_what_they_mean(recwarn):
    # a trial: a pruned depthwise conv was listed as left whole; a norm's weight was "a free nn.Parameter"; a GRU
    # was in no list, and its trace raised 2,073 warnings from Torch-Pruning's shape inference
    _, left = build_channel_groups(DepthwiseBranch(), torch.randn(2, 3, 16, 16))
    assert "dw" not in left
    _, left = build_channel_groups(RmsNormMlp(), torch.randn(2, 8))
    assert left["a"].startswith("norm.weight (a parameter outside Linear/Conv/BatchNorm")
    groups, left = build_channel_groups(GruClassifier(), torch.randn(2, 5, 8), producers={"gru", "fc1", "fc2"})
    assert [g.name for g in groups] == ["fc1"]
    assert "recurrent layers" in left["gru"]
    assert not [w for w in recwarn if "Maximum recursive depth" in str(w.message)]


def test_the_callback_names_example_input_array_when_forward_refuses_it():
    import lightning.pytorch as pl

    from lightning_compress import IterativePruning
    from tests.conftest import TinyModule, trainer

    model = TinyModule()
    model.example_input_array = torch.randn(2, 7)  # forward takes 16 features
    with pytest.raises(ValueError, match=r"`example_input_array` does not run through TinyModule's forward"):
        trainer(max_epochs=2, callbacks=[IterativePruning(0.5, granularity="channel")]).fit(model)
    assert isinstance(model, pl.LightningModule) and not (model.net[0].weight == 0).any()


def test_an_output_layer_behind_an_activation_is_said_to_reach_the_output():
    # a trial: "no layer consumes its channels" for a classifier followed by a sigmoid
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Sigmoid())
    _, left = build_channel_groups(model, torch.randn(2, 8))
    assert "reach the model's output" in left["2"]


class _ChannelNormAsFunction(nn.Module):
    """A `layer_norm` over channels called as a function (SwinUNETR's `proj_out`), whose effect on the outputs is
    too small to show next to a large constant term."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).permute(0, 2, 3, 1)
        h = F.layer_norm(h, h.shape[-1:]).permute(0, 3, 1, 2)
        return 1e-6 * self.head(F.relu(self.b(h)).mean((2, 3))) + 100.0


def test_a_channel_mix_the_outputs_hide_is_found_at_the_inputs_of_the_next_layer():
    """Trial FC: SwinUNETR's functional layer_norm over channels changed the outputs by 3.6e-6 of their largest value
    at random initialization, under the check's 1e-4: the group was accepted, and `compact()` refused it after
    training (or, untrained, changed encoder10's inputs by 0.37 without a word)."""
    torch.manual_seed(0)
    model = _ChannelNormAsFunction().eval()
    x = torch.randn(2, 1, 8, 8)
    kept, left = _groups(model, x)
    assert left == {"a": f"{MIXED} (the inputs of b change)"}
    assert [g.name for g in kept] == ["b"]


class _Leaky(nn.Module):
    """snntorch's `Leaky` with `init_hidden=True`: a membrane kept as an attribute, reset through a class-wide list of
    every neuron built (`SpikingNeuron.instances`), which a deep copy is not in."""

    instances: list[_Leaky] = []

    def __init__(self) -> None:
        super().__init__()
        self.mem = torch.zeros(())
        _Leaky.instances.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mem = 0.9 * self.mem + x
        return torch.sigmoid(self.mem - 1.0)


class _SpikingCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.lif = _Leaky()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for neuron in _Leaky.instances:  # snntorch's `utils.reset(net)`
            neuron.mem = torch.zeros(())
        out = 0
        for _ in range(3):  # time steps
            out = out + self.head(self.lif(self.conv(x)).mean((2, 3)))
        return out


def test_a_model_whose_copies_compute_otherwise_is_said_so_not_blamed_on_an_operation_mixing_channels():
    """Trial GL: snntorch's `utils.reset` resets the neurons of a class-wide list, so the copies the channel check
    compares keep their membranes from call to call; every group was refused as if an operation mixed channels."""
    from lightning_compress import prune_

    torch.manual_seed(0)
    model = _SpikingCNN()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ValueError, match=r"conv: a copy of the model does not give the model's outputs on the same "
                       r"inputs .*snntorch's `utils\.reset`"):  # fmt: skip
        prune_(model, 0.5, granularity="channel", example_inputs=x)
    assert not (model.conv.weight == 0).any()
