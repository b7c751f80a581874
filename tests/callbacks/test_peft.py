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
    enable_fake_quant,
    export_onnx,
    load_compressed,
    save_compressed,
)
from lightning_compress.core.fake_quant import QuantConfig
from lightning_compress.core.qat import convert_to_qat
from lightning_compress.core.selection import select_targets
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


def test_naming_the_tuner_layer_says_to_name_its_base_layer():
    torch.manual_seed(0)
    model = _lora_bert()
    with pytest.raises(
        ValueError, match=r"peft tuner layers, whose weight is their base layer's \(name '.*query.base_layer'\)"
    ):
        select_targets(model, include=[f"{ATTENTION}.query", f"{ATTENTION}.key"])


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
    with pytest.warns(UserWarning, match=r"prunes the base weights of 2 LoRA layer\(s\).*merge_and_unload\(\)"):
        trainer(max_epochs=2, callbacks=[pruning], limit_val_batches=0).fit(model, _loader())
    base = model.net.base_model.model.bert.encoder.layer[0].attention.self.query
    assert 0.2 < float((base.base_layer.weight == 0).float().mean()) < 0.9
    assert bool((base.lora_B["default"].weight != 0).all())  # trained from zero, not pruned
    assert abs(pruning.pruner.masked_sparsity() - 0.5) < 1e-3


def test_qat_on_a_lora_model_fake_quantizes_base_layers_and_says_what_merging_does():
    pl.seed_everything(0, verbose=False)
    model = LoraClassifier()
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=0)
    with pytest.warns(UserWarning, match=r"fake-quantizes the base weights of 2 LoRA layer\(s\).*merge_and_unload\(\)"):
        trainer(max_epochs=1, callbacks=[qat], limit_val_batches=0).fit(model, _loader())
    query = model.net.base_model.model.bert.encoder.layer[0].attention.self.query
    assert hasattr(query.base_layer, "weight_fake_quant")
    assert not hasattr(query.lora_A["default"], "weight_fake_quant")
