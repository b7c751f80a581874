"""When Torch-Pruning's tracer fails on a model: its hooks never stay on the model, a Linear that returns no tensor is
left out of the trace (and whole) instead of failing it, and an index mapping that raises leaves its layer whole with
the reason (trial EW: Llama4's router, SAM's mask decoder)."""

import logging

import pytest
import torch
from torch import nn

from lightning_compress import compact, prune_
from lightning_compress.core.rules import channel_structure
from lightning_compress.core.selection import select_targets

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


def test_a_linear_returning_a_tuple_is_left_whole_and_the_rest_is_pruned_with_no_hook_left_behind():
    """Before: Torch-Pruning's hook read the tuple's `.shape` (AttributeError), its hooks stayed on the model, and every
    later forward failed the same way."""
    torch.manual_seed(0)
    model, x = _Routed(), torch.randn(4, 8)
    structure = channel_structure(model, select_targets(model), x)
    assert _hooks(model) == 0
    model(x)  # a plain forward still runs
    assert "it returns a tuple, not a tensor (as Llama4's router)" in structure.left["router"]
    assert {g.name for g in structure.groups} == {"fc2", "fc3"}  # fc1 feeds the router: the check leaves it whole
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    model.eval()
    with torch.no_grad():
        before = model(x)
        report = compact(model, x)
        assert torch.allclose(model(x), before, atol=1e-6)
    assert (model.fc2.out_features, model.fc3.out_features, model.fc1.out_features) == (6, 5, 16)
    assert report.params_after < report.params_before


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


def test_llama4_prunes_heads_and_mlp_neurons_around_its_router_and_compacts_exactly(caplog):
    model, ids = _llama4(), {"input_ids": torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))}
    with caplog.at_level(logging.INFO):
        prune_(model, 0.5, granularity="channel", example_inputs=ids)
    assert _hooks(model) == 0
    assert "it returns a tuple, not a tensor (as Llama4's router)" in caplog.text
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
