"""When Torch-Pruning's tracer fails on a model: its hooks never stay on the model, a Linear that returns no tensor is
left out of the trace (and whole) instead of failing it, and an index mapping that raises leaves its layer whole with
the reason (trial EW: Llama4's router, SAM's mask decoder)."""

import dataclasses
import logging
import warnings
from collections import UserDict
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from lightning_compress import compact, prune_
from lightning_compress.core.rules import channel_structure
from lightning_compress.core.selection import select_targets
from tests.conftest import prune_and_compact

transformers = pytest.importorskip("transformers")


class _Router(nn.Linear):
    """A Linear that returns its logits and their softmax, as a mixture's router does."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.softmax(-1)


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.router, self.fc2 = nn.Linear(8, 16), _Router(16, 4), nn.Linear(16, 12)
        self.fc3, self.out = nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        _, probs = self.router(h)
        return self.out(torch.relu(self.fc3(torch.relu(self.fc2(h))))) * probs[:, :1]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_linear_returning_a_tuple_is_traced_as_a_layer_with_no_hook_left_behind():
    """Before: Torch-Pruning's hook read the tuple's `.shape` (AttributeError), its hooks stayed on the model, and every
    later forward failed the same way. Trial EY: left out of the trace instead, the layer feeding it stayed whole."""
    torch.manual_seed(0)
    model, x = _Routed(), torch.randn(4, 8)
    structure = channel_structure(model, select_targets(model), x)
    assert _hooks(model) == 0
    model(x)  # a plain forward still runs
    assert {g.name for g in structure.groups} == {"fc1", "fc2", "fc3"}
    report = prune_and_compact(model, x, atol=1e-6)
    assert (model.fc1.out_features, model.router.in_features, model.fc2.out_features) == (8, 8, 6)
    assert report.params_after < report.params_before


class _DictOut(nn.Linear):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"out": super().forward(x)}


class _DictConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"out": super().forward(x)}


class _Branches(nn.Module):
    """A layer returning a dict on one branch, a plain branch beside it, and a router's weights concatenated."""

    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        self.odd, self.router = layer, _Router(16, 4)
        self.s1, self.s2, self.head = nn.Linear(16, 48), nn.Linear(48, 4), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.odd(x if isinstance(self.odd, nn.Linear) else x.view(-1, 1, 4, 4))["out"]
        _, probs = self.router(x)
        gate = torch.cat([probs[:, :2], probs[:, 2:]], dim=-1)  # trial EY: PhiMoE's sparsemixer concatenates them
        return self.head(inner.flatten(1)) + self.s2(torch.relu(self.s1(x))) * gate


@pytest.mark.parametrize(("layer", "width"), [(_DictOut(16, 8), 8), (_DictConv(1, 2, 3), 8)])
def test_a_layer_returning_a_dict_is_left_out_of_the_trace_and_whole_and_the_rest_is_pruned(layer, width):
    """Trial EY: a Conv returning a dict failed the whole trace; a router's concatenated weights failed it too."""
    torch.manual_seed(0)
    model, x = _Branches(layer, width), torch.randn(8, 16)
    structure = channel_structure(model, select_targets(model), x)
    assert _hooks(model) == 0
    assert "it returns a dict, not a tensor or a tuple, which the dependency graph's tracer" in structure.left["odd"]
    assert "s1" in {g.name for g in structure.groups}
    prune_and_compact(model, x, atol=1e-6)
    assert model.s1.out_features == 24


def test_a_forward_that_raises_while_traced_leaves_no_hook_and_raises_its_own_error():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.calls = nn.Linear(4, 4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:  # the example runs once before the tracer's own forward
                raise RuntimeError("the model's own failure")
            return self.fc(x)

    from lightning_compress.core.structure import _dependency_graph, _torch_pruning

    model = Fails()
    model(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="the model's own failure"):
        _dependency_graph(_torch_pruning(), model, torch.randn(2, 4), {})
    assert _hooks(model) == 0


def _llama4() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=16, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return transformers.Llama4ForCausalLM(config).eval()


def test_llama4_prunes_heads_and_mlp_neurons_beside_its_router_and_compacts_exactly(caplog):
    model, ids = _llama4(), {"input_ids": torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))}
    with caplog.at_level(logging.INFO):
        prune_(model, 0.5, granularity="channel", example_inputs=ids)
    assert _hooks(model) == 0
    assert "router (" in caplog.text  # its tuple traced: its outputs, the experts' weights, are left whole
    with torch.no_grad():
        before = model(**ids).logits
        report = compact(model, ids)
        after = model(**ids).logits
    assert torch.allclose(after, before, atol=1e-5)
    assert model.model.layers[0].feed_forward.up_proj.out_features == 64  # 128 MLP neurons -> 64
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # 2 key/value heads -> 1
    assert report.params_after < 0.8 * report.params_before


def test_sam_leaves_the_layer_whose_index_mapping_fails_whole_and_compacts_the_rest(caplog):
    """Before: a ZeroDivisionError from Torch-Pruning's index mapping ended `prune_` (and the callback's setup)."""
    torch.manual_seed(0)
    vision = transformers.SamVisionConfig(
        hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
        window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8,
    )  # fmt: skip
    prompt = transformers.SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = transformers.SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    model = transformers.SamModel(
        transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    ).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_points": torch.full((2, 1, 1, 2), 32.0)}
    with caplog.at_level(logging.INFO):
        prune_(model, 0.5, granularity="channel", example_inputs=inputs)
    assert "cross_attn_image_to_token.out_proj (its channels cannot be traced through the model (Torch-Pruning's" in (
        caplog.text
    )
    assert "ZeroDivisionError" in caplog.text
    with torch.no_grad():
        before = model(**inputs).pred_masks
        report = compact(model, inputs)
        after = model(**inputs).pred_masks
    assert torch.allclose(after, before, atol=1e-5)
    assert report.params_after < report.params_before


def test_llama4_export_names_its_complex_rotary_embedding_not_the_mask_it_was_given(tmp_path):
    pytest.importorskip("onnx")
    from lightning_compress import export_onnx

    model = _llama4()
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        ValueError, match=r"aten::polar.* ONNX has no complex numbers.*rotate with `cos` and `sin`"
    ) as e:
        export_onnx(model, tmp_path / "l.onnx", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert "mask" not in str(e.value)


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: a channel split (stride 1) or two branches (stride 2), concatenated, then shuffled."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride == 2:
            self.branch1 = nn.Sequential(_cbr(cin, cin, 3, 2, groups=cin), _cbr(cin, half))
        inner = cin if stride == 2 else cin // 2
        self.branch2 = nn.Sequential(_cbr(inner, half), _cbr(half, half, 3, stride, groups=half), _cbr(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        b, c, h, w = out.shape
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def test_a_tracer_failing_on_shufflenets_channel_shuffle_is_refused_with_the_reason_not_a_bare_error():
    """Trial EX: three ShuffleNetV2 units made Torch-Pruning's reshape mapping divide by zero, and the ZeroDivisionError
    ended the callback's setup; now no channel is prunable, said with the tracer's error (since session 41 the rest of
    the mapping is built without the failing reshape, and each layer's search fails on it, named per layer)."""
    torch.manual_seed(0)
    units = [_ShuffleUnit(24, 48, 2), _ShuffleUnit(48, 48, 1), _ShuffleUnit(48, 48, 1)]
    model = nn.Sequential(_cbr(1, 24, 3), *units, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))
    said = r"0\.0: its channels cannot be traced through the model \(Torch-Pruning's index mapping: ZeroDivisionError"
    with pytest.raises(ValueError, match=said):
        prune_(model, 0.5, granularity="channel", example_inputs=torch.randn(2, 1, 16, 16))
    assert _hooks(model) == 0


class _ReadsItsMetric(nn.Module):
    """A model whose forward reads an attribute of a torchmetrics Metric it holds (pytorch-forecasting's
    `self.loss.rescale_parameters`): the tracer swaps such modules for stand-ins, since a Metric answers `==` with a
    metric."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.loss = torchmetrics.MeanSquaredError()
        self.loss.rescale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        return h * 2 if self.loss.rescale else h


def test_a_forward_reading_an_attribute_of_a_metric_it_holds_is_traced():
    """Trial FF: the stand-in passed calls through but not attribute reads, and the channel graph of every
    pytorch-forecasting model failed ("'_SameCall' object has no attribute 'rescale_parameters'"), blamed on
    Torch-Pruning."""
    torch.manual_seed(0)
    model = _ReadsItsMetric()
    report = prune_and_compact(model, torch.randn(4, 6), atol=1e-6)
    assert report.channels == {"a": (16, 8), "b": (16, 8)}
    assert isinstance(model.loss.rescale, bool)  # the metric is back in its place


class _RMSNorm(nn.Module):
    """litgpt's RMSNorm: functional, so the tracer sees its multiplications, not a layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6) * self.weight


class _FusedAttention(nn.Module):
    """litgpt's OLMo-2 attention: q/k/v split from one Linear, a norm over all heads on q and k (each piece feeds
    several operations), rope on the first `n` of each head concatenated back with the rest (empty here)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.size = heads, d // heads
        self.qkv, self.proj, self.norm_q, self.norm_k = nn.Linear(d, 3 * d), nn.Linear(d, d), _RMSNorm(d), _RMSNorm(d)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split((d, d, d), dim=-1)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (y.view(b, t, self.heads, self.size).transpose(1, 2) for y in (q, k, v))
        angle = torch.arange(t, dtype=x.dtype)[:, None] * torch.arange(self.size, dtype=x.dtype)[None] / self.size
        n = self.size
        q = torch.cat((self._rope(q[..., :n], angle.cos(), angle.sin()), q[..., n:]), dim=-1)
        k = torch.cat((self._rope(k[..., :n], angle.cos(), angle.sin()), k[..., n:]), dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Olmo2Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn, self.post_attention_norm, self.post_mlp_norm = _FusedAttention(d), _RMSNorm(d), _RMSNorm(d)
        self.fc_1, self.fc_2, self.proj = nn.Linear(d, 64), nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_norm(self.attn(x))
        return x + self.post_mlp_norm(self.proj(nn.functional.silu(self.fc_1(x)) * self.fc_2(x)))


def test_a_split_whose_pieces_feed_several_operations_is_left_unmapped_and_the_mlps_are_pruned():
    """Trial FH: litgpt's OLMo-2 was refused whole ("the channel dependency graph could not be built (Torch-Pruning:
    IndexError: list index out of range)"): the tracer reads a split's consumers in order as its pieces, and each of
    q and k feeds several operations of the norm over all heads. Once the index mapping fails, such a split is left
    unmapped, the rest of the mapping is built, and the MLPs' channels are pruned, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), _Olmo2Block(), _Olmo2Block(), nn.Linear(32, 50)).eval()
    report = prune_and_compact(model, torch.randint(0, 50, (2, 8)), atol=1e-5)
    assert report.channels == {"1.fc_2": (64, 32), "2.fc_2": (64, 32)}


class _ScalesInPlace(nn.Module):
    """fair-esm's attention: `q = self.q_proj(x); q *= self.scaling` on a 3-d input (the output is a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        q *= 0.5
        return self.out(torch.relu(self.k(q)))


def test_a_layer_whose_output_is_changed_in_place_is_said_to_be_so_not_never_called():
    """Trial FK: ESM-2's q_proj was said "never called as a module (its weight used through F.linear ...)"; the forward
    calls it, and its in-place scaling loses its output from the tracer's graph."""
    from lightning_compress.core.structure import build_channel_groups

    groups, skipped = build_channel_groups(_ScalesInPlace().eval(), torch.randn(2, 5, 8))
    assert [g.name for g in groups] == ["k"]
    assert skipped["q"].startswith("the forward calls it, but the traced graph does not hold its output")
    assert "an operation changed it in place before it was used (`q *= scaling`" in skipped["q"]


class _Reversible(torch.autograd.Function):
    """Reformer's reversible blocks: the layers run inside a custom Function, under no_grad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return x + layer(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _RunsReversibly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.inner, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_Reversible.apply(torch.relu(self.a(x)), self.inner))


def test_a_layer_run_inside_a_custom_autograd_function_is_said_to_be_possibly_so():
    """Trial FL: a reversible Reformer's layers were said to be a head only training uses or changed in place."""
    from lightning_compress.core.structure import build_channel_groups

    _, skipped = build_channel_groups(_RunsReversibly().eval(), torch.randn(2, 5, 8))
    assert "inside a custom `torch.autograd.Function`, as reversible layers do" in skipped["inner"]


@dataclasses.dataclass
class _Forecast:
    prediction: torch.Tensor
    aux: torch.Tensor | None = None


class _ReturnsDataclass(nn.Module):
    """A forward returning a dataclass instance, as darts' models return their `PLModuleOutput`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> _Forecast:
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return _Forecast(prediction=self.head(hidden))


def test_a_forward_returning_a_dataclass_is_traced_through_its_fields():
    """Trial FU: darts' forward returns a dataclass; the trace saw no output, and channel pruning was refused for
    every layer ("the traced graph does not hold its output")."""
    torch.manual_seed(0)
    model, x = _ReturnsDataclass(), torch.randn(8, 16)
    structure = channel_structure(model, select_targets(model), x)
    assert {g.name for g in structure.groups} == {"fc1", "fc2"}
    before = model(x).prediction
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    pruned = model(x).prediction
    report = compact(model, x)
    assert model.fc1.out_features == 16 and model.fc2.out_features == 16
    assert torch.allclose(model(x).prediction, pruned, atol=1e-6) and not torch.equal(pruned, before)
    assert (report.params_before, report.params_after) == (1732, 612)


class _WritesIntoItsInputs(nn.Module):
    """As schnetpack's models: reads its input dict, then writes results into it, its inputs cast to float64 in eval
    mode (trial GC: the package's next call on the example failed on mixed dtypes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs["energy"] = self.b(torch.relu(self.a(inputs["x"])))
        if not self.training:
            inputs["x"] = inputs["x"].double()
        return inputs["energy"]


def test_a_forward_that_writes_into_its_input_dict_is_traced_compacted_and_exported_on_the_example_as_given(tmp_path):
    pytest.importorskip("onnxruntime")
    from lightning_compress import export_onnx

    torch.manual_seed(0)
    model = _WritesIntoItsInputs().eval()
    example = ({"x": torch.randn(4, 8)},)
    prune_(model, 0.5, granularity="channel", example_inputs=example)
    compact(model, example)
    assert model.a.out_features == 16
    assert list(example[0]) == ["x"] and example[0]["x"].dtype == torch.float32  # the example, as given
    export_onnx(model, tmp_path / "w.onnx", example)
    assert list(example[0]) == ["x"] and example[0]["x"].dtype == torch.float32


class _Forces(nn.Module):
    """An energy model returning its forces, the derivative of the energy by the positions (schnetpack's `Forces`)."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.detach().requires_grad_()
        energy = self.energy(positions).sum()
        forces = -torch.autograd.grad(energy, positions, create_graph=self.training)[0]
        return energy, forces


def test_a_forward_that_takes_derivatives_is_said_to_need_gradients_not_blamed_on_its_example(tmp_path):
    """Trial GC: schnetpack's force fields were refused by the channel trace and `export_onnx` with "`example_inputs`
    does not run through AtomisticTask's forward: pass what `forward` takes", for the inputs it takes."""
    pytest.importorskip("onnx")
    from lightning_compress import export_onnx

    model, x = _Forces().eval(), torch.randn(5, 3)
    said = r"_Forces's forward runs on `example_inputs` only with gradients on: it differentiates inside"
    with pytest.raises(ValueError, match=said):
        prune_(model, 0.5, granularity="channel", example_inputs=x)
    with pytest.raises(ValueError, match=said):
        export_onnx(model, tmp_path / "f.onnx", x)
    assert not list(tmp_path.iterdir())


class _Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class _Encoding(UserDict):
    """As `transformers`' `BatchEncoding`: a mapping that is no dict, read by attribute; Lightning passes it whole."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.data[name]
        except KeyError as err:
            raise AttributeError(name) from err


class _ScalesItsInput(nn.Module):
    """Takes a namedtuple, a mapping or a tensor, and scales its input in place (trial GD)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 2)

    def forward(self, inputs: Any) -> torch.Tensor:
        x = inputs.a + inputs.b if isinstance(inputs, _Pair) else inputs.x if isinstance(inputs, _Encoding) else inputs
        x.mul_(2.0)
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("kind", ["namedtuple", "mapping", "tensor"])
def test_examples_in_namedtuples_mappings_or_scaled_in_place_are_traced_compacted_and_exported_as_given(tmp_path, kind):
    """Trial GD: a namedtuple example failed (`__new__() missing 1 required positional argument`); a forward scaling
    its input in place was taken for one drawing random numbers (every group refused), and the caller's example was
    scaled 128 times; a `BatchEncoding` was passed as keyword arguments, where Lightning passes it whole."""
    pytest.importorskip("onnxruntime")
    from lightning_compress import export_onnx

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    example = {"namedtuple": (_Pair(x, x.clone()),), "mapping": (_Encoding(x=x),), "tensor": x}[kind]
    given = x.clone()
    model = _ScalesItsInput().eval()
    prune_(model, 0.5, granularity="channel", example_inputs=example)
    compact(model, example)
    assert model.a.out_features == 16 and torch.equal(x, given)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "m.onnx", example)
    assert not [str(w.message) for w in caught if "differ" in str(w.message)]  # (a model drawing random numbers)
    assert torch.equal(x, given)


class _ForcesWithGradients(nn.Module):
    """A force field that turns gradients on itself, as schnetpack's `Forces` does in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            positions = positions.detach().requires_grad_()
            energy = self.energy(positions).sum()
            forces = -torch.autograd.grad(energy, positions, create_graph=self.training)[0]
        return energy, forces


def test_a_forward_turning_gradients_on_for_its_derivative_prunes_channels_and_is_not_exported(tmp_path):
    """Trial GD: such a forward's channels are pruned and compacted exactly, and `export_onnx` blamed the derivative's
    `aten::silu_backward` on the forward's operations."""
    pytest.importorskip("onnx")
    from lightning_compress import export_onnx

    torch.manual_seed(0)
    model, x = _ForcesWithGradients().eval(), torch.randn(5, 3)
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    forces = model(x)[1]
    compact(model, x)
    assert model.energy[0].out_features == 8
    torch.testing.assert_close(model(x)[1], forces, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"its forward takes a derivative .*silu_backward.*an ONNX graph holds no"):
        export_onnx(model, tmp_path / "f.onnx", x)
