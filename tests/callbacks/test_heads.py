"""IterativePruning(granularity="channel") on a `transformers` model in a real Trainer: heads and neurons pruned
through the schedule, the guard and resume; then compacted and saved with `save_pretrained`."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, compact, from_pretrained
from tests.conftest import trainer

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 32, 10


class TextClassifier(pl.LightningModule):
    """A 2-layer BERT (4 heads) that learns whether token 1 occurs in a sequence."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=LENGTH, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.net = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
        self.example_input_array = {"input_ids": ids}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids).logits

    def training_step(self, batch, _):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self(ids), y)

    def validation_step(self, batch, _):
        ids, y = batch
        self.log("val_acc", (self(ids).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _loader(seed: int) -> DataLoader:
    ids = torch.randint(2, VOCAB, (256, LENGTH), generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(seed + 1))
    ids[y == 1, torch.randint(0, LENGTH, (int(y.sum()),), generator=torch.Generator().manual_seed(seed + 2))] = 1
    return DataLoader(TensorDataset(ids, y), batch_size=32)


def _fit(dirpath=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = TextClassifier()
    pruning = IterativePruning(
        0.5, importance="taylor", granularity="channel", scope="layer", start_epoch=1, end_epoch=3,
        monitor="val_acc", max_drop=1.0,
    )  # fmt: skip
    callbacks: list = [pruning]
    if dirpath is not None:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    fit = trainer(max_epochs=4, callbacks=callbacks, limit_train_batches=4, enable_checkpointing=dirpath is not None)
    fit.fit(model, _loader(0), _loader(10), ckpt_path=ckpt_path)  # fixed order: a resumed fit sees the same batches
    return model, pruning


def test_heads_pruned_in_fit_resume_exactly_then_compact_and_reload(tmp_path):
    model, full = _fit(dirpath=tmp_path)
    pruned, total = full.pruner.units()
    assert pruned == total // 2
    heads = [g for g in full.pruner.rule.groups if g.attention is not None]
    assert [g.name for g in heads] == [f"net.bert.encoder.layer.{i}.attention.self" for i in range(2)]
    assert full.decisions and not [d for d in full.decisions if d.action in ("rollback", "stop")]
    _, resumed = _fit(ckpt_path=tmp_path / "epoch=1.ckpt")
    assert full.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(full.masks[k], resumed.masks[k]) for k in full.masks)

    model.eval()
    x = model.example_input_array
    with torch.no_grad():
        want = model(**x)
    report = compact(model)
    assert report.channels["net.bert.encoder.layer.0.attention.self"] == (4, 2)
    assert model.net.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.allclose(model(**x), want, atol=1e-5)
    model.net.save_pretrained(tmp_path / "hf")
    again = from_pretrained(transformers.BertForSequenceClassification, tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(again(**x).logits, want, atol=1e-5)


class MoELanguageModel(pl.LightningModule):
    """A 2-layer Mixtral whose experts are (experts, out, in) tensors, not nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        self.net = transformers.MixtralForCausalLM(config)

    def training_step(self, batch, _):
        ids, _ = batch
        return self.net(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _moe_fit(dirpath, ckpt_path=None, max_epochs=3):
    pl.seed_everything(0, verbose=False)
    model = MoELanguageModel()
    pruning = IterativePruning(0.8, start_epoch=0, end_epoch=3)
    ckpt = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, filename="{epoch}")
    trainer(max_epochs=max_epochs, callbacks=[pruning, ckpt], enable_checkpointing=True).fit(
        model, _loader(0), ckpt_path=ckpt_path
    )
    return model, pruning


def test_mixture_of_experts_are_pruned_in_a_fit_and_resume_exactly(tmp_path):
    model, pruning = _moe_fit(tmp_path)
    experts = [f"net.model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert set(experts) <= {t.param_name for t in pruning.pruner.targets}
    assert pruning.pruner.masked_sparsity() == pytest.approx(0.8, abs=1e-3)
    resumed, _ = _moe_fit(tmp_path / "resumed", ckpt_path=tmp_path / "epoch=0.ckpt")
    state, again = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in experts)
