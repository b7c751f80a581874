"""QuantizationAwareTraining with the real Trainer."""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    IterativePruning,
    QuantizationAwareTraining,
    load_compressed,
    load_qat_checkpoint,
    save_compressed,
    sparsity,
)
from lightning_compress.core.qat import (
    QATLinear,
    QuantConfig,
    convert_to_float,
    convert_to_qat,
    enable_fake_quant,
    qat_modules,
    quantizers,
)
from tests.conftest import TEST_DEVICE, StopAfterEpoch, TinyModule, make_blobs, trainer, weights_of
from tests.export.helpers import Residual, ort_kernels


def active(model):
    return [bool(q.fake_quant_enabled) for _, q in quantizers(model)]


def on_grid(model):
    """Every fake-quantized weight is an integer multiple of its scale."""
    for _, layer in qat_modules(model):
        q = layer.weight_fake_quant
        w = q(layer.weight).detach()
        s = q.scale.detach().reshape(-1, *([1] * (w.dim() - 1))) if q.per_channel else q.scale.detach()
        codes = w / s
        if not torch.allclose(codes, codes.round(), atol=1e-3):
            return False
    return True


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_switches_on_when_the_epoch_after_start_epoch_starts(tiny, scale):
    states = []

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            states.append(all(active(pl_module)))

    qat = QuantizationAwareTraining(4, 8, scale=scale, start_epoch=1)
    trainer(max_epochs=3, callbacks=[qat, Probe()]).fit(tiny)
    assert states == [False, False, True]  # on from epoch 2: epoch 1's end still holds the model it validated
    assert on_grid(tiny)
    assert tiny.trainer.callback_metrics["val_acc"] > 0.5


class MultiInput(pl.LightningModule):
    """forward takes two tensors by keyword; no stub, no single positional input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, *, features: torch.Tensor, extra: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.a(features) + self.b(extra))) / temperature

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(features=x, extra=x[:, :8] * 2, temperature=1.0)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(make_blobs(128), batch_size=32)


def test_any_forward_signature_without_patching():
    pl.seed_everything(0, verbose=False)
    model = MultiInput()
    forward = type(model).forward
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(start_epoch=0)]).fit(model)
    assert type(model).forward is forward and "forward" not in vars(model)
    assert [n for n, _ in qat_modules(model)] == ["a", "b", "head"] and all(active(model))
    x = make_blobs(4).tensors[0]
    out = model(features=x, extra=x[:, :8])
    assert out.shape == (4, 4)


class TransformerBlock(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.block(self.embed(x), src_key_padding_mask=mask).mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, 4, generator=g)
        return DataLoader(TensorDataset(x, (x.sum(dim=(1, 2)) > 0).long()), batch_size=16)


def test_transformer_block():
    pl.seed_everything(0, verbose=False)
    model = TransformerBlock()
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(model)
    names = [n for n, _ in qat_modules(model)]
    assert names == ["embed", "block.linear1", "block.linear2", "head"]  # attention's own projection stays float
    model.eval()
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        assert torch.isfinite(model(x, mask=torch.zeros(3, 6, dtype=torch.bool))).all()


def test_runs_with_pruning_and_pruned_weights_stay_zero(tiny):
    pruning = IterativePruning(0.8, start_epoch=0, end_epoch=2)
    qat = QuantizationAwareTraining(4, 8, start_epoch=1)
    trainer(max_epochs=4, callbacks=[qat, pruning]).fit(tiny)
    assert sparsity(tiny) == pytest.approx(0.8, abs=1e-3)
    for name, mask in pruning.masks.items():
        layer = tiny.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(layer, QATLinear)
        quantized = layer.weight_fake_quant(layer.weight)
        assert (quantized[~mask] == 0).all()


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _data(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 4, 4, generator=g)
        return DataLoader(TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long()), batch_size=16)

    def train_dataloader(self):
        return self._data()

    def val_dataloader(self):
        return self._data()


def test_freeze_bn_and_observers():
    pl.seed_everything(0, verbose=False)
    model = ConvNet()
    seen = {}

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            bn = pl_module.net[1]
            q = pl_module.net[4].input_fake_quant
            seen[trainer.current_epoch] = (bn.running_mean.clone(), q.min_val.clone(), q.scale.clone())

    qat = QuantizationAwareTraining(8, 8, start_epoch=0, freeze_observers_epoch=1, freeze_bn_epoch=1)
    trainer(max_epochs=4, callbacks=[qat, Probe()]).fit(model)
    assert not torch.equal(seen[0][0], seen[1][0])  # BN still learning in epoch 1
    assert torch.equal(seen[2][0], seen[3][0]) and torch.equal(seen[1][0], seen[2][0])  # frozen after epoch 1
    assert torch.equal(seen[1][1], seen[3][1]) and torch.equal(seen[1][2], seen[3][2])  # observers frozen


def test_shift_search_chooses_and_logs_shifts(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    model = ConvNet()
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer(max_epochs=3, callbacks=[qat], logger=logger).fit(model)
    assert set(qat.shifts) == {"net.0", "net.4"}
    for name, (w_shift, a_shift) in qat.shifts.items():
        layer = model.get_submodule(name)
        assert int(layer.weight_fake_quant.shift) == w_shift and int(layer.input_fake_quant.shift) == a_shift
        assert float(layer.weight_fake_quant.scale) == 2.0**-w_shift
    events = EventAccumulator(str(tmp_path / "run" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"compress/shift/net.0/weight", "compress/shift/net.4/input", "compress/quant_error/net.0"} <= tags
    errors = [e.value for e in events.Scalars("compress/quant_error/net.4")]
    assert errors and all(0 <= e < 0.01 for e in errors)


def test_shift_search_under_bf16_mixed_precision():
    """Inputs captured under autocast are bfloat16 while the layer's weights are float32: the search failed at the
    end of `start_epoch` with a dtype mismatch (found by a trial)."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=0)
    trainer(max_epochs=2, callbacks=[qat], precision="bf16-mixed").fit(model)
    assert set(qat.shifts) == {"net.0", "net.2", "net.4"}
    assert all(q.fake_quant_enabled for _, q in quantizers(model))


class TrainingOnlyHead(TinyModule):
    """`aux` is called in training only (an auxiliary classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.net[:4](x)
        loss = nn.functional.cross_entropy(self.net[4](hidden), y) + nn.functional.cross_entropy(self.aux(hidden), y)
        return loss


def test_shift_search_keeps_the_observed_shift_of_a_layer_validation_never_calls():
    """It failed after `start_epoch` had trained, saying no validation batch ran (found by a trial)."""
    pl.seed_everything(0, verbose=False)
    model = TrainingOnlyHead()
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=0)
    with pytest.warns(UserWarning, match=r"validation never calls \['aux'\].*ranges observed in training"):
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert set(qat.shifts) == {"net.0", "net.2", "net.4"}
    assert model.aux.weight_fake_quant.fake_quant_enabled and model.aux.weight_fake_quant.has_range


@pytest.mark.parametrize("scale", ["minmax", "learned"])
def test_a_model_left_in_eval_mode_still_calibrates(tiny, scale):
    """A model fit after `model.eval()` (Lightning keeps modules' modes): the quantizers never observed, inputs were
    quantized with scale 1 and LSQ weights with step 1, down to chance accuracy (found by a QAT trial)."""
    tiny.eval()
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, scale=scale, start_epoch=0)]).fit(tiny)
    for _, layer in qat_modules(tiny):
        assert layer.input_fake_quant.has_range and layer.input_fake_quant.initialized
        assert float(layer.weight_fake_quant.effective_scale().max()) < 0.5  # from the weights, not the default 1


def test_hparams_are_logged(tiny, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logged = {}

    class Spy(TensorBoardLogger):
        def log_hyperparams(self, params, *args, **kwargs):
            logged.update(params if isinstance(params, dict) else vars(params))
            super().log_hyperparams(params, *args, **kwargs)

    qat = QuantizationAwareTraining(4, None, scale="learned", start_epoch=0)
    trainer(max_epochs=1, callbacks=[qat], logger=Spy(tmp_path)).fit(tiny)
    assert logged["compress/qat/weight_bits"] == 4
    assert logged["compress/qat/activation_bits"] == "none"
    assert logged["compress/qat/scale"] == "learned"


RECIPES = {
    "minmax": {"scale": "minmax"},
    "learned": {"scale": "learned"},
    "8da4w": {"group_size": 8, "activation_granularity": "per_token"},  # int4 groups, int8 dynamic per token
    "bias": {"scale": "power_of_two", "quantize_bias": True},  # fixed point, biases on the accumulator's grid
}


def test_every_checkpoint_holds_the_model_its_validation_scored(tmp_path):
    """The checkpoint at the end of `start_epoch` was scored by a float validation: it holds the float model
    (quantization switched on before ModelCheckpoint saved, so `best_model_path` could name a quantized model
    scored in float)."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    qat = QuantizationAwareTraining(2, 2, start_epoch=0)  # 2 bits: quantized and float scores differ
    trainer(max_epochs=2, callbacks=[qat, ckpt], enable_checkpointing=True).fit(TinyModule())
    assert len(ckpt.best_k_models) == 2
    for path, score in ckpt.best_k_models.items():
        fresh = TinyModule()
        t = trainer(callbacks=[QuantizationAwareTraining(2, 2, start_epoch=0)])
        rescored = t.validate(fresh, ckpt_path=path, verbose=False)[0]["val_loss"]
        assert rescored == pytest.approx(float(score), rel=1e-5), path
    assert not any(active(load_qat_checkpoint(TinyModule, tmp_path / "epoch=0.ckpt")))
    assert all(active(load_qat_checkpoint(TinyModule, tmp_path / "epoch=1.ckpt")))


def test_start_epoch_the_last_epoch_quantizes_at_the_end_of_fit(tiny, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    qat = QuantizationAwareTraining(4, 8, start_epoch=1)
    t = trainer(max_epochs=2, callbacks=[qat, ckpt], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(tiny)
    assert not [w for w in caught if "not quantized" in str(w.message)]
    assert all(active(tiny)) and on_grid(tiny)  # the model fit returns is quantized, as the user asked
    assert not any(active(load_qat_checkpoint(TinyModule, tmp_path / "last.ckpt")))  # what was validated


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_resume_rebuilds_quantization_before_the_weights_load(recipe, tmp_path):
    def run(ckpt_path=None, dirpath=None):
        pl.seed_everything(0, verbose=False)
        model = TinyModule(optimizer="adam")
        qat = QuantizationAwareTraining(4, 8, start_epoch=1, **RECIPES[recipe])
        callbacks = [qat]
        if dirpath is not None:
            callbacks.append(ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(max_epochs=4, callbacks=callbacks, enable_checkpointing=dirpath is not None)
        t.fit(model, ckpt_path=ckpt_path)
        return model, t

    full, _ = run(dirpath=tmp_path)
    resumed, t = run(ckpt_path=tmp_path / "epoch=2.ckpt")  # quantization already on in this checkpoint
    from_calibrated, _ = run(ckpt_path=tmp_path / "epoch=1.ckpt")  # the end of `start_epoch`: on from the next
    assert all(active(from_calibrated))
    for key, value in weights_of(from_calibrated).items():
        assert torch.allclose(weights_of(full)[key].float(), value.float(), atol=1e-6), key
    a, b = weights_of(full), weights_of(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    # test(ckpt_path=...) after fit works, and so does the one-line inference loader
    result = t.test(resumed, ckpt_path=tmp_path / "epoch=3.ckpt", verbose=False)
    assert "test_loss" in result[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_qat_checkpoint(TinyModule, tmp_path / "epoch=3.ckpt")
    assert not [w for w in caught if "Found keys" in str(w.message)]  # the quantizer keys load strictly after
    assert not loaded.training and all(active(loaded))
    x = make_blobs(16, seed=5).tensors[0]
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), resumed(x))
    # an open file, as the docstring says (a trial: the second read found the stream at its end); no full unpickle
    import io

    with open(tmp_path / "epoch=3.ckpt", "rb") as f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_file = load_qat_checkpoint(TinyModule, f)
    from_buffer = load_qat_checkpoint(TinyModule, io.BytesIO((tmp_path / "epoch=3.ckpt").read_bytes()))
    assert not [w for w in caught if "weights_only" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(from_file(x), resumed(x)) and torch.equal(from_buffer(x), resumed(x))


def test_test_with_a_qat_checkpoint_and_a_fresh_model(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(start_epoch=0), ckpt], enable_checkpointing=True).fit(
        model
    )
    fresh = TinyModule()  # float model: the callback converts it because the checkpoint is quantized
    result = trainer(callbacks=[QuantizationAwareTraining(start_epoch=0)]).test(
        fresh, ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert result[0]["test_loss"] > 0 and all(active(fresh))


def test_evaluating_a_checkpoint_converts_as_it_was_quantized_also_by_two_callbacks(tmp_path):
    """Trial W: `validate(ckpt_path=...)` with `QuantizationAwareTraining(4)` on an 8-bit checkpoint converted the
    float model to 4 bits and loaded the 8-bit scales into it (chance accuracy); a checkpoint of two callbacks on
    disjoint layers loaded neither through the Trainer nor through `load_qat_checkpoint`."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor="val_loss")
    callbacks = [
        QuantizationAwareTraining(4, 8, start_epoch=0, include=["net.0"]),
        QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.2", "net.4"]),
        ckpt,
    ]
    trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True).fit(model)
    recorded = float(ckpt.best_model_score)
    with pytest.warns(UserWarning, match=r"the checkpoint was quantized with .*weight_bits=4.*not this callback's"):
        result = trainer(callbacks=[QuantizationAwareTraining(2, 8)]).validate(
            fresh := TinyModule(), ckpt_path=tmp_path / "last.ckpt", verbose=False
        )
    assert result[0]["val_loss"] == pytest.approx(recorded, rel=1e-6)
    assert [q.bits for name, q in quantizers(fresh) if name.endswith("weight_fake_quant")] == [4, 8, 8]
    loaded = load_qat_checkpoint(TinyModule, tmp_path / "last.ckpt")
    x = make_blobs(16, seed=5).tensors[0]
    with torch.no_grad():
        print((loaded(x) - model.eval()(x)).abs().max(), loaded(x).abs().max())
        sd = model.state_dict()
        ld = loaded.state_dict()
        print([k for k in sd if not torch.equal(sd[k], ld[k])])
    same = [
        QuantizationAwareTraining(4, 8, include=["net.0"]),
        QuantizationAwareTraining(8, 8, include=["net.2", "net.4"]),
    ]
    with warnings.catch_warnings():  # trial AO: each of the same two callbacks warned about the other's settings
        warnings.filterwarnings("error", message=".*the checkpoint was quantized with")
        again = trainer(callbacks=same).validate(TinyModule(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert again[0]["val_loss"] == pytest.approx(recorded, rel=1e-6)


def test_an_onnx_export_path_under_64_true_in_any_case_writes_a_float32_graph(tmp_path):
    """Trial X: `precision="64-true"` wrote float64 QuantizeLinear graphs onnxruntime cannot load, found after
    training; trial W: `export_path="model.ONNX"` received a compressed file."""
    import onnxruntime as ort

    class WithExample(TinyModule):
        def __init__(self):
            super().__init__()
            self.example_input_array = torch.zeros(2, 16)

    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "model.ONNX")
    trainer(max_epochs=2, callbacks=[qat], precision="64-true").fit(model := WithExample())
    assert (tmp_path / "model.ONNX").read_bytes()[:4] != b"LCZ\x89"
    session = ort.InferenceSession(str(tmp_path / "model.ONNX"), providers=["CPUExecutionProvider"])
    x = make_blobs(16, seed=5).tensors[0]
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model.eval()(x.double()).float()
    assert (torch.as_tensor(out).argmax(1) == expected.argmax(1)).float().mean() > 0.9


def test_resuming_with_qat_on_other_layers_names_the_fix(tmp_path):
    """Trial W: resuming a checkpoint quantized on other layers failed in Lightning's strict load with a raw list of
    unexpected keys, naming neither the callback nor the fix."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    callbacks = [QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.0", "net.2"]), ckpt]
    trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True).fit(TinyModule())
    model = TinyModule()
    other = QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.4"])
    with pytest.raises(ValueError, match=r"the checkpoint quantizes the layers \['net.0', 'net.2'\].*\['net.4'\]"):
        trainer(max_epochs=3, callbacks=[other]).fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert not qat_modules(model)  # the layers it converted are float again
    same = QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.0", "net.2"])
    trainer(max_epochs=3, callbacks=[same]).fit(TinyModule(), ckpt_path=tmp_path / "last.ckpt")


def test_resuming_a_checkpoint_whose_quantizer_entries_were_removed_is_refused(tmp_path):
    """Trial AF: a QAT checkpoint with its quantizers' entries removed resumed without a word: the scales it trained
    were lost and the observers started again. A float checkpoint given QAT on resume still starts it; with learned
    scales it is refused, saying why (the defect list of session 21)."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(
        max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0), ckpt], enable_checkpointing=True
    ).fit(TinyModule())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "fake_quant" not in k}
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    match = r"the checkpoint's state says it quantized \['net.0', 'net.2', 'net.4'\], but its weights hold no quantizer"
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
            TinyModule(), ckpt_path=tmp_path / "stripped.ckpt"
        )
    float_run = ModelCheckpoint(dirpath=tmp_path, filename="float")
    trainer(max_epochs=1, callbacks=[float_run], enable_checkpointing=True).fit(TinyModule())
    model = TinyModule()
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
        model, ckpt_path=tmp_path / "float.ckpt"
    )
    assert qat_modules(model)
    # learned scales are Parameters the float run's optimizer state has no place for: torch's "loaded state dict
    # contains a parameter group that doesn't match the size of optimizer's group" came from the optimizer's restore
    learned = TinyModule(optimizer="adam")
    with pytest.raises(ValueError, match=r"scale='learned'\): the checkpoint was saved without this callback"):
        trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0)]).fit(
            learned, ckpt_path=tmp_path / "float.ckpt"
        )
    assert not qat_modules(learned)  # the layers it converted are float again


def test_evaluating_a_float_model_changes_nothing(tiny):
    before = weights_of(tiny)
    t = trainer(callbacks=[QuantizationAwareTraining()])
    t.validate(tiny, verbose=False)
    t.test(tiny, verbose=False)
    assert not qat_modules(tiny) and weights_of(tiny).keys() == before.keys()


def test_load_qat_checkpoint_needs_qat_state(tiny, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="plain")
    trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(tiny)
    with pytest.raises(ValueError, match="holds no QuantizationAwareTraining state"):
        load_qat_checkpoint(TinyModule, tmp_path / "plain.ckpt")


class _NeedsAConfig(pl.LightningModule):
    """pytorch-tabular's models, in short: built from a config object their hyperparameters do not keep."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        width = config["hidden"]
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_blobs(64), batch_size=16)


def test_load_qat_checkpoint_says_to_pass_constructor_arguments_the_checkpoint_lacks(tmp_path):
    """Trial FS: a pytorch-tabular checkpoint failed inside the model's constructor (`missing 1 required positional
    argument: 'config'`), with no hint that `load_qat_checkpoint` passes keywords to it."""
    pl.seed_everything(0, verbose=False)
    model = _NeedsAConfig({"hidden": 32})
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="q")
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(start_epoch=0), ckpt], enable_checkpointing=True).fit(
        model
    )
    with pytest.raises(TypeError, match=r"_NeedsAConfig cannot be built from the checkpoint's hyperparameters .*"
                       r"pass the arguments it lacks to load_qat_checkpoint as keywords"):  # fmt: skip
        load_qat_checkpoint(_NeedsAConfig, tmp_path / "q.ckpt")
    loaded = load_qat_checkpoint(_NeedsAConfig, tmp_path / "q.ckpt", config={"hidden": 32})
    assert qat_modules(loaded)


def test_a_weights_only_qat_checkpoint_says_its_settings_are_not_in_it(tmp_path):
    """Trial BR: `load_qat_checkpoint` of a `save_weights_only=True` checkpoint pointed to `load_from_checkpoint`,
    which failed on the quantizer entries; `validate(ckpt_path=...)` converted it with the evaluating callback's bits
    in silence (a 4-bit run scored 9.3% under a 2-bit callback)."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="w", save_weights_only=True)
    trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(), ckpt], enable_checkpointing=True).fit(TinyModule())
    with pytest.raises(ValueError, match=r"holds fake-quant layers but no QuantizationAwareTraining state \(saved "
                       r"with `save_weights_only=True`\?\)"):  # fmt: skip
        load_qat_checkpoint(TinyModule, tmp_path / "w.ckpt")
    with pytest.warns(UserWarning, match=r"the checkpoint holds fake-quant layers but records no settings"):
        trainer(callbacks=[QuantizationAwareTraining(2, 2)]).validate(
            TinyModule(), ckpt_path=tmp_path / "w.ckpt", verbose=False
        )


@pytest.mark.parametrize(
    ("module_class", "path", "error", "match"),
    [
        (TinyModule, None, TypeError, r"`checkpoint_path` must be a file path .* or an open binary file, got NoneType"),
        (TinyModule, "missing.ckpt", ValueError, r"`checkpoint_path`='.*missing\.ckpt' is not a file"),
        (TinyModule, ".", ValueError, r"is a folder: a distributed checkpoint .*\(save_distributed_checkpoint=False\)"),
        ("TinyModule", "x.ckpt", TypeError, r"`module_class` must be a LightningModule subclass"),
        (torch.nn.Linear, "x.ckpt", TypeError, r"`module_class` must be a LightningModule subclass"),
    ],
)
def test_load_qat_checkpoint_checks_its_arguments(tmp_path, module_class, path, error, match):
    with pytest.raises(error, match=match):
        load_qat_checkpoint(module_class, path if path in (None, ".") else tmp_path / path)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight_bits": 1}, ValueError, "`weight_bits`=1 is outside the supported range 2..8"),
        ({"weight_bits": 9}, ValueError, "`weight_bits`=9 is outside"),
        ({"activation_bits": 0}, ValueError, "`activation_bits`=0 is outside"),
        ({"scale": "log2"}, ValueError, "`scale`='log2' is not one of"),
        ({"shift_search": True}, ValueError, "`shift_search=True` needs `scale='power_of_two'`"),
        ({"shift_search": 1, "scale": "power_of_two"}, TypeError, "`shift_search` must be a bool"),
        ({"start_epoch": -1}, ValueError, "`start_epoch`=-1 must be >= 0"),
        ({"start_epoch": 3, "freeze_observers_epoch": 2}, ValueError, "`freeze_observers_epoch`=2 is before"),
        ({"exclude": 4}, TypeError, "`exclude` must be None, a glob string"),
        ({"quantize_bias": True, "activation_bits": None}, ValueError, r"`quantize_bias`=True .* `activation_bits`"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**kwargs)


class FailOnFirstStep(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("training started")


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"start_epoch": 3}, {"max_epochs": 3}, "`start_epoch`=3 must be below the Trainer's `max_epochs`=3"),
        ({"include": ["decoder.*"]}, {}, "`include` pattern 'decoder.\\*' matches no module"),
        ({"exclude": ["*"]}, {}, "select no weight of TinyModule"),
        (
            {"scale": "power_of_two", "shift_search": True, "start_epoch": 0},
            {"limit_val_batches": 0},
            "`shift_search=True` evaluates shifts on the validation batches",
        ),
    ],
)
def test_bad_setup_raises_before_training_and_leaves_the_model_untouched(tiny, kwargs, trainer_kwargs, match):
    before = weights_of(tiny)
    classes = {n: type(m) for n, m in tiny.named_modules()}
    with pytest.raises(ValueError, match=match):
        trainer(
            **{"max_epochs": 5, **trainer_kwargs}, callbacks=[QuantizationAwareTraining(**kwargs), FailOnFirstStep()]
        ).fit(tiny)
    assert {n: type(m) for n, m in tiny.named_modules()} == classes
    after = weights_of(tiny)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_fit_another_callback_refuses_before_training_leaves_the_model_float(tiny):
    """QAT converts at setup; a later callback's refusal (its own setup, or its on_train_start) left the model
    converted, and a retry with other settings kept the first ones (found by a new-user trial)."""
    classes = {n: type(m) for n, m in tiny.named_modules()}
    with pytest.raises(ValueError, match="`end_epoch`=50 is after the Trainer's `max_epochs`=5"):
        trainer(max_epochs=5, callbacks=[QuantizationAwareTraining(), IterativePruning(0.9, end_epoch=50)]).fit(tiny)
    assert {n: type(m) for n, m in tiny.named_modules()} == classes and not qat_modules(tiny)
    qat = QuantizationAwareTraining(4, 8, start_epoch=0)
    trainer(max_epochs=1, callbacks=[qat]).fit(tiny)  # the retry gets its own settings
    assert {q.bits for n, q in quantizers(tiny) if n.endswith("weight_fake_quant")} == {4}


def test_start_epoch_beyond_max_steps_is_refused_before_training(tiny):
    """Quantization would never switch on; the fit returned a float model without a word (new-user trial)."""
    with pytest.raises(ValueError, match=r"`start_epoch`=5: quantization switches on after .* `max_steps`=20"):
        trainer(
            max_epochs=-1, max_steps=20, callbacks=[QuantizationAwareTraining(start_epoch=5), FailOnFirstStep()]
        ).fit(tiny)
    assert not qat_modules(tiny)


def test_quantizers_with_nothing_to_calibrate_switch_on_at_once_in_a_fit_shorter_than_its_first_epoch(tiny):
    """Trial FO: the LLM recipe (int4 weight groups, int8 per-token activations) in one long epoch that `max_steps`
    ends, as a fine-tune usually runs, was refused and told to "lower `start_epoch`", already 0. Its scales come from
    the weights and from each token: it switches on at the first step."""
    pl.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(4, 8, group_size=4, activation_granularity="per_token")
    fit = trainer(max_epochs=-1, max_steps=5, callbacks=[qat])  # 8 batches per epoch
    fit.fit(tiny)
    assert fit.global_step == 5
    assert all(q.fake_quant_enabled for _, q in quantizers(tiny))
    assert {q.bits for n, q in quantizers(tiny) if n.endswith("weight_fake_quant")} == {4}


class ActiveAtBatchStart(Callback):
    """Whether fake quantization is on as each training batch starts."""

    def __init__(self) -> None:
        self.states: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(all(active(pl_module)))


def test_quantizers_that_calibrate_do_so_on_the_first_tenth_of_a_fit_shorter_than_its_first_epoch(tiny, caplog):
    """A recipe that calibrates (per-tensor activation ranges: the default) in one long epoch that `max_steps` ends
    was refused, told to shorten epochs with `limit_train_batches`. It calibrates on the first tenth of the steps the
    fit makes in `start_epoch` (at least one), then switches on; with gradient accumulation too."""
    probe = ActiveAtBatchStart()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit = trainer(max_epochs=-1, max_steps=5, callbacks=[QuantizationAwareTraining(), probe])  # 8 per epoch
        fit.fit(tiny)
    assert fit.global_step == 5
    assert probe.states == [False, True, True, True, True]  # calibrated on step 1, on after it
    assert all(q.initialized for _, q in quantizers(tiny))
    assert on_grid(tiny)
    said = "calibrate on the first 1 optimizer step of that epoch (a tenth of the fit's 5 in it, at least one)"
    assert said in caplog.text
    assert "fake quantization on for 3 layers (weights 8 bits, activations 8 bits, minmax) after optimizer step 1" in (
        caplog.text
    )
    pl.seed_everything(0, verbose=False)
    model, probe = TinyModule(n=1024), ActiveAtBatchStart()  # 32 batches per epoch, 16 optimizer steps
    trainer(max_epochs=-1, max_steps=12, accumulate_grad_batches=2, callbacks=[QuantizationAwareTraining(), probe]).fit(
        model
    )
    assert probe.states == [False] * 4 + [True] * 20  # 2 optimizer steps (4 batches) calibrate, of 12


def test_the_switch_inside_start_epoch_is_planned_on_that_epochs_own_length():
    """Trial FW: the switch step was planned at the start of training on epoch 0's length, so where a
    `GradientAccumulationScheduler` made `start_epoch`=1 shorter it never came, and quantization switched on at the end
    of fit, untrained. With `freeze_observers_epoch` at or before it, the ranges freeze when it switches on (they moved
    on by 30%)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    pl.seed_everything(0, verbose=False)
    model, probe = TinyModule(n=1024), ActiveAtBatchStart()  # 32 batches an epoch: 32 steps, then 8 at 4 a step
    qat = QuantizationAwareTraining(start_epoch=1)
    trainer(max_epochs=-1, max_steps=38, callbacks=[qat, GradientAccumulationScheduler({1: 4}), probe]).fit(model)
    assert probe.states == [False] * 36 + [True] * 20  # epoch 1 calibrates on its first step (4 batches), of 6
    pl.seed_everything(0, verbose=False)
    model = TinyModule(n=1024)
    scales: list[torch.Tensor] = []

    class WeightScale(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scales.append(pl_module.net[0].weight_fake_quant.scale.detach().clone())

    qat = QuantizationAwareTraining(freeze_observers_epoch=0)
    trainer(max_epochs=-1, max_steps=20, callbacks=[qat, WeightScale()]).fit(model)
    assert all(torch.equal(scales[1], later) for later in scales[2:])  # frozen as it switched on after step 2
    assert not any(q.observer_enabled for _, q in quantizers(model))
    # trial GA: the epoch's end, which `max_steps` reaches, read them again from the final weights (11% off)
    assert torch.equal(scales[1], model.net[0].weight_fake_quant.scale)


def test_ranges_frozen_at_the_switch_inside_start_epoch_stay_frozen_on_a_resume(tmp_path):
    """Trial FY: a fit resumed after the switch inside `start_epoch`, with `freeze_observers_epoch` there, turned the
    observers back on at train start: its ranges moved on, where the uninterrupted fit's stayed."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="at5", every_n_train_steps=5)
    first = trainer(tmp_path, max_epochs=-1, max_steps=20, enable_checkpointing=True,
                    callbacks=[QuantizationAwareTraining(freeze_observers_epoch=0), ckpt, StopAtStep(5)])  # fmt: skip
    first.fit(TinyModule(n=1024))  # 32 batches an epoch: switched on (and frozen) after step 2
    on: list[bool] = []

    class Observing(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            on.append(any(q.observer_enabled for _, q in quantizers(pl_module)))

    model = TinyModule(n=1024)
    trainer(tmp_path, max_epochs=-1, max_steps=20,
            callbacks=[QuantizationAwareTraining(freeze_observers_epoch=0), Observing()]).fit(
        model, ckpt_path=str(tmp_path / "at5.ckpt")
    )  # fmt: skip
    assert on and not any(on) and all(active(model))


def test_a_shift_search_in_a_fit_shorter_than_its_calibration_epoch_is_refused_with_what_to_do():
    model = TinyModule()
    qat = QuantizationAwareTraining(scale="power_of_two", shift_search=True)
    said = r"`shift_search=True` chooses the shifts on the validation at the end of `start_epoch`=0, .*`max_steps`=5"
    with pytest.raises(ValueError, match=said + r".* set `shift_search=False` .* `limit_train_batches=N`"):
        trainer(max_epochs=-1, max_steps=5, callbacks=[qat, FailOnFirstStep()]).fit(model)
    assert not qat_modules(model)


class StopAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("recipe", ["calibrated", "llm"])
@pytest.mark.parametrize("stop", [1, 3])
def test_a_fit_shorter_than_its_first_epoch_resumes_inside_it_as_it_would_have_run(tmp_path, recipe, stop):
    """Resumed inside the epoch that `max_steps` ends (before the switch-on, and after it) the fit was refused as
    never switching quantization on (the LLM recipe, already on from the checkpoint), or switched on elsewhere."""
    kwargs: dict[str, Any] = (
        {} if recipe == "calibrated" else dict(weight_bits=4, group_size=4, activation_granularity="per_token")
    )

    def run(resume: bool) -> tuple[TinyModule, list[bool]]:
        pl.seed_everything(0, verbose=False)
        model, probe = TinyModule(n=1024), ActiveAtBatchStart()  # 32 batches per epoch
        ckpt = ModelCheckpoint(dirpath=tmp_path, filename=f"{recipe}{stop}", every_n_train_steps=stop)
        callbacks = [QuantizationAwareTraining(**kwargs), probe]
        if not resume:
            trainer(tmp_path, max_epochs=-1, max_steps=20, callbacks=callbacks).fit(model)
            return model, probe.states
        halt = StopAtStep(stop)  # the fit stopped early, with its full `max_steps`, to be resumed
        first = trainer(
            tmp_path,
            max_epochs=-1,
            max_steps=20,
            callbacks=[QuantizationAwareTraining(**kwargs), ckpt, halt],
            enable_checkpointing=True,
        )
        first.fit(model)
        assert first.global_step == stop
        model = TinyModule(n=1024)
        trainer(tmp_path, max_epochs=-1, max_steps=20, callbacks=callbacks).fit(
            model, ckpt_path=str(tmp_path / f"{recipe}{stop}.ckpt")
        )
        return model, probe.states

    _, states = run(resume=False)
    resumed, resumed_states = run(resume=True)
    assert states[stop:] == resumed_states
    assert states == ([False, False] + [True] * 18 if recipe == "calibrated" else [True] * 20)
    assert all(active(resumed))


def test_two_callbacks_on_the_same_layers_are_refused_and_disjoint_ones_each_keep_their_settings(tiny):
    """The second callback on a layer changed nothing (the layer keeps the first one's settings) with only a
    warning, where two pruning callbacks are refused (found by a new-user trial)."""
    first, second = QuantizationAwareTraining(8, 8), QuantizationAwareTraining(4, 8, include=["net.4"])
    with pytest.raises(ValueError, match=r"Two QuantizationAwareTraining callbacks select the same layers \['net.4'\]"):
        trainer(max_epochs=2, callbacks=[first, second, FailOnFirstStep()]).fit(tiny)
    assert not qat_modules(tiny)  # refused before the first callback converted anything
    model = TinyModule()
    first, second = (
        QuantizationAwareTraining(8, 8, exclude=["net.4"]),
        QuantizationAwareTraining(4, 8, include=["net.4"]),
    )
    trainer(max_epochs=1, callbacks=[first, second]).fit(model)
    bits = {name: m.weight_fake_quant.bits for name, m in qat_modules(model)}
    assert bits == {"net.0": 8, "net.2": 8, "net.4": 4}


def test_export_at_fit_end_without_changing_the_model(tmp_path):
    from lightning_compress import load_compressed

    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    model.example_input_array = torch.zeros(2, 16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    pruning = IterativePruning(0.8, start_epoch=0, end_epoch=2, export_path=tmp_path / "model.lcz")
    qat = QuantizationAwareTraining(8, 8, start_epoch=1, export_path=tmp_path / "model.onnx")
    t = trainer(max_epochs=3, callbacks=[pruning, qat, ckpt], enable_checkpointing=True)
    t.fit(model)
    assert (tmp_path / "model.lcz").exists() and (tmp_path / "model.onnx").exists()
    assert qat.export_report.format == "onnx"
    assert pruning.export_report.sparsity == pytest.approx(0.8, abs=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # the export left the model as it was
    fresh = TinyModule()
    load_compressed(fresh, tmp_path / "model.lcz")
    x = make_blobs(8, seed=3).tensors[0]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model(x), atol=1e-6)
    assert t.test(model, ckpt_path=tmp_path / "last.ckpt", verbose=False)[0]["test_loss"] > 0


class ResidualModule(pl.LightningModule):
    """`Residual` (two convolutions whose outputs no quantized layer reads first) on blobs shaped as images."""

    def __init__(self, calls_forward: bool | str = True, val_size: int = 8) -> None:
        super().__init__()
        self.net = Residual()
        self.calls_forward = calls_forward
        self.val_size = val_size  # the images' side in validation (the net pools them globally)
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        keyword, direct = self.calls_forward == "keyword", bool(self.calls_forward)
        out = self(x=x) if keyword else self(x) if direct else self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _data(self, seed: int):
        x, y = make_blobs(96, 192, 4, seed=seed).tensors
        return DataLoader(TensorDataset(x.reshape(-1, 3, 8, 8), y), batch_size=16)

    def train_dataloader(self):
        return self._data(0)

    def val_dataloader(self):
        if self.val_size == 8:
            return self._data(1)
        x = torch.randn(32, 3, self.val_size, self.val_size)
        return DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=16)


@pytest.mark.parametrize("callback", ["qat", "pruning"])
def test_an_onnx_export_path_measures_float_convolution_outputs_on_the_last_validation(tmp_path, callback):
    """Trial BS: convolutions whose outputs no quantized layer reads first ran in float in the exported ONNX. The
    callbacks' `export_path` hands the inputs of the last validation's first batches to `export_onnx(calibration=)`:
    every convolution runs as QLinearConv. A `validation_step` that does not call `forward` records none: said."""
    pytest.importorskip("onnxruntime")
    for calls_forward in (True, False):
        pl.seed_everything(0, verbose=False)
        model = ResidualModule(calls_forward)
        path = tmp_path / f"{calls_forward}.onnx"
        qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=path if callback == "qat" else None)
        callbacks: list[Callback] = [qat]
        if callback == "pruning":
            callbacks.append(IterativePruning(0.5, start_epoch=0, end_epoch=1, export_path=path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=2, callbacks=callbacks).fit(model)
        said = [str(w.message) for w in caught if "quantized convolution(s)" in str(w.message)]
        kernels = ort_kernels(path)
        if calls_forward:
            assert not said and kernels.get("QLinearConv") == 3 and "Conv" not in kernels
        else:
            assert said and kernels.get("QLinearConv", 0) < 3


class _AnotherProcessFailed(SingleDeviceStrategy):
    """A strategy whose collective decision says some other process's export raised."""

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return True


def test_an_export_that_failed_in_another_process_raises_in_this_one_too(tmp_path):
    """Every process waits for rank zero's file; when rank zero's export raised, the others raise too (instead of
    returning from fit without the file)."""
    pl.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "model.lcz")
    t = trainer(max_epochs=1, callbacks=[qat], strategy=_AnotherProcessFailed(torch.device("cpu")), accelerator="cpu")
    with pytest.raises(RuntimeError, match=r"Writing `export_path`=.*model.lcz' failed in another process"):
        t.fit(TinyModule())


def test_onnx_export_path_needs_example_inputs(tiny, tmp_path):
    qat = QuantizationAwareTraining(export_path=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"`export_path`=.* is an ONNX file, which needs example inputs"):
        trainer(max_epochs=1, callbacks=[qat, FailOnFirstStep()]).fit(tiny)
    with pytest.raises(TypeError, match="`export_path` must be a path"):
        QuantizationAwareTraining(export_path=3)
    for empty in ("", tmp_path):  # regression: "" failed after training ("PosixPath('.') has an empty name")
        with pytest.raises(ValueError, match=r"`export_path`=.* must name a file"):
            QuantizationAwareTraining(export_path=empty)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_the_llm_recipe_with_pruning_in_bf16(precision):
    """int4 weights per group of 8 inputs, int8 per-token activations, 2:4 pruning, bf16 autocast: pruned
    weights stay exactly zero and every quantized weight is on its group's grid."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule(optimizer="adam")
    pruning = IterativePruning(0.5, granularity="2:4", start_epoch=0, end_epoch=2)
    qat = QuantizationAwareTraining(4, 8, group_size=8, activation_granularity="per_token", start_epoch=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=3, callbacks=[pruning, qat], precision=precision).fit(model)
    assert not [w for w in caught if "never observed" in str(w.message)]  # per-token ranges come from each batch
    for _, layer in qat_modules(model):
        q = layer.weight_fake_quant
        assert q.groups and q.scale.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float16)
        w = q(layer.weight).detach().float()
        codes = w / q.expanded_scale(w.shape)
        tolerance = 0.05 if precision == "bf16-true" else 1e-3  # bf16 weights hold code x scale to 8 bits
        assert torch.allclose(codes, codes.round(), atol=tolerance) and int(codes.abs().max().round()) <= 7
    for name, mask in pruning.masks.items():
        assert bool((model.get_parameter(name)[~mask] == 0).all()), name
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_channel_pruning_with_group_wise_int4_exports_a_compacted_file_of_the_trained_model(tmp_path):
    """Removing pruned input channels of a layer with int4 scales per group of inputs moves the groups: the export
    at the end of fit raised CompactionError. Whole groups go (and pruning takes whole groups)."""
    from lightning_compress import QuantConfig, compact, convert_to_qat, load_compressed

    pl.seed_everything(0, verbose=False)
    model = TinyModule(hidden=64)
    model.example_input_array = torch.zeros(2, 16)
    pruning = IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=2, export_path=tmp_path / "m.lcz")
    qat = QuantizationAwareTraining(4, None, group_size=16, start_epoch=0)
    trainer(max_epochs=3, callbacks=[pruning, qat]).fit(model)
    x = make_blobs(8, seed=3).tensors[0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    exported = TinyModule(hidden=64)
    exported.example_input_array = torch.zeros(2, 16)
    convert_to_qat(exported, QuantConfig(4, None, group_size=16))
    exported.load_state_dict(model.state_dict())
    report = compact(exported)  # the shapes of the exported copy
    # channels go a whole group at a time (they were scattered, and all of them stayed): every pruned one is removed
    assert not report.kept_for_quant_groups and report.channels["net.0"][1] < 64
    load_compressed(exported, tmp_path / "m.lcz")
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), expected)


class _ReadsAWeight(TinyModule):
    """Its forward reads the last layer's weight instead of calling it (as transformers' Mamba does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.net[4]
        return nn.functional.linear(self.net[:4](x), head.weight, head.bias)


def test_a_layer_whose_forward_never_runs_is_named_when_quantization_switches_on(tmp_path, caplog):
    """It computes in float and its file stores it in float, as said; a trial: the quantization error logged at each
    validation gave its idle quantizer a scale, so the file stored it in 8 bits and reloaded another model. Trial EA:
    the switch also said `calibrate` (never called) had not reached it, and counted it among the layers quantized."""
    pl.seed_everything(0, verbose=False)
    model = _ReadsAWeight()
    with (
        pytest.warns(  # trial EW: it said the weights were read directly where the branch was not taken (SAM)
            UserWarning,
            match=r"\['net.4'\] never ran their forward in epoch 0: a branch the training data did not take",
        ) as caught,
        caplog.at_level(logging.INFO),
    ):
        trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(model)
    assert not [w for w in caught if "calibrate(model, batches)" in str(w.message)]
    assert "fake quantization on for 2 layers (1 that never ran stay float) (weights 8 bits" in caplog.text
    with pytest.warns(UserWarning, match=r"whose forward never ran in training \(a branch the data did not take, or"):
        report = save_compressed(model, tmp_path / "m.lcz")
    assert all(layer.bits == 32 for layer in report.layers if layer.name == "net.4.weight")
    fresh = _ReadsAWeight()
    load_compressed(fresh, tmp_path / "m.lcz")
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_a_fit_that_ends_before_quantization_switches_on_says_so(tiny, tmp_path):
    qat = QuantizationAwareTraining(start_epoch=3, export_path=tmp_path / "m.lcz")
    with pytest.warns(
        UserWarning, match=r"ended after 2 epochs, before fake quantization switched on .* holds float weights"
    ):
        trainer(max_epochs=5, callbacks=[qat, StopAfterEpoch(1)]).fit(tiny)


def test_a_refusal_caused_by_fast_dev_run_names_it(tiny):
    qat = QuantizationAwareTraining(start_epoch=3)
    with pytest.raises(ValueError, match=r"quantization would never switch on\. \(Lightning's `fast_dev_run`"):
        trainer(max_epochs=10, fast_dev_run=True, callbacks=[qat]).fit(tiny)


class LayersInConfigureModel(TinyModule):
    """Builds its head in `configure_model`, after QAT converted the layers at `setup`."""

    def __init__(self, everything: bool = False) -> None:
        super().__init__()
        self.everything = everything
        if everything:
            del self.net

    def configure_model(self) -> None:
        if self.everything and not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        elif not hasattr(self, "late"):
            self.late = nn.Linear(4, 4)

    def forward(self, x):
        out = self.net(x)
        return self.late(out) if hasattr(self, "late") else out


def test_layers_built_in_configure_model_are_named():
    """Found by a trial: QAT converts at `setup`, before `configure_model`: with every layer built there the
    refusal blamed `include`; with some, those stayed float and nothing said so."""
    with pytest.raises(ValueError, match=r"select no weight .* converts layers at `setup`, before .*configure_model"):
        trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(start_epoch=0)]).fit(LayersInConfigureModel(True))
    with pytest.warns(UserWarning, match=r"\['late'\] match `include`/`exclude` but did not exist at `setup`"):
        trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(start_epoch=0)]).fit(LayersInConfigureModel())


class NoValidationLoader(TinyModule):
    val_dataloader = pl.LightningModule.val_dataloader  # a validation_step, and no loader for it


def test_shift_search_without_validation_data_names_what_is_missing():
    """Refused after a whole epoch of training, with the layers left converted (found by a QAT trial): now before
    the first step, and the model is float again."""
    model = NoValidationLoader()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=0)
    with pytest.raises(ValueError, match=r"`shift_search=True` .* this fit has no validation data: pass `val_dataloa"):
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert not qat_modules(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shift_search_with_a_first_epoch_that_does_not_validate_is_not_refused():
    """Trial CR: with `check_val_every_n_epoch=2` and no sanity check Lightning had not loaded the validation loaders
    when training started, and the fit was refused as having no validation data; `start_epoch`=1 validates."""
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)
    model = TinyModule()
    trainer(max_epochs=3, callbacks=[qat], check_val_every_n_epoch=2).fit(model)
    layers = qat_modules(model)
    assert qat.shifts and layers and all(m.weight_fake_quant.frozen_shift for _, m in layers)


def test_shift_search_in_a_fit_with_no_validation_loader_is_refused_before_training_when_epochs_skip_validation():
    """With `check_val_every_n_epoch=2` the start of training cannot see the loaders (not loaded yet), but a fit given
    none at all is known to have no data: it trained through `start_epoch`, then failed at its end."""
    for start in (1, 0):  # (trial GD: with `start_epoch=0` it asked for `check_val_every_n_epoch` dividing 1 first)
        model = NoValidationLoader()
        qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=start)
        fit = trainer(max_epochs=3, callbacks=[qat], check_val_every_n_epoch=2)
        with pytest.raises(ValueError, match=r"`shift_search=True` .* this fit has no validation data: pass `val_dat"):
            fit.fit(model)
        assert fit.global_step == 0 and not qat_modules(model)


def test_shift_search_with_an_interval_over_epochs_that_skips_start_epoch_is_refused_before_training():
    """Trial EL: an integer `val_check_interval` counted over the fit (`check_val_every_n_epoch=None`) that runs no
    validation in `start_epoch` trained through it, then failed blaming missing `val_dataloaders`."""
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_epoch = len(model.train_dataloader())
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)
    fit = trainer(max_epochs=4, callbacks=[qat], val_check_interval=3 * per_epoch, check_val_every_n_epoch=None)
    with pytest.raises(ValueError, match=rf"`val_check_interval`={3 * per_epoch} batches, counted over the fit"):
        fit.fit(model)
    assert fit.global_step == 0
    assert not qat_modules(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # an interval that validates in `start_epoch` (its last batch) searches there
    qat = QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)
    trainer(max_epochs=3, callbacks=[qat], val_check_interval=2 * per_epoch, check_val_every_n_epoch=None).fit(model)
    assert qat.shifts


class TrainableOnly(TinyModule):
    """An optimizer over the parameters that train now (what one writes with frozen layers): learned scales train
    only once quantization is on, so they are left out; OneCycleLR stepping per step."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_learned_scales_left_out_of_the_optimizer_train_under_a_scheduler_and_resume_exactly(tmp_path):
    """The scales' group added by the callback lacked the keys OneCycleLR had put on the others (KeyError
    'initial_lr' at its first step); and a resume failed (the resumed optimizer, built with the scales already
    training, held them in its first group: 'a different number of parameter groups'). A trial found both."""

    def fit(epochs, callbacks, ckpt_path=None, root=tmp_path):
        pl.seed_everything(0, verbose=False)
        model = TrainableOnly()
        qat = QuantizationAwareTraining(4, 8, scale="learned", start_epoch=0)
        run = trainer(root, max_epochs=epochs, callbacks=[qat, *callbacks], enable_checkpointing=True)
        with (
            pytest.warns(UserWarning, match="learned scales were not in the optimizer")
            if ckpt_path is None
            else (warnings.catch_warnings())
        ):
            run.fit(model, ckpt_path=ckpt_path)
        return model, run

    whole, run = fit(3, [])
    groups = run.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[1]["max_lr"] == 0.05
    assert {id(p) for p in groups[1]["params"]} == {id(q.scale) for _, q in quantizers(whole) if q.mode == "learned"}
    checkpoints = tmp_path / "resume"
    fit(3, [StopAfterEpoch(1), ModelCheckpoint(dirpath=checkpoints, save_last=True)], root=checkpoints)
    resumed, _ = fit(3, [ModelCheckpoint(dirpath=checkpoints, save_last=True)], str(checkpoints / "last.ckpt"))
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


class ScheduledTrainableOnly(TinyModule):
    """An optimizer over the parameters that train now, under a scheduler holding one entry per parameter group."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        schedulers = torch.optim.lr_scheduler
        if self.kind == "LambdaLR":  # transformers' warmup schedules are LambdaLRs
            schedule: Any = schedulers.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        elif self.kind == "CyclicLR":
            schedule = schedulers.CyclicLR(optimizer, base_lr=0.01, max_lr=0.05, step_size_up=3)
        elif self.kind == "SequentialLR":
            warmup = schedulers.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
            decay = schedulers.ExponentialLR(optimizer, gamma=0.9)
            schedule = schedulers.SequentialLR(optimizer, [warmup, decay], milestones=[4])
        else:
            schedule = schedulers.CosineAnnealingLR(optimizer, T_max=20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("kind", ["LambdaLR", "CyclicLR", "SequentialLR", "CosineAnnealingLR"])
def test_learned_scales_given_a_group_of_their_own_follow_every_scheduler(kind):
    """Trial BR: the scales' group was added after the scheduler was built, so a scheduler keeping one entry per
    group (LambdaLR, transformers' warmup, CyclicLR, SequentialLR) failed at its first step ("zip() argument 2 is
    shorter than argument 1"), and CosineAnnealingLR left the group's rate unscheduled. The group gets the first
    group's entries: its rate follows the schedule."""
    pl.seed_everything(0, verbose=False)
    model = ScheduledTrainableOnly(kind)
    qat = QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0)
    run = trainer(max_epochs=2, callbacks=[qat])
    with pytest.warns(UserWarning, match="learned scales were not in the optimizer"):
        run.fit(model)
    groups = run.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"])
    assert groups[0]["lr"] != pytest.approx(0.05)  # the schedule moved both


def test_a_second_fit_with_other_settings_on_layers_quantized_already_is_refused():
    """Trial BR: a second fit with 4-bit settings kept the first fit's 8-bit layers (a warning) or, with other
    activation bits only, said nothing, while its checkpoints recorded the callback's settings: reloaded, 4-bit
    quantizers held 8-bit scales (9.3% against 81.7%). Refused before training; the same settings fit again."""
    from lightning_compress import convert_to_float

    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8)]).fit(model)
    before = copy.deepcopy(model.state_dict())
    for bits in ((4, 4), (8, 4)):
        with pytest.raises(ValueError, match=r"are fake-quant layers already, converted with other settings \(.*"
                           r"activation_bits=8 \(4 asked\)\)\. Call `convert_to_float\(model\)`"):  # fmt: skip
            trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(*bits)]).fit(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8)]).fit(model)  # the same settings
    convert_to_float(model)
    trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(4, 4)]).fit(model)
    assert {q.bits for _, q in quantizers(model)} == {4}


def test_a_fit_that_fails_before_quantization_switched_on_gives_the_float_layers_back():
    """An unlogged `monitor` is found at the first validation when the sanity check is off, after training steps:
    the layers stayed QAT layers (a docs trial). They computed float, so the model gets its float layers back."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    pruning = IterativePruning(0.5, monitor="val_accuracy", max_drop=0.1, start_epoch=0, end_epoch=2)
    qat = QuantizationAwareTraining(8, 8, start_epoch=1)
    with pytest.raises(ValueError, match="`monitor`='val_accuracy' was not logged during validation"):
        trainer(max_epochs=3, callbacks=[pruning, qat]).fit(model)
    assert not qat_modules(model) and isinstance(model.net[0], nn.Linear)
    model = TinyModule()  # after the switch the quantized model is what trained: it stays quantized
    qat = QuantizationAwareTraining(8, 8, start_epoch=0)
    with pytest.raises(RuntimeError, match="stop"):
        trainer(max_epochs=3, callbacks=[qat, FailAtEpoch(1)]).fit(model)
    assert qat_modules(model) and all(active(model))


@pytest.mark.parametrize("tune", ["lr_find", "scale_batch_size"])
def test_a_tuner_run_leaves_the_model_float_and_the_next_fit_quantizes(tune):
    """A trial: `Tuner(trainer).lr_find(model)` runs its own callbacks in place of these, so the layers QAT converted
    at `setup` stayed QAT layers (21 extra state entries: the model no longer loaded into its plain class)."""
    from lightning.pytorch.tuner import Tuner

    class Tunable(TinyModule):
        def __init__(self):
            super().__init__()
            self.lr, self.batch_size = 0.05, 16

        def train_dataloader(self):
            return DataLoader(make_blobs(256), batch_size=self.batch_size, shuffle=True)

    pl.seed_everything(0, verbose=False)
    model = Tunable()
    qat = QuantizationAwareTraining(8, 8, start_epoch=1)
    fit = trainer(max_epochs=3, callbacks=[qat])
    tuner = Tuner(fit)
    if tune == "lr_find":
        tuner.lr_find(model, num_training=8)
    else:
        tuner.scale_batch_size(model, max_trials=2, steps_per_trial=2)
    assert not qat_modules(model) and isinstance(model.net[0], nn.Linear)
    TinyModule().load_state_dict({k: v for k, v in model.state_dict().items()})
    fit.fit(model)
    assert qat_modules(model) and all(active(model))


class FailAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("stop")


def test_a_model_with_a_layer_registered_twice_resumes_its_quantization(tmp_path):
    """A trial: a module registered under two names (`self.backbone = nn.Sequential(self.net[0])`, as for
    BackboneFinetuning) made `fit(ckpt_path=...)` refuse the same callback's checkpoint: the state dict names the
    layer twice, the check counted it once."""

    class Aliased(TinyModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(self.net[0])

    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0), checkpoint],
            enable_checkpointing=True).fit(Aliased())  # fmt: skip
    resumed = Aliased()
    trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
        resumed, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert any(name == "backbone.0" for name, _ in resumed.named_modules(remove_duplicate=False))


def test_load_qat_checkpoint_refuses_a_damaged_quantization_state(tmp_path):
    """A trial (AF): without its quantizer entries the checkpoint loaded as the float model (0.037 off the quantized
    one, 'loaded strictly' said the docstring); `layers="net.0"` was read letter by letter; an unknown setting gave
    QuantConfig's raw TypeError."""
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0), checkpoint],
            enable_checkpointing=True).fit(TinyModule())  # fmt: skip
    good = torch.load(tmp_path / "last.ckpt", weights_only=True)
    key = next(k for k in good["callbacks"] if k.startswith("QuantizationAwareTraining"))

    def damaged(edit, name):
        state = copy.deepcopy(good)
        edit(state)
        torch.save(state, tmp_path / name)
        return tmp_path / name

    def drop_quantizers(state):
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "_fake_quant." not in k}

    cases = [
        (drop_quantizers, r"lacks \d+ entries of the quantized model"),
        (lambda s: s["callbacks"][key].update(layers="net.0"), r"has layers=net.0: a list of layer names"),
        (lambda s: s["callbacks"][key]["config"].update(bogus=1), r"has settings .* that are not a QuantConfig's"),
        (lambda s: s["callbacks"][key].update(config="x"), r"that are not a QuantConfig's \(a dict is saved"),
        (lambda s: s["callbacks"][key].update(version=7), r"state has version 7, not 1"),
        (lambda s: s["state_dict"]["net.0.weight_fake_quant.scale"].fill_(float("nan")), "not all finite floats"),
        # trial AL: these loaded, and moved the outputs by up to 1.7
        (
            lambda s: s["state_dict"]["net.0.input_fake_quant.zero_point"].fill_(10**6),
            r"net.0.input_fake_quant.zero_point: zero points outside the quantizer's range 0..255",
        ),
        (
            lambda s: s["state_dict"]["net.0.input_fake_quant.state"].fill_(-7),
            r"net.0.input_fake_quant.state: flags a quantizer does not have \(\[-7\]\)",
        ),
        (
            lambda s: s["state_dict"]["net.0.input_fake_quant.min_val"].fill_(float("nan")),
            r"min_val: an observed range that is not a finite number \(NaN, infinite or not floating point\)",
        ),
        (  # trial AM: an infinite range loaded, and the resumed fit went NaN without a word
            lambda s: s["state_dict"]["net.2.input_fake_quant.min_val"].fill_(-float("inf")),
            r"net.2.input_fake_quant.min_val: an observed range that is not a finite number",
        ),
        (
            lambda s: s["state_dict"]["net.0.weight_fake_quant.scale"].fill_(1e-45),
            r"net.0.weight_fake_quant.scale: scales that are not all finite floats of at least 1.18e-38",
        ),
        (
            lambda s: s["state_dict"]["net.0.weight_fake_quant.scale"].neg_(),
            r"net.0.weight_fake_quant.scale: scales that are not all finite floats of at least",
        ),
        (
            lambda s: s["state_dict"].update({"net.0.weight_fake_quant.scale": torch.ones(8, dtype=torch.int64)}),
            r"net.0.weight_fake_quant.scale: scales that are not all finite floats",
        ),
        (
            lambda s: s["callbacks"].update(
                {key + "x": {**s["callbacks"][key], "config": {**s["callbacks"][key]["config"], "weight_bits": 4}}}
            ),
            r"two QuantizationAwareTraining states that both quantize 'net.0'",
        ),
        (
            lambda s: s.pop("state_dict"),
            r"is not a Lightning checkpoint: it has no `state_dict` mapping names to tensors \(found NoneType\)",
        ),
        (
            lambda s: s.update(state_dict=list(s["state_dict"].values())),
            r"no `state_dict` mapping names to tensors \(found list\)",
        ),
        (
            lambda s: s["state_dict"].update({"net.__class__": torch.zeros(1)}),
            r"holds 1 entries TinyModule does not have \(\['net.__class__'\]\)",
        ),
        (
            lambda s: s["state_dict"].update({"net.0.weight": torch.zeros(3, 3)}),
            r"does not fit TinyModule: .*size mismatch",
        ),
        (  # trial BH: 4 stored bytes read as 2**28 scales took 1.8 GB, then torch's raw size mismatch
            lambda s: s["state_dict"].update({"net.0.weight_fake_quant.scale": torch.ones(1).expand(2**28)}),
            r"net.0.weight_fake_quant.scale: 268435456 values stored in 4 bytes \(an expanded view\)",
        ),
        (
            lambda s: s["state_dict"].update({"net.0.weight_fake_quant.scale": torch.ones(3)}),
            r"net.0.weight_fake_quant.scale: shape \(3,\), where the model's quantizer holds \(32,\)",
        ),
        (
            lambda s: s["state_dict"].update({"net.0.input_fake_quant.max_val": torch.ones(1).expand(2**28)}),
            r"net.0.input_fake_quant.max_val: shape \(268435456,\), where the model's quantizer holds \(\)",
        ),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            load_qat_checkpoint(TinyModule, damaged(edit, f"bad{i}.ckpt"))
    assert load_qat_checkpoint(TinyModule, tmp_path / "last.ckpt") is not None


def test_a_learned_scale_that_crossed_zero_loads_and_resumes(tmp_path):
    """Trial AM: LSQ legitimately drove 14 of 64 weight scales below zero (its quantizer uses |scale|), and both
    `load_qat_checkpoint` and a resume refused the genuine checkpoint as damaged."""
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TinyModule()
    trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0), checkpoint],
            enable_checkpointing=True).fit(model)  # fmt: skip
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state["state_dict"]["net.0.weight_fake_quant.scale"][:4].neg_()  # as training can leave them
    torch.save(state, tmp_path / "crossed.ckpt")
    loaded = load_qat_checkpoint(TinyModule, tmp_path / "crossed.ckpt")
    assert bool((loaded.net[0].weight_fake_quant.scale < 0).any())
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0)]).fit(
        TinyModule(), ckpt_path=tmp_path / "crossed.ckpt"
    )
    # trial BJ: the same settings with `include` written otherwise (another state key, the same layers) were refused
    # as "saved without this callback"; its optimizer state holds the learned scales
    resumed = QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0, include="net.*")
    with pytest.warns(UserWarning, match="starts afresh"):
        trainer(max_epochs=2, callbacks=[resumed]).fit(TinyModule(), ckpt_path=tmp_path / "last.ckpt")


def test_a_resumed_checkpoint_with_a_scale_that_is_not_finite_and_positive_is_refused(tmp_path):
    """A trial (AF): a NaN scale loaded, and the first pruning event blamed "the weights and gradients"; a NaN learned
    scale trained two epochs to NaN weights."""
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0), checkpoint],
            enable_checkpointing=True).fit(TinyModule())  # fmt: skip
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state["state_dict"]["net.0.weight_fake_quant.scale"].fill_(float("nan"))
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"net.0.weight_fake_quant.scale: scales that are not all finite floats"):
        trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
            TinyModule(), ckpt_path=str(tmp_path / "bad.ckpt")
        )
    state["state_dict"]["net.0.weight_fake_quant.scale"].fill_(0.01)
    state["state_dict"]["net.2.input_fake_quant.zero_point"].fill_(10**6)  # trial AL: loaded, outputs 1.7 off
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"net.2.input_fake_quant.zero_point: zero points outside the quantizer's"):
        trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
            TinyModule(), ckpt_path=str(tmp_path / "bad.ckpt")
        )
    state["state_dict"]["net.2.input_fake_quant.zero_point"].fill_(0)
    state["state_dict"]["net.0.weight_fake_quant.scale"] = torch.ones(1).as_strided((2**28,), (0,))  # trial BH
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"268435456 values stored in 4 bytes \(an expanded view\)"):
        trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
            TinyModule(), ckpt_path=str(tmp_path / "bad.ckpt")
        )


class _Switches(Callback):
    """Records at each epoch's start which of two layers quantize and observe."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        first, last = pl_module.net[0], pl_module.net[4]
        self.seen.append(
            (first.weight_fake_quant.fake_quant_enabled, last.weight_fake_quant.fake_quant_enabled,
             last.input_fake_quant.observer_enabled)
        )  # fmt: skip


@pytest.mark.parametrize("scale", ["minmax", "learned"])
def test_two_callbacks_keep_their_own_schedules_and_learned_scales(scale):
    """Trial AM: the callback that switched on first switched on every fake-quant layer (and its observers started
    the other's); beside a learned-scale callback, a minmax one gathered the learned scales too and the fit failed
    with torch's "some parameters appear in more than one parameter group"."""
    pl.seed_everything(0, verbose=False)
    early = QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.0"])
    late = QuantizationAwareTraining(8, 8, start_epoch=2, include=["net.4"], scale=scale)
    switches = _Switches()
    trainer(max_epochs=4, callbacks=[early, late, switches]).fit(TinyModule())
    assert switches.seen == [(False, False, False), (True, False, False), (True, False, True), (True, True, True)]
    assert len(early._learned_params) == 0 and len(late._learned_params) == (2 if scale == "learned" else 0)


def test_the_switch_on_message_names_groups_and_per_token_activations(caplog):
    """Trial AQ: 8da4w said "weights 4 bits, activations 8 bits, minmax", which reads as per-tensor 4-bit weights."""
    import logging

    pl.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(4, 8, group_size=16, activation_granularity="per_token", start_epoch=0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(max_epochs=2, callbacks=[qat]).fit(TinyModule())
    assert "weights 4 bits in groups of 16, activations 8 bits per token, minmax" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):  # trial AS: "activations None bits"
        trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, None, start_epoch=0)]).fit(TinyModule())
    assert "weights 8 bits, activations in float, minmax" in caplog.text
    for group_size, said in [  # trial AW: "in groups of 48" where no layer's input is a multiple of 48
        (32, "weights 4 bits in groups of 32 in 2 of the 3 layers, per channel in the others, activations 8"),
        (64, "weights 4 bits per channel: `group_size`=64 divides no layer's input, activations 8 bits"),
    ]:
        caplog.clear()
        qat = QuantizationAwareTraining(4, 8, group_size=group_size, start_epoch=0)
        with (
            pytest.warns(UserWarning, match="keep per-channel weight scales"),
            caplog.at_level(logging.INFO, logger="lightning.pytorch"),
        ):
            trainer(max_epochs=2, callbacks=[qat]).fit(TinyModule())
        assert said in caplog.text


def test_an_onnx_export_path_leaves_out_validation_inputs_unlike_the_example_and_removes_its_hook_on_failure(tmp_path):
    """Trial BT: validation inputs the exported graph cannot take (images of another size than `example_input_array`,
    padded sequences, uint8 images, a dict example) made `fit` raise at its very end about a `calibration` argument
    never passed; they are left out (none left here: the convolutions stay float, said), and the file is written. A
    fit that failed in a validation left the recording hook on the model, recording later inference inputs."""
    pytest.importorskip("onnxruntime")
    pl.seed_everything(0, verbose=False)
    model = ResidualModule(val_size=10)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "m.onnx")
    with pytest.warns(UserWarning, match=r"2 quantized convolution\(s\) have outputs no quantized layer reads"):
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert (tmp_path / "m.onnx").is_file() and ort_kernels(tmp_path / "m.onnx").get("QLinearConv", 0) < 3

    class FailInValidation(Callback):
        def on_validation_batch_end(self, *args: Any) -> None:
            raise RuntimeError("boom")

    model = ResidualModule()
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "f.onnx")
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=1, export_path=tmp_path / "g.onnx")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=2, callbacks=[qat, pruning, FailInValidation()]).fit(model)
    assert not model._forward_pre_hooks  # the recording hooks went with the failed fit


def test_an_onnx_export_path_under_ddp_records_only_the_inputs_forward_receives(tmp_path):
    """Trial BU: under DDP Lightning reaches `validation_step` by calling the module with `(batch, batch_idx)`; those
    calls were recorded as inputs, took half of the 8 calls, and (before inputs unlike the example were left out)
    made the fit raise at its end. One process with `strategy="ddp"` takes that path."""
    pytest.importorskip("onnxruntime")
    pl.seed_everything(0, verbose=False)
    model = ResidualModule()
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "m.onnx")
    recorded: list[Any] = []
    original = qat._validation_inputs.take

    def take() -> list[Any]:
        recorded.extend(original())
        return list(recorded)

    qat._validation_inputs.take = take  # type: ignore[method-assign]
    environment = dict(os.environ)
    try:
        trainer(max_epochs=2, callbacks=[qat], strategy="ddp").fit(model)
    finally:  # the group's store holds MASTER_PORT, which Lightning left in the environment: a later subprocess's
        if torch.distributed.is_initialized():  # group failed with EADDRINUSE (a CI run)
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert len(recorded) == 6 and all(isinstance(b, torch.Tensor) and b.shape[1:] == (3, 8, 8) for b in recorded)
    assert ort_kernels(tmp_path / "m.onnx").get("QLinearConv") == 3


@pytest.mark.parametrize(("example", "call"), [("tuple", True), ("tensor", "keyword")])
def test_an_onnx_export_path_records_the_forms_lightning_calls_forward_in(tmp_path, example, call):
    """Trial BV: a tuple `example_input_array` (Lightning's positional form) with `self(x)`, or `self(x=x)` with a
    tensor example, recorded nothing, and the warning said no input was like the example."""
    pytest.importorskip("onnxruntime")
    pl.seed_everything(0, verbose=False)
    model = ResidualModule(calls_forward=call)
    if example == "tuple":
        model.example_input_array = (torch.zeros(2, 3, 8, 8),)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*quantized convolution")
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert ort_kernels(tmp_path / "m.onnx").get("QLinearConv") == 3


def test_a_callback_added_on_a_resume_past_its_start_epoch_calibrates_first(tmp_path, caplog):
    """Trial CA: added to a pruning fit resumed at epoch 2 with `start_epoch=0`, it switched on at once, with
    quantizers that had observed nothing, and warned that every layer "never ran its forward" (false: they ran).
    The first epoch it sees calibrates them; quantization switches on at the next."""
    import logging

    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer(max_epochs=4, callbacks=[checkpoint], enable_checkpointing=True).fit(TinyModule())
    model = TinyModule()
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(
            model, ckpt_path=tmp_path / "epoch=1.ckpt"
        )
    assert not [w for w in caught if "never ran their forward" in str(w.message)]
    assert "epoch 2 calibrates them, fake quantization from epoch 3 on" in caplog.text
    assert "fake quantization on for 3 layers (weights 8 bits, activations 8 bits, minmax) from epoch 3" in caplog.text
    assert all(q.fake_quant_enabled and (q.initialized or q.role == "weight") for _, q in quantizers(model))


def test_layers_already_quantizing_before_the_fit_are_said_to_ignore_start_epoch(tiny):
    """Trial CT: a `fast_dev_run` smoke test left the model fake-quantized with one batch's ranges, and the next fit's
    `start_epoch=3` quantized from its first step, said nowhere."""
    trainer(fast_dev_run=True, callbacks=[QuantizationAwareTraining()]).fit(tiny)
    assert active(tiny)
    with pytest.warns(
        UserWarning, match=r"\['net.0', 'net.2', 'net.4'\] already fake-quantize .*not from `start_epoch`=3"
    ):
        trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(start_epoch=3)]).fit(tiny)
    smoked = TinyModule()  # trial EA: the default `start_epoch=0` calibrates in the first epoch, and was not warned
    trainer(fast_dev_run=True, callbacks=[QuantizationAwareTraining()]).fit(smoked)
    with pytest.warns(UserWarning, match=r"already fake-quantize .*not from `start_epoch`=0 .* a fresh instance\.$"):
        trainer(max_epochs=2, callbacks=[QuantizationAwareTraining()]).fit(smoked)
    pl.seed_everything(0, verbose=False)
    fresh = TinyModule()
    with warnings.catch_warnings():  # a fresh model follows the schedule: nothing to say
        warnings.filterwarnings("error", message=".*already fake-quantize")
        trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(start_epoch=3)]).fit(fresh)


@pytest.mark.parametrize(
    ("group_size", "scale", "freeze"), [(None, "minmax", None), (16, "minmax", None), (None, "minmax", 2)]
)
def test_quantization_switched_on_at_the_end_of_fit_reads_the_final_weights(group_size, scale, freeze):
    """Trial DE: with `start_epoch` the last epoch, the returned model quantized its final weights with the scales of
    the batch before the last optimizer step (a Llama: 55.48 perplexity against 54.73 quantized by hand)."""
    torch.manual_seed(0)
    model = TinyModule(optimizer="adam")
    # trial DI: a freeze epoch after the last one froze the ranges at the switch-on, before any re-read
    qat = QuantizationAwareTraining(4, None, scale, group_size=group_size, start_epoch=1, freeze_observers_epoch=freeze)
    trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert all(q.observer_enabled for _, q in quantizers(model) if q.role == "weight")
    by_hand = copy.deepcopy(model.net)
    convert_to_float(by_hand)
    convert_to_qat(by_hand, QuantConfig(4, None, scale, group_size=group_size))
    enable_fake_quant(by_hand)
    x = make_blobs(16).tensors[0]
    with torch.no_grad():
        by_hand.to(TEST_DEVICE).eval()(x.to(TEST_DEVICE))  # the scales read where the fit read them
        assert torch.equal(model.net.eval()(x), by_hand.cpu()(x))


@pytest.mark.parametrize("scale", ["minmax", "power_of_two"])
def test_ranges_frozen_at_the_end_of_an_epoch_are_those_of_its_final_weights(scale):
    """Trial DK: `freeze_observers_epoch` froze the weight ranges the epoch's last forward observed, one optimizer
    step before its end: with it equal to `start_epoch` at the end of fit, the final weights were quantized with
    scales 4-9% off theirs."""
    torch.manual_seed(0)
    model = TinyModule(optimizer="adam")
    qat = QuantizationAwareTraining(4, None, scale, start_epoch=1, freeze_observers_epoch=1)
    trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert not any(q.observer_enabled for _, q in quantizers(model))
    by_hand = copy.deepcopy(model.net)
    convert_to_float(by_hand)
    convert_to_qat(by_hand, QuantConfig(4, None, scale))
    enable_fake_quant(by_hand)
    x = make_blobs(16).tensors[0]
    with torch.no_grad():
        by_hand.to(TEST_DEVICE).eval()(x.to(TEST_DEVICE))  # the scales read where the fit read them
        assert torch.equal(model.net.eval()(x), by_hand.cpu()(x))


def test_a_weight_whose_group_scale_overflows_is_said_when_quantization_switches_on():
    """Trial DF: a weight of 1e6 overflowed its float16 group scale and the fit trained to NaN from the switch on,
    in silence."""
    torch.manual_seed(0)
    model = TinyModule()
    with torch.no_grad():
        model.net[0].weight[0, 0] = 1e6
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=None, group_size=16, start_epoch=0)
    with pytest.warns(UserWarning, match=r"the weights of \['net.0'.* give NaN or infinite scales"):
        trainer(max_epochs=2, callbacks=[qat], limit_train_batches=2, limit_val_batches=1).fit(model)


def test_ranges_frozen_at_the_calibration_epoch_stay_frozen_when_quantization_switches_on():
    """Trial DH: `freeze_observers_epoch` equal to `start_epoch` froze the ranges, then switching quantization on
    turned the weight observers back on (they moved for one more epoch, or left the fit on)."""
    torch.manual_seed(0)
    model = TinyModule(optimizer="adam")
    qat = QuantizationAwareTraining(8, 8, start_epoch=1, freeze_observers_epoch=1)
    trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert all(not q.observer_enabled for _, q in quantizers(model)) and any(
        q.fake_quant_enabled for _, q in quantizers(model)
    )
    torch.manual_seed(0)
    model = TinyModule(optimizer="adam")
    scales = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            scales.append(pl_module.net[0].weight_fake_quant.scale.clone())

    qat = QuantizationAwareTraining(8, 8, start_epoch=0, freeze_observers_epoch=0)
    trainer(max_epochs=3, callbacks=[qat, Record()]).fit(model)
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[1], scales[2])  # as epoch 0 froze them


class TiedLM(pl.LightningModule):
    """A token model whose output head is tied to its embedding (as GPT-2's): predicts the next token id."""

    def __init__(self, vocab: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.emb(ids))))

    def _loss(self, batch: Any) -> torch.Tensor:
        (ids,) = batch
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), ((ids + 1) % self.vocab).flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-2)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, self.vocab, (64, 8), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        ids = torch.randint(0, self.vocab, (32, 8), generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(ids), batch_size=16)


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_a_tied_embedding_and_head_train_with_one_weight_quantizer_and_reload(tmp_path, scale):
    """Quantizing a tied embedding left its output head float (QAT converted one layer per weight): the head, the
    largest matrix product of a small language model, ran in float in PyTorch and in ONNX. Both now train on one
    weight quantizer, and a checkpoint loads back into a fresh model (through the Trainer or `load_qat_checkpoint`)
    with the tie and the shared quantizer."""
    pl.seed_everything(0, verbose=False)
    model = TiedLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    search = scale == "power_of_two"
    qat = QuantizationAwareTraining(8, 8, scale=scale, start_epoch=0, include=["emb", "*"], shift_search=search)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(tied|float).*")  # nothing tied is left float, nor said to be
        trainer(max_epochs=6, callbacks=[qat, ckpt], enable_checkpointing=True).fit(model)
    assert isinstance(model.head, QATLinear) and model.head.weight_fake_quant is model.emb.weight_fake_quant
    assert model.head.weight is model.emb.weight and all(active(model))
    assert model.trainer.callback_metrics["val_loss"] < 3.0  # ln(48) = 3.87 at chance
    if scale == "power_of_two":  # searched per layer: both report the shift the shared quantizer kept
        logged = model.trainer.callback_metrics
        assert logged["compress/shift/emb/weight"] == logged["compress/shift/head/weight"]
        assert int(logged["compress/shift/head/weight"]) == int(model.emb.weight_fake_quant.shift)
    ids = torch.randint(0, 48, (4, 8))
    with torch.no_grad():
        want = model.eval()(ids)
    loaded = load_qat_checkpoint(TiedLM, tmp_path / "last.ckpt").eval()
    assert loaded.head.weight is loaded.emb.weight
    assert loaded.head.weight_fake_quant is loaded.emb.weight_fake_quant
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)
    fresh = TiedLM()
    trainer(callbacks=[QuantizationAwareTraining(8, 8, scale=scale)]).validate(
        fresh, ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert fresh.head.weight_fake_quant is fresh.emb.weight_fake_quant
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), want)


def test_a_learned_scale_shared_by_tied_layers_joins_the_optimizer_once(tmp_path):
    """Trial DS: with the optimizer built over the Parameters that require grad (the learned scales do not until
    quantization switches on), the callback added the tied layers' shared scale once per layer: 4 times in T5, so
    AdamW stepped it 4 times per step, and PyTorch warned of duplicate parameters."""

    class Filtered(TiedLM):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2)

    pl.seed_everything(0, verbose=False)
    model = Filtered()
    qat = QuantizationAwareTraining(8, 8, scale="learned", start_epoch=0, include=["emb", "*"])
    fit = trainer(max_epochs=2, callbacks=[qat], limit_train_batches=3)
    with pytest.warns(UserWarning, match=r"QuantizationAwareTraining: 4 learned scales were not in the optimizer"):
        fit.fit(model)  # the shared weight scale, mix's weight scale, mix's and the head's input scales (5 before)
    optimizer = fit.optimizers[0]
    added = optimizer.param_groups[-1]["params"]
    shared = model.head.weight_fake_quant.scale
    assert len(added) == len({id(p) for p in added}) and sum(p is shared for p in added) == 1
    alone = model.head.input_fake_quant.scale  # one layer's: stepped once per optimizer step
    assert float(optimizer.state[shared]["step"]) == float(optimizer.state[alone]["step"]) > 0


def test_shift_search_says_nothing_of_a_tied_layer_its_partners_searched():
    """Trial DS: T5's `shared` embedding, never called (its encoder's and decoder's embeddings use its weight), was
    said to be missed by validation, with the advice to `exclude` it, which would leave the whole tie float; its only
    quantizer, the shared weight's, was searched through the layers that validation calls."""

    class SpareTable(TiedLM):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(self.vocab, 16)  # holds the weight, never called
            self.shared.weight = self.emb.weight

    pl.seed_everything(0, verbose=False)
    model = SpareTable()
    qat = QuantizationAwareTraining(8, 8, "power_of_two", start_epoch=0, include=["emb", "*"], shift_search=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*validation never calls.*")
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
    assert model.shared.weight_fake_quant is model.head.weight_fake_quant
    assert int(model.shared.weight_fake_quant.shift) == int(
        model.trainer.callback_metrics["compress/shift/head/weight"]
    )


def test_resuming_a_checkpoint_whose_tied_head_was_left_float_says_why(tmp_path):
    """A fit saved before tied layers shared a quantizer quantized the embedding and left its tied head float; this
    version converts both, so the resumed layers differ. It was refused with the advice to pass the run's
    `include`/`exclude`, which cannot help: the refusal says what happened and that `load_qat_checkpoint` loads it."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, include=["emb", "*"])
    trainer(max_epochs=1, callbacks=[qat, ckpt], enable_checkpointing=True).fit(TiedLM())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)  # as an earlier version wrote it: the head float
    saved["state_dict"] = {
        k: v for k, v in saved["state_dict"].items() if not k.startswith("head.") or k == "head.weight"
    }
    for state in saved["callbacks"].values():
        if "layers" in state:
            state["layers"] = [n for n in state["layers"] if n != "head"]
    torch.save(saved, tmp_path / "old.ckpt")
    resumed = QuantizationAwareTraining(8, 8, start_epoch=0, include=["emb", "*"])
    with pytest.raises(
        ValueError, match=r"leaves \['head'\] float, tied to a layer it quantizes: it was written before"
    ):
        trainer(max_epochs=2, callbacks=[resumed]).fit(TiedLM(), ckpt_path=tmp_path / "old.ckpt")
    loaded = load_qat_checkpoint(TiedLM, tmp_path / "old.ckpt")
    assert type(loaded.head) is nn.Linear and loaded.head.weight is loaded.emb.weight


_INT4_PER_TOKEN = dict(weight_bits=4, group_size=16, activation_bits=8, activation_granularity="per_token")


@pytest.mark.parametrize(
    "config",
    [dict(scale="minmax"), dict(scale="power_of_two"), dict(scale="learned"), _INT4_PER_TOKEN],
    ids=["minmax", "power_of_two", "learned", "int4-groups-per-token"],
)
def test_a_float16_model_with_pruned_neurons_quantizes_without_nan(config):
    """`precision="16-true"` holds the quantizers' scales in float16, where float32's smallest scale rounds to 0: the
    all-zero rows of pruned neurons got scale 0, 0/0 made the fit's loss NaN (minmax and learned scales), and pruning
    with QAT in float16 ended with NaN weights. A scale is never below the smallest its dtype holds now."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    with torch.no_grad():
        model.net[0].weight[:4] = 0  # four pruned neurons
    qat = QuantizationAwareTraining(**({"weight_bits": 8, "activation_bits": 8} | config), start_epoch=0)
    fit = trainer(max_epochs=2, precision="16-true", callbacks=[qat])
    fit.fit(model)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))
    assert all(bool((q.effective_scale() > 0).all()) for _, q in quantizers(model))


@pytest.mark.parametrize("config", [dict(scale="learned"), _INT4_PER_TOKEN], ids=["learned", "int4-groups-per-token"])
def test_quantization_aware_training_under_fp16_mixed_precision_with_a_grad_scaler_that_overflows(config):
    """`precision="16-mixed"` on a GPU: the GradScaler skips the steps whose gradients overflowed (learned scales'
    gradients included). Here on the CPU, with a GradScaler that starts too high and grows every 3 steps."""
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    qat = QuantizationAwareTraining(**({"weight_bits": 8, "activation_bits": 8} | config), start_epoch=0)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    fit = trainer(max_epochs=3, callbacks=[qat], plugins=[amp], accelerator="cpu")
    fit.fit(model)
    assert scaler.get_scale() < 2.0**24  # steps overflowed
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))


class _Normalizer:
    """An object kept in the hyperparameters, as pytorch-forecasting keeps its target normalizer."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale


class _WithAnObjectInItsHyperparameters(TinyModule):
    def __init__(self, normalizer: _Normalizer | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_a_checkpoint_the_safe_loader_refuses_is_converted_with_its_settings_when_the_trainer_reads_it(tmp_path):
    """Trial FF: the settings of a pytorch-forecasting checkpoint (objects in its hyperparameters) were not read with
    `weights_only=True`, and the warning said it recorded none; trial GE: with the Trainer's `weights_only=False` they
    were still not read, and chemprop's 4-bit checkpoint was evaluated with the callback's 8 bits. Lightning has read
    the file by then: its settings are read the same way."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="objects")
    model = _WithAnObjectInItsHyperparameters(_Normalizer(2.0))
    callbacks = [QuantizationAwareTraining(weight_bits=4, start_epoch=0), ckpt]
    trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True).fit(model)
    fresh = _WithAnObjectInItsHyperparameters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[QuantizationAwareTraining()]).validate(
            fresh, ckpt_path=tmp_path / "objects.ckpt", verbose=False, weights_only=False
        )
    said = [str(w.message) for w in caught]
    assert not any("could not be read" in m for m in said)
    assert any("the checkpoint was quantized with QuantConfig(weight_bits=4" in m for m in said)
    assert {layer.weight_fake_quant.bits for _, layer in qat_modules(fresh)} == {4}


def test_load_qat_checkpoint_reads_a_trusted_checkpoint_with_objects_only_when_told(tmp_path):
    """Trial FF: `load_qat_checkpoint` read every file with `weights_only=True`, so a pytorch-forecasting checkpoint
    (objects in its hyperparameters) could not be loaded at all, with pickle's error; the safe loader stays the
    default, its refusal says how to read a trusted file, and `weights_only=False` loads it."""
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="objects")
    model = _WithAnObjectInItsHyperparameters(_Normalizer(2.0))
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(start_epoch=0), ckpt], enable_checkpointing=True).fit(
        model
    )
    path = tmp_path / "objects.ckpt"
    with pytest.raises(ValueError, match=r"cannot be read by torch\.load\(weights_only=True\).*`weights_only=False`"):
        load_qat_checkpoint(_WithAnObjectInItsHyperparameters, path)
    with pytest.raises(TypeError, match="`weights_only` must be a bool"):
        load_qat_checkpoint(_WithAnObjectInItsHyperparameters, path, weights_only="no")
    loaded = load_qat_checkpoint(_WithAnObjectInItsHyperparameters, path, weights_only=False)
    assert loaded.hparams.normalizer.scale == 2.0
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert all(active(loaded)) and not loaded.training
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())
    # trial GE: chemprop's `load_from_checkpoint` passes `weights_only=False` itself (a raw TypeError of two values)
    loaded = load_qat_checkpoint(_LoadsWithoutTheSafeLoader, path, weights_only=False)
    assert all(active(loaded)) and all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


class _LoadsWithoutTheSafeLoader(_WithAnObjectInItsHyperparameters):
    """As chemprop's `MPNN`: its `load_from_checkpoint` passes `weights_only=False` to Lightning's itself."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, **{"weights_only": False}, **kwargs
        )
