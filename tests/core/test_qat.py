import collections
import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_compress.core.qat import (
    FakeQuantizer,
    QATConv2d,
    QATLinear,
    QuantConfig,
    calibrate,
    convert_to_float,
    convert_to_qat,
    enable_fake_quant,
    qat_modules,
    quantizable_layers,
    quantizers,
    search_power_of_two_shifts,
)
from tests.conftest import spawn
from tests.export.helpers import CrossedTie


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def enable(model, observe=True, quant=True):
    for _, q in quantizers(model):
        q.observer_enabled = observe
        q.fake_quant_enabled = quant


def test_conversion_shares_parameters_and_is_exact_until_enabled():
    model = net()
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    names = convert_to_qat(model, QuantConfig())
    assert names == ["0", "3"]
    assert isinstance(model[0], QATConv2d) and isinstance(model[3], QATLinear)
    assert all(model.get_parameter(n) is p for n, p in params.items())  # optimizers keep working
    assert torch.equal(model(x), before)
    keys = set(model.state_dict())
    assert {"0.weight", "0.bias", "3.weight", "0.weight_fake_quant.scale", "3.input_fake_quant.zero_point"} <= keys


def test_round_trip_to_float_keeps_parameters_and_keys():
    model = net()
    keys = set(model.state_dict())
    weight = model[3].weight
    convert_to_qat(model, QuantConfig())
    with pytest.raises(ValueError, match=r"`layers` names \['nonexistent'\], which are not fake-quant layers"):
        convert_to_float(model, ["0", "nonexistent"])  # a trial: returned [] silently
    assert isinstance(model[0], QATConv2d)  # refused before any layer changed
    assert convert_to_float(model) == ["0", "3"]
    assert type(model[3]) is nn.Linear and model[3].weight is weight
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
@pytest.mark.parametrize(("wbits", "abits"), [(8, 8), (4, 8), (2, None)])
def test_fake_quant_output_is_on_the_grid(scale, wbits, abits):
    model = net()
    convert_to_qat(model, QuantConfig(wbits, abits, scale))
    enable(model)
    model.train()
    model(torch.rand(8, 1, 8, 8))  # observe
    model.eval()
    layer = model[3]
    w = layer.weight_fake_quant(layer.weight)
    q = layer.weight_fake_quant
    scale_t = q.scale.detach().reshape(-1, 1) if q.per_channel else q.scale.detach()
    codes = w / scale_t
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().abs().max()) <= 2 ** (wbits - 1)
    assert len(torch.unique(w)) <= (2**wbits) * (layer.out_features if q.per_channel else 1)


def test_pruned_weights_stay_exactly_zero():
    model = net()
    with torch.no_grad():
        model[3].weight[:, ::2] = 0.0
    convert_to_qat(model, QuantConfig(4, 8))
    enable(model)
    model.train()
    model(torch.rand(2, 1, 8, 8))
    wq = model[3].weight_fake_quant(model[3].weight)
    assert (wq[:, ::2] == 0).all()


def test_activation_observer_ema_and_qparams():
    q = FakeQuantizer("activation", 8, "minmax", averaging_constant=0.5)
    q.observer_enabled = True
    q.train()
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([-1.0, 4.0]))
    assert q.min_val.item() == pytest.approx(-0.5) and q.max_val.item() == pytest.approx(3.0)
    assert q.scale.item() == pytest.approx(3.5 / 255)
    q.eval()
    q(torch.tensor([-100.0, 100.0]))  # eval never observes
    assert q.max_val.item() == pytest.approx(3.0)


def test_learned_scales_are_parameters_before_any_optimizer_and_train_once_enabled():
    model = net()
    convert_to_qat(model, QuantConfig(4, 8, "learned"))
    scales = [q.scale for _, q in quantizers(model)]
    assert all(isinstance(s, nn.Parameter) and not s.requires_grad for s in scales)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built after conversion: it holds them
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(s) in held for s in scales)
    assert "3.weight_fake_quant.scale" in dict(model.named_parameters())
    calibrate(model, [torch.rand(4, 1, 8, 8)])
    observed = [s.detach().clone() for s in scales]
    assert any(not torch.equal(o, torch.ones_like(o)) for o in observed)  # calibration set them
    enable_fake_quant(model)
    assert all(s.requires_grad for s in scales)
    model.train()
    model(torch.rand(4, 1, 8, 8)).pow(2).sum().backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in scales)
    optimizer.step()
    assert any(not torch.equal(s.detach(), o) for s, o in zip(scales, observed, strict=True))


def test_shift_search_picks_the_best_candidate():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    convert_to_qat(layer, QuantConfig(4, 4, "power_of_two"))
    inputs = [torch.randn(32, 16) for _ in range(3)]
    w_shift, a_shift, error = search_power_of_two_shifts(layer[0], inputs)
    q = layer[0]
    assert int(q.weight_fake_quant.shift) == w_shift and q.weight_fake_quant.frozen_shift
    assert int(q.input_fake_quant.shift) == a_shift
    # no other candidate pair does better
    for dw in (-1, 0, 1):
        q.weight_fake_quant.set_shift(w_shift + dw)
        q.weight_fake_quant.fake_quant_enabled = True
        q.input_fake_quant.fake_quant_enabled = True
        with torch.no_grad():
            q.weight_fake_quant.fake_quant_enabled = False
            q.input_fake_quant.fake_quant_enabled = False
            ref = [q(x) for x in inputs]
            q.weight_fake_quant.fake_quant_enabled = True
            q.input_fake_quant.fake_quant_enabled = True
            err = sum(float(((q(x) - r) ** 2).mean()) for x, r in zip(inputs, ref, strict=True))
        assert err >= error - 1e-9


def test_multihead_attention_projection_is_left_alone_by_default():
    block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    names = convert_to_qat(block, QuantConfig())
    assert names == ["linear1", "linear2"]
    with pytest.raises(ValueError, match=r"supports nn\.Linear, nn\.Conv1d/2d/3d"):
        convert_to_qat(nn.TransformerEncoderLayer(16, 2, 32), QuantConfig(), include=["self_attn.out_proj"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight_bits": 1}, ValueError, "`weight_bits`=1 is outside the supported range 2..8"),
        ({"activation_bits": 9}, ValueError, "`activation_bits`=9 is outside"),
        ({"weight_bits": 8.0}, TypeError, "`weight_bits` must be an int"),
        ({"scale": "log"}, ValueError, "`scale`='log' is not one of"),
        ({"quantize_bias": 1}, TypeError, "`quantize_bias` must be a bool"),
        ({"quantize_bias": True, "activation_bits": None}, ValueError, r"`quantize_bias`=True .* `activation_bits`"),
        (
            {"quantize_bias": True, "activation_granularity": "per_token"},
            ValueError,
            "it needs quantized per-tensor activations",
        ),
        ({"quantize_bias": True, "group_size": 8}, ValueError, r"per-channel weight scales, .* `group_size`=8"),
    ],
)
def test_config_validates_itself(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantConfig(**kwargs)


def test_bad_include_leaves_the_model_untouched():
    model = net()
    with pytest.raises(ValueError, match="matches no module"):
        convert_to_qat(model, QuantConfig(), include=["0", "missing"])
    assert not qat_modules(model)


def test_float_checkpoint_loads_into_a_converted_model():
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_qat(model, QuantConfig())
    model.load_state_dict(state, strict=True)  # quantizers keep their fresh state


def test_transformer_encoder_layer_fast_path_does_not_skip_fake_quant():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    x = torch.randn(2, 5, 16)
    block.eval()
    with torch.no_grad():
        float_out = block(x)
    convert_to_qat(block, QuantConfig(2, None))
    enable(block, observe=True, quant=True)
    block.train()
    block(x)
    block.eval()
    with torch.no_grad():
        fused = block(x)  # eval + no_grad + batch_first: PyTorch would take its fused path
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = block(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.allclose(fused, float_out, atol=1e-3)  # 2-bit weights change the output
    assert torch.allclose(fused, unfused, atol=1e-6)
    convert_to_float(block)
    assert not any(len(m._forward_pre_hooks) for m in block.modules())


def test_a_learned_scale_pushed_through_zero_is_used_as_its_magnitude(tmp_path):
    """Regression: an optimizer drove LSQ step sizes negative and a ResNet's output collapsed to a constant."""
    from lightning_compress import load_compressed, save_compressed

    model = net()
    convert_to_qat(model, QuantConfig(4, 8, "learned"))
    calibrate(model, [torch.rand(8, 1, 8, 8) for _ in range(2)])
    enable_fake_quant(model)
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        for _, q in quantizers(model):
            q.scale.neg_()  # where a large learning rate can take it
        got = model(x)
    assert torch.equal(got, want)
    assert all(bool((q.effective_scale() > 0).all()) for _, q in quantizers(model))
    save_compressed(model, tmp_path / "m.lcz")
    fresh = net()
    load_compressed(fresh, tmp_path / "m.lcz")
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), want, atol=1e-6)


def test_converting_again_with_other_settings_says_the_layers_keep_theirs():
    model = net()
    convert_to_qat(model, QuantConfig(4, 8))
    with pytest.warns(UserWarning, match="already fake-quantized with other settings and keep them"):
        convert_to_qat(model, QuantConfig(8, 8))
    assert all(q.bits == 4 for n, q in quantizers(model) if n.endswith("weight_fake_quant"))
    with pytest.warns(UserWarning, match="already fake-quantized with other settings"):  # trial BR: activation
        convert_to_qat(model, QuantConfig(4, 4))  # bits alone were not compared, and nothing was said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_qat(model, QuantConfig(4, 8))  # the same settings: nothing to say


def _shift_search_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = _shift_layer()
        w_shift, a_shift, error = search_power_of_two_shifts(layer[0], _shift_inputs(rank))
        torch.save((w_shift, a_shift, error), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _shift_layer() -> nn.Sequential:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    convert_to_qat(layer, QuantConfig(4, 4, "power_of_two"))
    return layer


def _shift_inputs(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(32, 16, generator=generator) * (1.0 if rank == 0 else 40.0) for _ in range(2)]


def test_shift_search_agrees_across_processes_on_every_processs_batches(tmp_path):
    """Under DDP each process captures different validation batches; the search reduces ranges and errors so
    both fix the shifts the union of the batches gives (before: rank 1's 40x larger inputs chose its own)."""
    spawn(_shift_search_worker, tmp_path, nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    union = search_power_of_two_shifts(_shift_layer()[0], _shift_inputs(0) + _shift_inputs(1))
    alone = search_power_of_two_shifts(_shift_layer()[0], _shift_inputs(0))
    assert ranks[0][:2] == ranks[1][:2] == union[:2]
    assert ranks[0][2] == pytest.approx(union[2], rel=1e-9)
    assert alone[1] != union[1]  # rank 0's batches alone would pick another input shift


class _OwnForwardLinear(nn.Linear):
    """An nn.Linear with a forward of its own that computes something else (a scaled output, as an adapter would)."""

    def forward(self, x):
        return 2 * (x @ self.weight.T) + self.bias


class _FalconLinear(nn.Linear):
    """Like transformers' FalconLinear: a forward of its own that computes what nn.Linear's does."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def test_a_linear_subclass_with_its_own_forward_is_left_out_and_the_message_says_why():
    from lightning_compress import QuantConfig, convert_to_qat

    model = nn.Sequential(_OwnForwardLinear(4, 4), nn.ReLU(), _OwnForwardLinear(4, 2))
    with pytest.raises(
        ValueError, match=r"its layers \(_OwnForwardLinear\) subclass nn.Linear/nn.Conv with more of their own"
    ):
        convert_to_qat(model, QuantConfig(8, 8))
    with pytest.raises(
        ValueError,
        match=r"`include` selects '0' .*_OwnForwardLinear subclasses Linear with more of its own than an __init__",
    ):
        convert_to_qat(model, QuantConfig(8, 8), include=["0"])
    attention = nn.MultiheadAttention(4, 2)  # its projection is used without its forward: said (a trial)
    match = r"called through their forward, and an nn.Embedding named exactly; its nn.MultiheadAttention multiplies"
    with pytest.raises(ValueError, match=match):
        convert_to_qat(attention, QuantConfig(8, 8), include=["out_proj"])
    assert type(model[0]) is _OwnForwardLinear  # untouched


def test_the_warning_for_layers_left_float_counts_them_and_says_a_forward_computing_like_its_base_is_quantized():
    """Trial GC: schnetpack's `Dense` (an nn.Linear with an activation in its forward) left 5 of 12 layers float, and
    the warning named 3 with '...', said subclasses with a forward of their own stay float, while those whose
    activation is the identity were quantized."""
    from lightning_compress import QuantConfig, convert_to_qat

    model = nn.Sequential(*[_OwnForwardLinear(4, 4) for _ in range(4)], _FalconLinear(4, 4), nn.Linear(4, 2))
    match = r"leaves 4 of the 6 layers it selects in float, \['0 \(_OwnForwardLinear\)', .*\] \.\.\.: .*a forward that"
    with pytest.warns(UserWarning, match=match + r" computes something other than their base's on a random input"):
        assert convert_to_qat(model, QuantConfig(8, 8)) == ["4", "5"]


class _ScaledEmbedding(nn.Embedding):
    """BART's `BartScaledWordEmbedding`: an embedding that scales its rows in a forward of its own."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def test_an_embedding_subclass_named_exactly_is_refused_and_the_message_lists_what_is_supported():
    from lightning_compress import QuantConfig, convert_to_qat

    model = nn.Sequential(_ScaledEmbedding(16, 4), nn.Linear(4, 2))
    match = r"`include` selects '0' .*and an nn.Embedding named exactly; _ScaledEmbedding"
    with pytest.raises(ValueError, match=match):
        convert_to_qat(model, QuantConfig(8, 8), include=["0", "*"])
    assert type(model[0]) is _ScaledEmbedding and type(model[1]) is nn.Linear  # untouched
    plain = nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 2))  # what the message says is supported: converted
    convert_to_qat(plain, QuantConfig(8, 8), include=["0", "*"])
    assert type(plain[0]) is not nn.Embedding


def test_a_linear_subclass_whose_forward_computes_linear_is_quantized():
    """A trial: transformers' Falcon (every layer a FalconLinear, `x @ W.T + b`) could not be quantized at all."""
    from lightning_compress import QuantConfig, convert_to_float, convert_to_qat
    from lightning_compress.core.qat import QATLinear

    torch.manual_seed(0)
    model = nn.Sequential(_FalconLinear(4, 8), nn.ReLU(), _FalconLinear(8, 2, bias=False), nn.ReLU(), nn.Linear(2, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    assert convert_to_qat(model, QuantConfig(8, 8)) == ["0", "2", "4"]
    assert all(type(model[i]) is QATLinear for i in (0, 2, 4))
    torch.testing.assert_close(model(x), expected)  # fake quantization is off until enabled
    convert_to_float(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), expected)


class _DepthwiseConv2d(nn.Conv2d):
    """Like transformers' EfficientNetDepthwiseConv2d: only its __init__ is its own."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding="same", groups=channels, bias=False)


class _PlainLinear(nn.Linear):
    pass


class _OwnConvForward(nn.Conv2d):
    """Keeps nn.Conv2d's forward, computes something else in `_conv_forward`."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 2 * weight, bias)


class _WithMethod(nn.Linear):
    def scaled(self, x):
        return 2 * self(x)


class _WithBuffer(nn.Linear):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("steps", torch.zeros(()))


class _WithAttribute(nn.Linear):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.tag = "adapter"


class _Helper:
    def helper(self):
        return self


class _MixinAfter(nn.Linear, _Helper):
    """Trial BA: a mixin after the base was not looked at; converted, the layer lost `helper`."""


class _WithPrivateAttribute(nn.Linear):
    """Trial AX: its parent's forward reads `_scale`; converted, the layer lost it (AttributeError in forward)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._scale = 0.5


def test_subclasses_that_keep_their_base_computation_are_quantized_as_their_base():
    """A trial: transformers' EfficientNet kept its depthwise convolutions (a Conv2d subclass with only an __init__ of
    its own) and `class MyLinear(nn.Linear): pass` in float, with a warning that said they had a forward of their own;
    a model of only such layers was refused with no reason. A subclass computing otherwise stays float, said."""
    from lightning_compress import QuantConfig, convert_to_float, convert_to_qat
    from lightning_compress.core.qat import QATConv2d, QATLinear

    torch.manual_seed(0)
    model = nn.Sequential(_DepthwiseConv2d(3), nn.Flatten(), _PlainLinear(48, 4))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    assert convert_to_qat(model, QuantConfig(8, 8)) == ["0", "2"]
    assert type(model[0]) is QATConv2d and type(model[2]) is QATLinear
    assert model[0].groups == 3 and model[0].padding == "same"
    torch.testing.assert_close(model(x), expected)  # fake quantization is off until enabled
    convert_to_float(model)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), expected)
    from lightning_compress.core.compact import mark_compacted

    compacted = nn.Sequential(_DepthwiseConv2d(3), nn.Flatten(), _PlainLinear(48, 4))
    mark_compacted(compacted)  # trial CJ: `compact`'s flag on every module read as the subclass's own attribute
    assert convert_to_qat(compacted, QuantConfig(8, 8)) == ["0", "2"]
    other = nn.Sequential(_OwnConvForward(3, 3, 1), nn.Flatten(), nn.Linear(48, 4))
    with pytest.warns(UserWarning, match=r"in float, \['0 \(_OwnConvForward\)'\]"):
        assert convert_to_qat(other, QuantConfig(8, 8)) == ["2"]
    with pytest.raises(ValueError, match=r"_OwnConvForward subclasses Conv2d with more of its own than an __init__"):
        convert_to_qat(nn.Sequential(_OwnConvForward(3, 3, 1)), QuantConfig(8, 8), include=["0"])
    # anything else of its own (a method, a buffer, an attribute its parent may read) would be lost in the swap
    layers = (
        _WithMethod(4, 4),
        _WithBuffer(4, 4),
        _WithAttribute(4, 4),
        _WithPrivateAttribute(4, 4),
        _MixinAfter(4, 4),
    )
    for layer in layers:
        with pytest.warns(UserWarning, match=rf"in float, \['0 \({type(layer).__name__}\)'\]"):
            assert convert_to_qat(nn.Sequential(layer, nn.Linear(4, 2)), QuantConfig(8, 8)) == ["1"]


def test_every_convolution_of_a_transformers_efficientnet_is_quantized():
    transformers = pytest.importorskip("transformers")
    from lightning_compress import QuantConfig, convert_to_qat
    from lightning_compress.core.qat import QATLayer

    config = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, num_labels=3, hidden_dim=320
    )
    model = transformers.EfficientNetForImageClassification(config).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    depthwise = [n for n, m in model.named_modules() if type(m).__name__ == "EfficientNetDepthwiseConv2d"]
    assert depthwise
    assert convert_to_qat(model, QuantConfig(8, 8)) == layers
    assert all(isinstance(model.get_submodule(n), QATLayer) for n in depthwise)


class _CountingFalconLinear(_FalconLinear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_a_linear_subclass_is_run_once_per_conversion():
    """The review: the check that a subclass computes nn.Linear ran the layer up to three times per conversion (the
    selection, the tied-weight note, the swap); on a large model each run is a forward of a large layer."""
    from lightning_compress import QuantConfig, convert_to_qat

    tied = _CountingFalconLinear(4, 4)
    model = nn.Sequential(tied, nn.ReLU(), _CountingFalconLinear(4, 4), nn.ReLU(), _CountingFalconLinear(4, 4))
    model[4].weight = tied.weight  # a tied partner: asked about too, to share the first one's quantizer
    _CountingFalconLinear.calls = 0
    assert convert_to_qat(model, QuantConfig(8, 8)) == ["0", "2", "4"]
    assert _CountingFalconLinear.calls == 3  # one check per layer (the partner included)
    assert model[4].weight_fake_quant is model[0].weight_fake_quant


def test_calibrate_observes_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    """calibrate() ran the model in training mode: BatchNorm updated its running statistics (and dropout was on),
    so calibration alone changed the float model's outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)).eval()
    x = torch.randn(4, 3, 8, 8) * 5 + 3
    convert_to_qat(net, QuantConfig(8, 8))
    statistics = {k: v.clone() for k, v in net[1].state_dict().items()}
    with torch.no_grad():
        before = net(x)
    calibrate(net, [x])
    assert all(torch.equal(statistics[k], v) for k, v in net[1].state_dict().items())
    assert not net.training and not any(m.training for m in net.modules())
    assert float(net[4].input_fake_quant.max_val) > 0  # the quantizers did observe
    with torch.no_grad():
        assert torch.equal(net(x), before)


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_a_quantized_bias_sits_on_its_accumulators_grid_with_a_straight_through_gradient(scale):
    model = net()
    convert_to_qat(model, QuantConfig(8, 8, scale, quantize_bias=True))
    x = torch.randn(8, 1, 8, 8)
    layers = [m for _, m in qat_modules(model)]
    assert all(layer.quantize_bias for layer in layers)
    enable(model, quant=False)
    model.train()
    model(x)  # observe
    assert all(layer.bias_grid() is None and layer.quantized_bias() is layer.bias for layer in layers)
    enable(model, observe=False)
    head = model[3]
    grid = head.bias_grid()
    weight_scale = head.weight_fake_quant.effective_scale().detach().reshape(-1)
    expected_grid = (weight_scale * head.input_fake_quant.effective_scale().detach().reshape(-1)).expand(5)
    assert torch.equal(grid, expected_grid)  # s_w * s_x, per output channel
    used = head.quantized_bias()
    assert torch.equal(used, torch.round(head.bias.detach() * (1.0 / grid)) * grid)
    assert not torch.equal(used, head.bias.detach())  # it moved onto the grid
    head.bias.grad = None
    model(x).sum().backward()
    assert torch.equal(head.bias.grad, torch.full((5,), 8.0))  # straight through: d(sum)/d(bias) = batch size
    if scale == "power_of_two":  # fixed point: the grid is a power of two too
        assert torch.equal(torch.log2(grid), torch.round(torch.log2(grid)))


def test_quantize_bias_off_keeps_the_config_dict_and_state_keys_of_before():
    assert "quantize_bias" not in QuantConfig().to_dict()
    assert QuantConfig(quantize_bias=True).to_dict()["quantize_bias"] is True
    model = net()
    convert_to_qat(model, QuantConfig())
    assert not any(m.quantize_bias for _, m in qat_modules(model))


def test_a_pruned_output_channel_keeps_a_finite_bias_on_the_inputs_step():
    """A channel whose weights are all zero has the floor weight scale (float32 tiny): s_w * s_x underflowed, its
    reciprocal was infinite and the model's outputs NaN (minmax + quantize_bias + channel pruning; found by fuzzing
    the file format)."""
    model = net()
    with torch.no_grad():
        model[3].weight[2] = 0  # a pruned output neuron
        model[3].bias[2] = 0.3
    convert_to_qat(model, QuantConfig(8, 8, quantize_bias=True))
    enable(model, quant=False)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    enable(model, observe=False)
    model.eval()
    head = model[3]
    grid = head.bias_grid()
    assert torch.isfinite(1.0 / grid).all()
    assert grid[2] == head.input_fake_quant.effective_scale()  # the input's step for the dead channel
    out = model(torch.randn(4, 1, 8, 8))
    assert torch.isfinite(out).all()
    step = float(head.input_fake_quant.effective_scale())
    assert float(head.quantized_bias()[2]) == pytest.approx(0.3, abs=step / 2)


class _CalledTwice(nn.Module):
    """One Linear applied twice in a forward (ALBERT shares its layer across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_a_layer_called_twice_in_one_forward_trains(scale):
    """Regression: with power-of-two scales the second call rewrote the scale the first call's backward had saved
    ("modified by an inplace operation")."""
    torch.manual_seed(0)
    model, x = _CalledTwice(), torch.randn(4, 8)
    convert_to_qat(model, QuantConfig(8, 8, scale=scale))
    calibrate(model, [x])
    enable_fake_quant(model)
    model.train()
    model(x).pow(2).mean().backward()
    assert model.shared.weight.grad is not None and model.shared.weight.grad.abs().sum() > 0


def test_an_activation_quantizer_that_never_observed_passes_its_input_through_and_says_so():
    """Switched on without calibration, an input quantizer used its default scale of 1: inputs in [0, 0.5) became
    0, silently (found by a QAT trial). It now computes in float until an observation gives it a range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_to_qat(model, QuantConfig(8, 8))
    with pytest.warns(UserWarning, match=r"enable_fake_quant: \['0.input_fake_quant', .*never observed an activation"):
        enable_fake_quant(model)
    x = torch.rand(4, 16) * 0.4
    quantizer = model[0].input_fake_quant
    assert not quantizer.has_range and torch.equal(quantizer.eval()(x), x)
    calibrate(model, [x])  # observers on for these batches: the quantizer now has a range and quantizes
    assert quantizer.has_range and not torch.equal(quantizer.eval()(x), x)
    assert (quantizer(x) - x).abs().max() <= quantizer.scale / 2 + 1e-7


def test_per_token_activations_need_no_observation_and_are_not_said_unobserved():
    """Per-token quantizers take their ranges from each batch: enabling them without calibration, and a fit with the
    LLM recipe, said their layers' inputs were never observed and stayed float, while they were quantized."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_to_qat(model, QuantConfig(4, 8, group_size=8, activation_granularity="per_token"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_fake_quant(model)
    quantizer = model[0].input_fake_quant
    x = torch.rand(4, 16)
    assert quantizer.has_range and not torch.equal(quantizer.eval()(x), x)


def test_calibrating_on_labelled_batches_names_the_fix():
    """`calibrate(model, train_loader)` with (x, y) batches raised Sequential.forward's own TypeError (a trial)."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_to_qat(model, QuantConfig(8, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16), torch.zeros(8)), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"`batches` yields lists of 2, .* `\(x for x, _ in loader\)`"):
        calibrate(model, loader)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert calibrate(model, (x for x, _ in loader)) == 2


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


def test_linears_tied_to_one_weight_share_one_weight_quantizer():
    """Two Linear layers sharing one weight: QAT converted the first only, silently (a QAT trial), then said so and
    left the second float. Both are converted now, with one weight quantizer: both compute with the same codes, and
    the conversion back gives the tie back."""
    for include in (["a", "b", "h"], ["b", "h"], None):
        model = TiedLinears()
        x = torch.randn(4, 16)
        assert quantizable_layers(model, include) == ["a", "b", "h"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is left float, so nothing is said
            assert convert_to_qat(model, QuantConfig(8, 8), include=include) == ["a", "b", "h"]
        assert isinstance(model.b, QATLinear) and model.b.weight_fake_quant is model.a.weight_fake_quant
        assert model.b.input_fake_quant is not model.a.input_fake_quant  # each its own input
        calibrate(model, [x])
        enable_fake_quant(model)
        assert torch.equal(model.a.quantized_weight(), model.b.quantized_weight())
        assert sum(1 for _, q in quantizers(model) if q.role == "weight") == 2  # a/b's, h's: listed once
        convert_to_float(model)
        assert type(model.b) is nn.Linear and model.b.weight is model.a.weight


def test_a_tied_layer_stored_the_other_way_round_stays_float_and_is_named():
    """A layer whose tied weight holds its output channels along another axis (transformers' Conv1D stores its weight
    (in, out)) cannot share a Linear's per-row quantizer: said, or refused when named."""
    pytest.importorskip("transformers")

    with pytest.raises(ValueError, match=r"`include` names \['b'\], but 'b' shares 'a''s weight, stored the other"):
        convert_to_qat(CrossedTie(), QuantConfig(8, 8), include=["a", "b"])
    model = CrossedTie()
    with pytest.warns(UserWarning, match=r"leaves a tied layer float: 'b' shares 'a''s weight, stored the other way"):
        assert convert_to_qat(model, QuantConfig(8, 8)) == ["a"]
    assert type(model.b).__name__ == "Conv1D" and not hasattr(model.b, "weight_fake_quant")


def test_a_shared_weight_quantizer_must_fit_the_layer():
    layer = nn.Linear(8, 4)
    other = QATLinear.from_float(nn.Linear(8, 6), QuantConfig(8, 8))
    with pytest.raises(ValueError, match=r"`weight_quantizer` scales 6 channels along axis 0, but Linear's weight"):
        QATLinear.from_float(layer, QuantConfig(8, 8), weight_quantizer=other.weight_fake_quant)
    with pytest.raises(TypeError, match="`weight_quantizer` must be a weight FakeQuantizer"):
        QATLinear.from_float(layer, QuantConfig(8, 8), weight_quantizer=other.input_fake_quant)
    assert type(layer) is nn.Linear and not hasattr(layer, "weight_fake_quant")


def test_a_bias_beyond_its_int32_grid_is_named():
    """With tiny weight and input scales a bias of 1.0 was clamped to a fraction of itself, silently (a trial)."""
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.fill_(1.0)
    convert_to_qat(model, QuantConfig(8, 8, quantize_bias=True))
    calibrate(model, [torch.rand(8, 4) * 1e-4])
    with pytest.warns(UserWarning, match=r"biases of \['0'\] exceed their int32 grid"):
        enable_fake_quant(model)


class _UpSampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2)
        self.up = nn.ConvTranspose2d(4, 1, 3, stride=2)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)


def test_layers_pruning_selects_but_quantization_cannot_are_said_and_wildcards_skip_them():
    """A ConvTranspose2d, pruned by default, stayed float under QAT without a word, and a wildcard that matched one
    (or a MultiheadAttention's out_proj) refused the whole conversion (a docs trial)."""
    from lightning_compress import QuantConfig, convert_to_qat

    for include in (None, ["*"]):
        model = _UpSampler()
        with pytest.warns(
            UserWarning, match=r"leaves 1 of the 2 layers it selects in float, \['up \(ConvTranspose2d\)'\]"
        ) as caught:
            assert convert_to_qat(model, QuantConfig(8, 8), include=include) == ["down"]
        assert any("out_proj it calls without its forward" in str(w.message) for w in caught)
        assert type(model.up) is nn.ConvTranspose2d
    with pytest.raises(ValueError, match=r"`include` selects 'up' \(ConvTranspose2d\)"):
        convert_to_qat(_UpSampler(), QuantConfig(8, 8), include=["up", "down"])
    # a wildcard inside the attention picks its out_proj but not the attention module: said (trial DD: silent)
    with pytest.warns(
        UserWarning, match=r"leaves 1 of the 2 .* \['attn.out_proj \(its nn.MultiheadAttention calls it with"
    ):
        assert convert_to_qat(_UpSampler(), QuantConfig(8, 8), include=["attn.*", "down"]) == ["down"]
    # alone, it is the reason of the refusal (trial DF: "no nn.Linear or nn.Conv layer ... can be quantized.")
    with pytest.raises(ValueError, match=r"no fake-quantized form \(\['attn.out_proj \(its nn.MultiheadAttention"):
        convert_to_qat(_UpSampler(), QuantConfig(8, 8), include=["attn.*"])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"\['attn'\] multiply their weights in their own"):
        convert_to_qat(_UpSampler(), QuantConfig(8, 8), include=["attn*"])  # trial DH: no reason
    with warnings.catch_warnings(record=True) as caught:  # an excluded attention's out_proj is not news
        warnings.simplefilter("always")
        convert_to_qat(_UpSampler(), QuantConfig(8, 8), exclude=["attn", "up"])
    assert not any("out_proj" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_enable_fake_quant_of_named_layers_switches_those_only_and_checks_the_names():
    """Trial AO: `layers=["fc", "haed"]` ignored the typo, a string was read letter by letter, and an empty list was
    told the model has no fake-quant layer."""
    from lightning_compress import QuantConfig, convert_to_qat, enable_fake_quant

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    convert_to_qat(model, QuantConfig(8, 8))
    assert enable_fake_quant(model, layers=["0"]) == 2
    assert model[0].weight_fake_quant.fake_quant_enabled and not model[2][0].weight_fake_quant.fake_quant_enabled
    with pytest.raises(
        ValueError, match=r"`layers` names \['2', 'haed'\], which are not fake-quant layers .*\['0', '2.0'\]"
    ):
        enable_fake_quant(model, layers=["0", "haed", "2"])
    with pytest.raises(TypeError, match=r"`layers` must be None or an iterable of layer names \(a list\), got '0'"):
        enable_fake_quant(model, layers="0")
    with pytest.raises(ValueError, match=r"`layers` is empty"):
        enable_fake_quant(model, layers=[])
    with pytest.raises(TypeError, match=r"`layers` must hold layer names \(strings\), got \['0'\]"):
        enable_fake_quant(model, layers=[0])  # trial AS: "names ['0'], which are not ... (they are ['0', ...])"
    assert not model[2][0].weight_fake_quant.fake_quant_enabled  # nothing changed by a refused call


def test_forward_hooks_and_pre_hooks_survive_the_swap_both_ways():
    """Trial BA: `convert_to_qat` dropped a layer's forward hooks (the output a hook changed changed by 7.65)."""
    from lightning_compress import QuantConfig, convert_to_float, convert_to_qat
    from lightning_compress.core.qat import QATLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen: list[str] = []
    model[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre") or ((2 * args[0],), kwargs),
                                       with_kwargs=True)  # fmt: skip
    model[0].register_forward_hook(lambda m, args, out: seen.append("post") or out + 3)
    x = torch.randn(3, 4)
    expected = model(x)
    convert_to_qat(model, QuantConfig(8, 8))
    assert type(model[0]) is QATLinear
    torch.testing.assert_close(model(x), expected)  # fake quantization is off until enabled
    convert_to_float(model)
    torch.testing.assert_close(model(x), expected)
    assert seen == ["pre", "post"] * 3


def test_moved_hooks_still_answer_their_handles_and_the_fast_path_comes_back():
    """Trial BB: hooks registered again on the new layer ignored their handles' `remove()` (a removed hook went on
    zeroing the outputs), and the no-op hook that keeps PyTorch's fused encoder off came back with `convert_to_float`
    (one more per round trip: the fast path never returned). Backward hooks were dropped."""
    import copy
    import gc

    from lightning_compress import QuantConfig, convert_to_float, convert_to_qat
    from lightning_compress.core.qat import QATLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[str] = []
    handle = model[0].register_forward_hook(lambda m, args, out: calls.append("post") or out * 0)
    model[0].register_full_backward_hook(lambda m, grad_in, grad_out: calls.append("backward"))
    convert_to_qat(model, QuantConfig(8, 8))
    model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    assert calls == ["post", "backward"]
    handle.remove()
    assert bool(model(torch.ones(1, 4)).abs().sum() > 0) and calls == ["post", "backward"]
    convert_to_float(model)
    late = model[0].register_forward_pre_hook(lambda m, args: calls.append("late"))
    model(torch.ones(1, 4))
    late.remove()
    model(torch.ones(1, 4))
    assert calls == ["post", "backward", "late"]

    seen_by: list[type] = []  # trial BD: a load_state_dict pre-hook was called with the discarded layer
    model[0].register_load_state_dict_pre_hook(lambda module, *args: seen_by.append(type(module)))
    convert_to_qat(model, QuantConfig(8, 8))
    gc.collect()  # the float layer it replaced is gone
    model.load_state_dict(model.state_dict())
    copy.deepcopy(model)
    assert seen_by == [QATLinear]

    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    for _ in range(2):
        convert_to_qat(layer, QuantConfig(8, 8))
        convert_to_float(layer)
    assert not layer.linear1._forward_pre_hooks and not layer.linear2._forward_pre_hooks


@pytest.mark.parametrize(
    "config",
    [QuantConfig(8, None), QuantConfig(4, None, group_size=16), QuantConfig(8, None, scale="power_of_two")],
)
def test_switching_quantization_on_reads_each_weight_as_it_is_now(config):
    """Trial DE: a fit whose last epoch calibrated switched quantization on at its end with the weight scales of the
    batch before the last optimizer step, so the returned model (and its file) clipped the final weights: post-
    training quantization through the callback scored 55.48 perplexity against 54.73 done by hand."""
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    convert_to_qat(model, config)
    calibrate(model, [torch.randn(8, 32)])  # the weight scales are read from these weights
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # what an optimizer step after the last forward does
    fresh = copy.deepcopy(model)
    enable_fake_quant(model)
    convert_to_float(fresh)
    convert_to_qat(fresh, config)
    enable_fake_quant(fresh)  # the same float weights, quantized by hand
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_a_learned_scale_switched_on_without_calibration_starts_at_the_weights_range():
    """Trial DH: LSQ switched on by hand without `calibrate` kept its scale of 1.0 and rounded every weight to
    zero (93% output error), in silence; minmax and power-of-two read the weight at their first forward."""
    from lightning_compress import convert_to_qat, enable_fake_quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 32)
    with torch.no_grad():
        want = model(x)
    convert_to_qat(model, QuantConfig(4, None, scale="learned"))
    enable_fake_quant(model)
    with torch.no_grad():
        got = model(x)
    assert model[0].weight_fake_quant.initialized
    assert (got - want).norm() < 0.2 * want.norm()


def test_switching_a_learned_scale_off_and_on_keeps_what_it_trained(tmp_path):
    """Trial DI: re-enabling after `enable_fake_quant(model, False)` reset trained LSQ step sizes to the weights'
    min/max, in silence; and a learned quantizer saved before its first forward wrote all-zero weights."""
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant, load_compressed, save_compressed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_to_qat(model, QuantConfig(4, None, scale="learned"))
    calibrate(model, [torch.randn(16, 8)])
    enable_fake_quant(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        optimizer.step()
    trained = model[0].weight_fake_quant.scale.detach().clone()
    enable_fake_quant(model, False)
    enable_fake_quant(model)
    assert torch.equal(model[0].weight_fake_quant.scale.detach(), trained)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_to_qat(fresh, QuantConfig(8, None, scale="learned"))
    enable_fake_quant(fresh)  # no forward yet: its scale is not read
    with pytest.warns(UserWarning, match="never"):
        save_compressed(fresh, tmp_path / "f.lcz")
    again = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    load_compressed(again, tmp_path / "f.lcz")
    assert bool((again[0].weight != 0).all())


class _ScaledEmbedding(nn.Embedding):
    """A word embedding with a forward of its own (BART's, Gemma3's): no fake-quantized form."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


def test_a_tied_layer_with_no_fake_quantized_form_is_said_to_stay_float():
    """Trial DS: naming BART's `lm_head` quantized the head alone; its tied scaled embeddings kept the float weight,
    unsaid until the file was written (in float) and the ONNX stored the table twice."""

    class ScaledLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = _ScaledEmbedding(32, 8), nn.Linear(8, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = ScaledLM()
    with pytest.warns(UserWarning, match=r"leaves a tied layer float: 'emb' shares 'head''s weight, and "
                      r"\['_ScaledEmbedding'\] have no fake-quantized form") as said:  # fmt: skip
        assert convert_to_qat(model, QuantConfig(8, 8), include=["head"]) == ["head"]
    # trial EJ: it said "int8 copy" of a head quantized in int4 groups
    assert any("besides the quantized layer's copy (int8, or int4 groups)" in str(w.message) for w in said)
    assert type(model.emb) is _ScaledEmbedding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["minmax", "learned"])
def test_a_model_quantized_in_float32_runs_cast_to_half_precision_with_pruned_rows(scale, dtype):
    """Trial EF: a model calibrated in float32 holds float32's floor as the scale of an all-zero (pruned) row; cast to
    float16 (`.half()`, a `precision="16-true"` validation of its checkpoint) the floor rounded to 0 and 0/0 made every
    output NaN. A scale is used at no less than the smallest its dtype holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:3] = 0  # three pruned neurons
    x = torch.randn(32, 8)
    convert_to_qat(model, QuantConfig(8, 8, scale))
    calibrate(model, [x])
    enable_fake_quant(model)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        half = model.to(dtype)(x.to(dtype)).float()
    assert bool(torch.isfinite(half).all())
    assert float((half - reference).abs().max()) < 0.05 * float(reference.abs().max())


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(8, 8),
        QuantConfig(8, 8, scale="power_of_two"),
        QuantConfig(8, 8, scale="learned"),
        QuantConfig(4, 8, group_size=4, activation_granularity="per_token"),
    ],
    ids=["minmax", "power_of_two", "learned", "llm"],
)
def test_a_layer_given_no_rows_passes_them_through_and_its_range_is_unchanged(config):
    """Trial FM: X-MOD runs each language's adapter on the batch's rows of that language, none for a language the
    batch lacks, and `QuantizationAwareTraining()` failed at its first step (`aminmax(): cannot compute aminmax over
    an empty dimension`), naming neither the layer nor the callback; a mixture-of-experts layer a router sends no
    token meets the same."""

    def calibrated(batches: list[torch.Tensor]) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8))
        convert_to_qat(model, config)
        calibrate(model, batches)
        return model

    torch.manual_seed(1)
    batch = torch.randn(16, 8)
    model = calibrated([batch, torch.empty(0, 8)])
    alone = calibrated([batch])
    for (key, value), other in zip(model.state_dict().items(), alone.state_dict().values(), strict=True):
        assert torch.equal(value, other), key  # the empty batch moved no range
    enable_fake_quant(model)
    model.train()
    full, empty = model(torch.randn(4, 8)), model(torch.empty(0, 8))
    assert empty.shape == (0, 8)
    (full.sum() + empty.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.eval()(torch.empty(0, 8)).shape == (0, 8)


class _Pair(tuple):
    """A tuple subclass (its type must survive the conversion)."""


class _CalledThroughAList(nn.Module):
    """Layers registered in a ModuleList and called through a plain list of the same objects (darts' N-BEATS keeps
    `linear_layer_stack_list` beside `fc_stack`), a tuple and a dict of them too."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.ModuleList([nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)])
        self.stack_list = list(self.stack)  # a plain attribute: not registered again
        self.head = nn.Linear(16, 4)
        self.heads = (self.head,)
        self.by_name = {"head": self.head}
        self.nested = [[self.stack[0]], ({"head": [self.head]},)]  # trial FW: nested containers, layers as keys
        self.weights = {self.head: 0.5}
        # trial FY: a set, a deque, a tuple subclass, a layer six lists deep
        self.members = {self.head}
        self.queue = collections.deque([self.stack[2]])
        self.pair = _Pair((self.stack[0], self.head))
        self.deep = [[[[[[self.head]]]]]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stack_list:
            x = layer(x)
        head = self.nested[1][0]["head"][0]
        return self.by_name["head"](x) + self.heads[0](x) + head(x) * self.weights[head]


def test_layers_called_through_plain_containers_are_the_converted_ones():
    """Trial FU: QAT swapped the registered layers, and the forward kept calling the float originals through its plain
    list: 94% of N-BEATS' weights trained float, every converted layer said to "never run its forward"."""
    torch.manual_seed(0)
    model = _CalledThroughAList()
    names = convert_to_qat(model, QuantConfig(8, 8))
    assert names == ["stack.0", "stack.2", "head"]
    assert model.stack_list[0] is model.stack[0] and isinstance(model.stack_list[2], QATLinear)
    assert model.stack_list[1] is model.stack[1]  # the activation, not converted, stays where it was
    assert model.heads[0] is model.head and model.by_name["head"] is model.head and isinstance(model.head, QATLinear)
    assert model.nested[0][0] is model.stack[0] and model.nested[1][0]["head"][0] is model.head
    assert list(model.weights) == [model.head]
    assert model.members == {model.head} and model.queue[0] is model.stack[2]
    assert type(model.pair) is _Pair and model.pair[1] is model.head and model.deep[0][0][0][0][0][0] is model.head
    calibrate(model, [torch.randn(4, 8)])
    assert all(q.initialized for _, q in quantizers(model))  # every converted layer ran
    convert_to_float(model)
    assert type(model.stack_list[0]) is nn.Linear and model.stack_list[0] is model.stack[0]
    assert model.heads[0] is model.head and type(model.by_name["head"]) is nn.Linear
    assert model.nested[1][0]["head"][0] is model.head and list(model.weights) == [model.head]
    model(torch.randn(2, 8))


class _TiedHead:
    """torchtune's `TiedLinear`: no module, it holds the embedding and multiplies its weight."""

    def __init__(self, tied: nn.Module) -> None:
        self.tied_module = tied

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.tied_module.weight)


class _TiedDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(32, 8)
        self.mix = nn.Linear(8, 8)
        self.output = _TiedHead(self.tok_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output(self.mix(self.tok_embeddings(ids)))


def test_a_layer_held_by_an_object_outside_the_module_tree_is_said_to_stay_float_there():
    """Trial GB: with torchtune's tied head, the quantized embedding's head kept the float weight, unsaid, and a
    reloaded compressed file's logits differed by 0.15."""
    from lightning_compress import QuantConfig, convert_to_qat

    model = _TiedDecoder()
    said = r"\[\"output \(_TiedHead\) holds 'tok_embeddings'\"\], outside the module tree"
    with pytest.warns(UserWarning, match=said):
        assert convert_to_qat(model, QuantConfig(8, 8), include=["tok_embeddings", "*"]) == ["tok_embeddings", "mix"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedding left float: nothing to say
        convert_to_qat(_TiedDecoder(), QuantConfig(8, 8))


def test_a_model_with_no_layer_to_convert_is_not_told_to_name_its_modules_exactly():
    """Trial GJ: on nequip's model QAT's refusal suggested an exact module name, which it then refused (its
    `ScalarLinearLayer`s are no layer it converts); it now names where the weights are."""
    from tests.conftest import FlatLinear

    model = nn.Sequential(FlatLinear(8, 8), nn.Tanh(), FlatLinear(8, 2))
    with pytest.raises(
        ValueError,
        match=r"select no weight of Sequential: it needs a Linear or Conv layer \(quantization-"
        r"aware training converts those, and an nn.Embedding named exactly in `include`\); its weights are "
        r"held by modules quantization-aware training cannot convert: \['0 \(FlatLinear\)', '2 \(FlatLin",
    ):
        convert_to_qat(model, QuantConfig(8, 8))


def test_weights_a_module_multiplies_in_its_own_forward_are_said_to_stay_float():
    """Trial GK: FNO's complex spectral weights, 92% of the model, stayed float under QAT without a word (pruning said
    it left them dense)."""
    from tests.conftest import FourierModule

    said = r"quantization-aware training leaves spectral\.weight \(8, 8, 6\) \(384 weights in 1 tensor\(s\), "
    with pytest.warns(UserWarning, match=said + r"4\.8x the 80 weights it quantizes\) in float"):
        convert_to_qat(FourierModule(), QuantConfig(8, 8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*leaves spectral")
        convert_to_qat(FourierModule(), QuantConfig(8, 8), include=["lift", "skip", "project"])
