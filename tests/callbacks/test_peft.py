"""The callbacks on a `transformers` BERT with `peft` LoRA adapters (trial EK): the base layers and the classifier copy
`modules_to_save` trains are compressed, the adapters and peft's unused original are left out, the wrapper is no
weight tie, and each callback says what `merge_and_unload()` does to the compressed weights."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import onnxruntime
import peft
import pytest
import torch
import transformers
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    IterativePruning,
    QuantizationAwareTraining,
    calibrate,
    compact,
    enable_fake_quant,
    export_onnx,
    load_compressed,
    prune_,
    save_compressed,
)
from lightning_compress.core.adapters import lora_note
from lightning_compress.core.fake_quant import QuantConfig
from lightning_compress.core.qat import convert_to_qat
from lightning_compress.core.selection import select_targets
from lightning_compress.core.structure import build_channel_groups
from tests.conftest import trainer

VOCAB, LENGTH = 32, 10
ATTENTION = "base_model.model.bert.encoder.layer.0.attention.self"


def _lora_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    base = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return peft.get_peft_model(base, lora)


class LoraClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _lora_bert()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids).logits

    def training_step(self, batch, _):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def _loader() -> DataLoader:
    ids = torch.randint(2, VOCAB, (64, LENGTH), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(ids, y), batch_size=16)


def test_the_default_selection_takes_base_layers_and_the_trained_copy_not_adapters_or_the_unused_original():
    torch.manual_seed(0)
    model = _lora_bert()
    names = [t.name for t in select_targets(model)]
    assert f"{ATTENTION}.query.base_layer" in names and f"{ATTENTION}.key" in names
    assert "base_model.model.classifier.modules_to_save.default" in names
    assert not [n for n in names if "lora_" in n or "original_module" in n]
    assert len(names) == 8  # q, k, v, attention output, intermediate, output, pooler, classifier
    # a wildcard leaves the adapters out too; an exact name picks one
    assert not [t for t in select_targets(model, include=["*query*"]) if "lora_" in t.name]
    exact = f"{ATTENTION}.query.lora_A.default"
    assert [t.name for t in select_targets(model, include=[exact])] == [exact]


def test_naming_a_peft_wrapper_says_which_layer_inside_to_name():
    torch.manual_seed(0)
    model = _lora_bert()
    for names in ([f"{ATTENTION}.query", f"{ATTENTION}.key"], [f"{ATTENTION}.query"]):  # alone: trial EM
        with pytest.raises(
            ValueError, match=r"peft wrappers, whose weight is a layer's inside \(name '.*query.base_layer'\)"
        ):
            select_targets(model, include=names)
    with pytest.raises(ValueError, match=r"name 'base_model.model.classifier.modules_to_save.default'"):
        select_targets(model, include=["base_model.model.classifier"])


def test_a_quantized_base_layer_is_no_tie_and_its_weight_is_stored_as_codes(tmp_path):
    """Trial EK: the tuner layer's `weight` property read as a second, float user of the base weight: a false tie
    warning, and the base weights stored in float (2.4x smaller than torch.save)."""
    torch.manual_seed(0)
    model = _lora_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tied-layer warning
        converted = convert_to_qat(model, QuantConfig(weight_bits=8, activation_bits=None))
    assert f"{ATTENTION}.query.base_layer" in converted and not [n for n in converted if "lora_" in n]
    calibrate(model, [{"input_ids": torch.randint(0, VOCAB, (2, LENGTH))}])
    enable_fake_quant(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = save_compressed(model, tmp_path / "lora.lcz")
    bits = {layer.name: layer.bits for layer in report.layers}
    assert bits[f"{ATTENTION}.query.base_layer.weight"] == 8 and bits[f"{ATTENTION}.value.base_layer.weight"] == 8
    ids = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    fresh = _lora_bert()  # another initialization, wrapped the same way
    load_compressed(fresh, tmp_path / "lora.lcz")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    export_onnx(model, tmp_path / "lora.onnx", {"input_ids": ids}, input_names=["input_ids"])
    session = onnxruntime.InferenceSession(str(tmp_path / "lora.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_pruning_a_lora_model_prunes_base_weights_and_says_what_merging_does():
    pl.seed_everything(0, verbose=False)
    model = LoraClassifier()
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=2)
    with pytest.warns(UserWarning, match=r"prunes the base weights of 2 adapter layer\(s\).*merge_and_unload\(\)"):
        trainer(max_epochs=2, callbacks=[pruning], limit_val_batches=0).fit(model, _loader())
    base = model.net.base_model.model.bert.encoder.layer[0].attention.self.query
    assert 0.2 < float((base.base_layer.weight == 0).float().mean()) < 0.9
    assert bool((base.lora_B["default"].weight != 0).all())  # trained from zero, not pruned
    assert abs(pruning.pruner.masked_sparsity() - 0.5) < 1e-3


def test_channel_pruning_of_a_lora_model_does_not_say_a_merge_loses_its_sparsity():
    """Trial FZ: channel pruning cuts the adapters' rows and columns with each neuron, and a merge keeps every pruned
    channel zero; the note said the merged model would no longer be sparse."""
    pl.seed_everything(0, verbose=False)

    class LoraLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _lora_llama()  # adapters on the MLP projections too
            self.example_input_array = torch.randint(0, 64, (2, 8))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=input_ids).logits

        def training_step(self, batch, _):
            (ids,) = batch
            return torch.nn.functional.cross_entropy(self(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    model = LoraLM()
    data = DataLoader(TensorDataset(torch.randint(0, 64, (32, 9), generator=torch.Generator().manual_seed(0))), 8)
    pruning = IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*adapter layer\(s\)")
        trainer(max_epochs=2, callbacks=[pruning], limit_val_batches=0).fit(model, data)
    up = model.net.base_model.model.model.layers[0].mlp.up_proj
    zero_rows = torch.nonzero((up.base_layer.weight == 0).all(1)).flatten()
    assert len(zero_rows) > 0
    merged = model.net.merge_and_unload()
    assert bool((merged.model.layers[0].mlp.up_proj.weight[zero_rows] == 0).all())  # the merge keeps them zero


def test_qat_on_a_lora_model_fake_quantizes_base_layers_and_says_what_merging_does():
    pl.seed_everything(0, verbose=False)
    model = LoraClassifier()
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=0)
    with pytest.warns(
        UserWarning, match=r"fake-quantizes the base weights of 2 adapter layer\(s\).*merge_and_unload\(\)"
    ):
        trainer(max_epochs=1, callbacks=[qat], limit_val_batches=0).fit(model, _loader())
    query = model.net.base_model.model.bert.encoder.layer[0].attention.self.query
    assert hasattr(query.base_layer, "weight_fake_quant")
    assert not hasattr(query.lora_A["default"], "weight_fake_quant")


def test_the_inactive_adapters_copy_of_a_trained_module_is_left_out():
    """Trial EM: with two adapters, a fit of the second pruned and quantized the first one's classifier copy."""
    torch.manual_seed(0)
    model = _lora_bert()  # adapter "default"
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model.add_adapter("second", config)
    model.set_adapter("second")
    names = [t.name for t in select_targets(model)]
    assert "base_model.model.classifier.modules_to_save.second" in names
    assert "base_model.model.classifier.modules_to_save.default" not in names


def test_ia3_rescales_on_merge_so_no_merge_note_is_given():
    """Trial EM: IA3's merge multiplies the base weight, which keeps its zeros; the note said B @ A fills them."""
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_lora_bert().base_model.model.config)
    ia3 = peft.get_peft_model(
        base, peft.IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"])
    )
    names = [t.name for t in select_targets(ia3)]
    assert lora_note(ia3, names, "prunes") is None
    lora = _lora_bert()
    assert "adds the adapters' dense update" in str(lora_note(lora, [t.name for t in select_targets(lora)], "prunes"))


def _lora_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=projections))


def test_mlp_neurons_are_pruned_with_their_adapters_rows_and_the_rank_is_not():
    """Trial EM: with adapters on the MLP projections, every MLP group was left whole ("lora_B is not selected") and
    channel pruning was refused; naming the adapters pruned their rank too."""
    torch.manual_seed(0)
    model = _lora_llama()
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an output
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    ids = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_(model, 0.5, granularity="channel", example_inputs=ids)
    mlp = model.base_model.model.model.layers[0].mlp
    zero_rows = torch.nonzero((mlp.up_proj.base_layer.weight == 0).all(1)).flatten()
    assert len(zero_rows) == 32
    assert bool((mlp.up_proj.lora_B["default"].weight[zero_rows] == 0).all())  # cut with the base layer's rows
    assert bool((mlp.gate_proj.lora_B["default"].weight[zero_rows] == 0).all())
    assert bool((mlp.down_proj.lora_A["default"].weight[:, zero_rows] == 0).all())  # and its input columns
    assert not bool((mlp.up_proj.lora_A["default"].weight == 0).all(1).any())  # the rank stays
    with torch.no_grad():
        before = model(**ids).logits
    report = compact(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, before, atol=1e-5, rtol=1e-5)
    assert mlp.up_proj.lora_B["default"].out_features == 32 and mlp.up_proj.lora_A["default"].out_features == 4
    assert report.params_after < report.params_before


def test_heads_with_adapters_are_left_whole_naming_the_adapters():
    """Trial EM: GPT-2's reason named the tuner layer as an attention without a head size."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    ids = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, left = build_channel_groups(
            model, ids, producers={t.name for t in select_targets(model, module_tensors=True)}
        )
    reasons = [why for why in left.values() if "adapters (peft" in why]
    assert reasons and all("merge the adapters first to prune heads" in why for why in reasons)


def test_dora_under_quantization_says_the_reloaded_model_differs():
    """Trial EM: DoRA reads its base weight directly for a norm, float in training, quantized in the file: reloaded
    logits were 0.0088 off, unsaid."""
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_lora_bert().base_model.model.config)
    dora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    names = [t.name for t in select_targets(dora)]
    assert "DoRA layers" in str(lora_note(dora, names, "fake-quantizes"))
    assert "DoRA" not in str(lora_note(dora, names, "prunes"))


def test_compact_cuts_the_copies_a_modules_to_save_wrapper_keeps_beside_the_trained_one():
    """Trial FP: `compact()` cut the input columns of the classifier's trained copy (`modules_to_save.default`) and left
    peft's `original_module` at the dense width; with the adapter off (`disable_adapter()`) the model then failed
    (`mat1 and mat2 shapes cannot be multiplied`)."""
    torch.manual_seed(0)
    model = _lora_bert().eval()
    ids = {"input_ids": torch.randint(2, VOCAB, (4, LENGTH))}
    prune_(model, 0.5, granularity="channel", example_inputs=ids)
    with torch.no_grad():
        on = model(**ids).logits
        with model.disable_adapter():
            off = model(**ids).logits
        compact(model, ids)
        classifier = model.base_model.model.classifier
        assert classifier.original_module.weight.shape == classifier.modules_to_save["default"].weight.shape
        assert torch.allclose(model(**ids).logits, on, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(**ids).logits, off, atol=1e-5)


def test_a_hidden_layers_unused_copies_are_left_by_the_checks_and_cut_at_the_kept_channels_by_compact():
    """Trial FQ: with `modules_to_save` on a hidden layer, the channel checks' forward (the model itself, a group's
    modules swapped for copies) cut peft's `original_module` to a random half: `prune_` alone broke the adapter-off
    path, and after `compact()` it ran with the wrong rows."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    lora = peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["intermediate.dense"])
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config), lora).eval()
    ids = torch.randint(2, VOCAB, (4, LENGTH))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # the checks run on the model itself
    wrapper = model.base_model.model.bert.encoder.layer[0].intermediate.dense
    original = wrapper.original_module.weight.detach().clone()
    prune_(model, 0.5, granularity="channel", example_inputs=inputs)
    assert torch.equal(wrapper.original_module.weight, original)
    kept = (wrapper.modules_to_save["default"].weight.abs().sum(1) != 0).nonzero().flatten()
    compact(model, inputs)
    assert torch.equal(wrapper.original_module.weight, original[kept])
    with torch.no_grad(), model.disable_adapter():
        assert model(**inputs).logits.shape == (4, 2)
