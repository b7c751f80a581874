"""Both callbacks together with the rest of Lightning: precision, compile, manual optimization, repeated fits."""

from __future__ import annotations

import gc
import logging
import os
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import CompressionMonitor, IterativePruning, QuantizationAwareTraining, compact, sparsity
from lightning_compress.core.controller import GuardDecision
from lightning_compress.core.qat import QuantConfig, convert_to_qat, enable_fake_quant, qat_modules, quantizers
from tests.conftest import TinyModule, make_blobs, trainer


def both(end_epoch: int = 2, qat_start: int = 2) -> list[Callback]:
    return [
        IterativePruning(0.7, start_epoch=0, end_epoch=end_epoch),
        QuantizationAwareTraining(8, 8, start_epoch=qat_start),
    ]


def masks_hold(model: nn.Module, pruning: IterativePruning) -> bool:
    return all(bool((model.get_parameter(name)[~mask] == 0).all()) for name, mask in pruning.masks.items())


def quantizing(model: nn.Module) -> bool:
    return all(q.fake_quant_enabled for _, q in quantizers(model))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_precision_and_gradient_accumulation(precision, accumulate):
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    callbacks = both()
    trainer(max_epochs=4, callbacks=callbacks, precision=precision, accumulate_grad_batches=accumulate).fit(model)
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3)
    assert masks_hold(model, callbacks[0]) and quantizing(model)


class Manual(TinyModule):
    """Manual optimization with two optimizers over different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net[0].parameters(), lr=0.05, momentum=0.9)
        rest = torch.optim.Adam([*self.net[2].parameters(), *self.net[4].parameters()], lr=0.01)
        return [first, rest]

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        first.zero_grad()
        rest.zero_grad()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        first.step()
        rest.step()
        return loss


def test_max_steps_under_manual_optimization_with_two_optimizers_is_said_to_count_both():
    # a trial: the setup checks passed `max_steps` against batches, and the fit ended at 0.815 of 0.9
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=10, max_steps=60, callbacks=both(end_epoch=5, qat_start=5)).fit(Manual())
    said = [str(w.message) for w in caught if "under manual optimization" in str(w.message)]
    assert len(said) == 2 and all("`max_steps`=60 counts the steps of all 2 optimizers" in m for m in said)
    assert said[0].startswith("IterativePruning") and said[1].startswith("QuantizationAwareTraining")
    with warnings.catch_warnings(record=True) as caught:  # trial CT: 30 batches hold the 2 and 3 epochs they need
        warnings.simplefilter("always")
        trainer(max_epochs=10, max_steps=60, callbacks=both()).fit(Manual())
    assert not [w for w in caught if "under manual optimization" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # one optimizer: nothing to say
        warnings.simplefilter("always")
        trainer(max_epochs=10, max_steps=60, callbacks=both()).fit(TinyModule())
    assert not [w for w in caught if "under manual optimization" in str(w.message)]


def test_manual_optimization_with_two_optimizers():
    pl.seed_everything(0, verbose=False)
    model = Manual()
    callbacks = both()
    t = trainer(max_epochs=4, callbacks=callbacks)
    t.fit(model)
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3)
    assert masks_hold(model, callbacks[0]) and quantizing(model)
    for optimizer in t.optimizers:  # neither optimizer keeps momentum for pruned weights
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = next(n for n, p in model.named_parameters() if p is param)
                mask = callbacks[0].masks.get(name)
                if mask is None:
                    continue
                for value in optimizer.state[param].values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        assert (value[~mask] == 0).all()


def test_manual_optimization_with_two_optimizers_keeps_the_epoch_window():
    """global_step counts both optimizers' steps: the window ran twice as fast, pruning an epoch before
    `start_epoch` and reaching the target two epochs early (found by a new-user trial)."""

    class Track(pl.Callback):
        def __init__(self) -> None:
            self.sparsity: list[float] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.sparsity.append(sparsity(pl_module))

    pl.seed_everything(0, verbose=False)
    track = Track()
    trainer(max_epochs=4, callbacks=[IterativePruning(0.8, start_epoch=2, end_epoch=4), track]).fit(Manual())
    assert track.sparsity[:2] == [0.0, 0.0] and 0.0 < track.sparsity[2] < 0.8
    assert track.sparsity[3] == pytest.approx(0.8, abs=1e-3)


def test_compiled_network_does_not_recompile_per_step():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    model.net = torch.compile(model.net)
    graphs: list[int] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, *args):
            graphs.append(int(counters["stats"]["unique_graphs"]))

    pruning = IterativePruning(0.7, start_epoch=0, end_epoch=2, every_n_steps=2)
    qat = QuantizationAwareTraining(8, 8, start_epoch=2)
    trainer(max_epochs=5, callbacks=[pruning, qat, Count()]).fit(model)
    per_epoch = [graphs[i : i + 8] for i in range(0, len(graphs), 8)]
    # pruning events (every 2 steps in epochs 0-1) never recompile; only QAT's on/off switches do, at epoch ends
    assert len(set(per_epoch[0])) == 1 and len(set(per_epoch[1])) == 1
    assert len(set(per_epoch[-1])) == 1  # settled
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("compiled", ["container", "leaf"])
def test_a_compiled_network_exports_to_onnx_at_the_end_of_fit(tmp_path, compiled):
    """Trial AZ: `export_path=".onnx"` failed after training ("FX to torch.jit.trace a dynamo-optimized function"),
    with a hint to replace an operation; the compiled module is exported as the module it compiled. Trial BM: a layer
    compiled by itself was swapped for a QAT layer its compiled forward never called (trained in float, exported in
    int8): it is left float, said, and its export agrees with the model."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    if compiled == "container":
        model.net = torch.compile(model.net)
    else:
        model.net[2] = torch.compile(model.net[2])
    model.example_input_array = torch.randn(2, 16)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "model.onnx")
    if compiled == "leaf":
        with pytest.warns(UserWarning, match=r"leaves \['net.2'\] in float: each is compiled by itself"):
            trainer(max_epochs=2, callbacks=[qat]).fit(model)
        assert type(model.net[2]).__name__ == "OptimizedModule"  # the model is left as it was
        expected_layers = {"net.0.weight", "net.4.weight"}
        for name in ("net.2", "net.2._orig_mod"):  # named exactly: refused with the reason (trial BN)
            with pytest.raises(ValueError, match=rf"`include` selects '{name}', a layer compiled by itself"):
                convert_to_qat(model, QuantConfig(8, 8), include=[name])
    else:
        trainer(max_epochs=2, callbacks=[qat]).fit(model)
        expected_layers = {"net.0.weight", "net.2.weight", "net.4.weight"}
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    x = torch.randn(4, 16)
    model.eval()
    expected = model(x).detach().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() < 0.01
    assert {layer.name for layer in qat.export_report.layers} == expected_layers


class Unlogged(pl.LightningModule):
    """Logs nothing: Lightning's `self.log` fails inside a compiled `training_step` (a dynamo error of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = torch.randn(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_blobs(128, 16, 4), batch_size=32)


@pytest.mark.parametrize("callback", ["pruning", "qat"])
def test_a_compiled_lightning_module_exports_to_onnx_at_the_end_of_fit(tmp_path, callback):
    """Session 23's list: a whole LightningModule compiled and passed to `fit` (Lightning sets a compiled `forward`
    on it) failed to export at fit end ("FX to torch.jit.trace a dynamo-optimized function"), after training. It is
    traced with its own forward; Lightning's compiled one is put back after."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pl.seed_everything(0, verbose=False)
    model = Unlogged()
    if callback == "pruning":
        compressor: Callback = IterativePruning(0.5, start_epoch=0, end_epoch=1, export_path=tmp_path / "m.onnx")
    else:
        compressor = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=tmp_path / "m.onnx")
    trainer(max_epochs=2, callbacks=[compressor], limit_val_batches=0).fit(torch.compile(model))
    assert getattr(vars(model).get("forward"), "__wrapped__", None) is not None  # Lightning's, still in place
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 16)
    expected = model.eval()(x).detach().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() < 0.01


@pytest.mark.parametrize("measure", ["channels", "macs"])
def test_channel_pruning_beside_grouped_qat_prunes_whole_blocks_that_compact_removes(measure, caplog):
    """Trials AW and BC: with the LLM recipe (int4 weights in groups of 32) channels were pruned one by one,
    scattered over the blocks of the layers they feed, and `compact()` removes an input channel of a grouped layer
    only with its whole block: a MACs budget of 50% compacted to 86%. The channels a grouped layer takes now go a
    block at a time, said at train start, and `compact()` removes every pruned channel."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    model.example_input_array = torch.randn(2, 16)
    dense_macs = sum(m.in_features * m.out_features for m in model.net if isinstance(m, nn.Linear))
    caplog.set_level(logging.INFO)
    trainer(
        max_epochs=2,
        callbacks=[
            IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=1, measure=measure),
            QuantizationAwareTraining(4, None, group_size=8, start_epoch=0),
        ],
    ).fit(model)
    assert "['net.2', 'net.4'] quantize their inputs in blocks of [8] (QAT's `group_size`)" in caplog.text
    alive = [int(model.net[i].weight.detach().abs().sum(1).gt(0).sum()) for i in (0, 2)]
    assert all(a % 8 == 0 for a in alive) and max(alive) < 32
    x = torch.randn(5, 16)
    before = model.eval()(x)
    compact(model, x)
    assert [model.net[i].out_features for i in (0, 2)] == alive  # every pruned channel removed
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    macs = sum(m.in_features * m.out_features for m in model.net if isinstance(m, nn.Linear))
    if measure == "macs":
        assert macs <= 0.5 * dense_macs


class Differencing(TinyModule):
    """Its forward uses `torch.diff`, which the ONNX exporter cannot convert (as a `transformers` model building a
    missing attention mask does)."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.randn(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.diff(x, dim=1, prepend=x[:, :1]))


@pytest.mark.parametrize("callback", ["pruning", "qat"])
def test_an_onnx_export_path_the_exporter_cannot_convert_is_refused_before_training(tmp_path, callback):
    """Trial BY: a Llama whose `example_input_array` held no attention mask trained to the end, then failed to
    export. The forward is traced without its weights at setup; a `.lcz` path is not traced."""
    path = tmp_path / "m.onnx"
    compressor = (
        IterativePruning(0.5, start_epoch=0, end_epoch=1, export_path=path)
        if callback == "pruning"
        else QuantizationAwareTraining(8, 8, start_epoch=0, export_path=path)
    )
    model = Differencing()
    fit = trainer(max_epochs=2, callbacks=[compressor])
    with pytest.raises(
        ValueError, match=r"`export_path`='.*m.onnx': export_onnx cannot trace Differencing: .*aten::diff"
    ) as refused:
        fit.fit(model)
    assert "no opset of torch's ONNX exporter converts it" in str(refused.value)  # trial FI: no opset has aten::diff
    assert fit.global_step == 0 and not path.exists()
    assert model.training and all(p.requires_grad for p in model.parameters())  # as it was
    trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(8, 8, export_path=tmp_path / "m.lcz")]).fit(
        Differencing()
    )


class Timestepped(TinyModule):
    """A denoiser's forward: a sample and its timestep, given as a 0-d tensor in the example."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = (torch.randn(2, 16), torch.tensor(500.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x if t is None else x + t / 1000)


def test_an_onnx_export_path_with_a_zero_dimensional_input_is_refused_before_training(tmp_path):
    """Trial ES: a diffusion UNet's `example_input_array` held its timestep as `torch.tensor(500)`; the setup trace
    passed, the whole fit ran, then the export failed ('Dynamic shape axis should be no more than the shape
    dimension'), blamed on an operation of the forward."""
    path = tmp_path / "m.onnx"
    fit = trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=0, export_path=path)])
    with pytest.raises(
        ValueError, match=r"`example_input_array` holds 0-d tensors \(\[.input_1.\]\).*`t.expand\(batch\)`"
    ):
        fit.fit(Timestepped())
    assert fit.global_step == 0 and not path.exists()


def test_a_target_whole_quantization_groups_cannot_reach_is_said_to_be_held_by_them():
    """Trial CA: 64 hidden channels in two groups of 32 of the next layer, target 0.75: one group can go, every event
    ran, and the note said "the last events could not run"."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule(hidden=64)
    model.example_input_array = torch.randn(2, 16)
    callbacks = [
        IterativePruning(0.75, granularity="channel", end_epoch=2, include=["net.0"]),
        QuantizationAwareTraining(4, None, group_size=32, start_epoch=0, include=["net.2"]),
    ]
    said = r"=0.75: the channel groups \['net.0'\] are at their floors .*whole quantization groups where a layer"
    with pytest.warns(UserWarning, match=said):
        trainer(max_epochs=3, callbacks=callbacks).fit(model)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_twenty_fits_with_the_same_callbacks_do_not_grow_memory():
    callbacks = both(end_epoch=1, qat_start=1)
    sizes = []
    for i in range(20):
        pl.seed_everything(i, verbose=False)
        model = TinyModule()
        trainer(max_epochs=2, callbacks=callbacks).fit(model)
        assert sparsity(model) == pytest.approx(0.7, abs=1e-3)
        del model
        gc.collect()
        sizes.append(_rss_bytes())
    assert sizes[-1] < sizes[4] * 1.05  # after warm-up, under 5% growth over 15 more fits


@pytest.mark.parametrize(
    "callback,match",
    [
        (IterativePruning(0.5), "does not support FSDPStrategy: it flattens or wraps the parameters"),
        (QuantizationAwareTraining(), r"Use strategy='ddp', a single device or FSDP2 \(ModelParallelStrategy"),
    ],
)
@pytest.mark.parametrize("kind", ["fsdp1", "deepspeed"])
def test_fsdp1_is_refused_at_setup_naming_fsdp2(callback, match, kind):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # FSDP1 needs a GPU and DeepSpeed its package (not installed here): an instance of the class is what setup checks
    strategy = FSDPStrategy() if kind == "fsdp1" else object.__new__(DeepSpeedStrategy)
    fake_trainer = SimpleNamespace(strategy=strategy, max_epochs=2)
    match = match if kind == "fsdp1" else match.replace("FSDPStrategy", "DeepSpeedStrategy")
    with pytest.raises(ValueError, match=match):
        callback.setup(fake_trainer, model, "fit")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_export_copy_taken_at_setup_under_fsdp2_holds_no_weights_and_refers_to_data_sets():
    """What exporting from shards needs is taken at `setup`: the module's structure with meta weights. A data set
    the module holds is referred to, not copied (it may be large); nothing is taken when nothing needs it."""
    from pathlib import Path
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import TensorDataset

    from lightning_compress.callbacks._export import export_template

    model = TinyModule()
    model.data = TensorDataset(torch.randn(1000, 16))
    fsdp2 = SimpleNamespace(strategy=ModelParallelStrategy())
    template = export_template(fsdp2, model, Path("m.onnx"))
    assert template is not None and template.data is model.data
    assert all(p.is_meta for p in template.parameters()) and template.net is not model.net
    assert not any(p.is_meta for p in model.parameters())
    assert export_template(fsdp2, model, Path("m.lcz")) is None  # gathered and written as it is
    assert export_template(fsdp2, model, Path("m.lcz"), compacted=True) is not None
    assert export_template(SimpleNamespace(strategy=None), model, Path("m.onnx")) is None  # not sharded


def test_example_inputs_go_where_the_weights_are_not_where_lightning_says_the_module_is_at_setup():
    """At `setup` Lightning sets every module's `device` to the accelerator's before it moves the weights there: on a
    GPU, channel pruning traced CPU weights with CUDA inputs and every `.onnx` `export_path` was refused (session 35,
    the first run of benchmarks/gpu_check.sh). The meta device stands in for the GPU here, set as Lightning sets it."""
    from lightning_compress.callbacks._export import example_inputs

    model = TinyModule()
    model.example_input_array = torch.zeros(2, 16)
    for module in model.modules():
        if isinstance(module, pl.LightningModule):
            module._device = torch.device("meta")  # lightning/pytorch/trainer/call.py, `_call_setup_hook`
    assert model.device.type == "meta"
    assert example_inputs(model).device.type == "cpu"


@pytest.mark.parametrize("order", ["qat-first", "pruning-first"])
def test_auto_importance_sees_the_batchnorm_whatever_converts_the_layers_first(order):
    """QAT converts its layers at setup, before the pruner is built: the BatchNorm after a QAT layer still makes
    "auto" score with LAMP (it fell back to magnitude: the BN CNN's file runs pruned as before)."""
    from lightning_compress.core.importance import LampImportance
    from lightning_compress.demo import DigitsClassifier, DigitsCNN, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=1)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0)
    callbacks = [qat, pruning] if order == "qat-first" else [pruning, qat]
    model = DigitsClassifier(DigitsCNN(4))
    trainer(max_epochs=2, limit_train_batches=4, callbacks=callbacks).fit(model, DigitsDataModule(seed=0))
    assert isinstance(pruning.pruner.rule.importance, LampImportance)
    assert sparsity(model) == pytest.approx(0.5, abs=1e-2)


class ScoredBySparsity(TinyModule):
    """`val_score` = 1 - sparsity: with a tight `max_drop` every pruning event is rolled back."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_score", 1.0 - sparsity(self))


def digest(model: nn.Module) -> bytes:
    return b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values())


class Digests(Callback):
    """The model each validation scores."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def on_validation_start(self, trainer, pl_module):
        self.seen.append(digest(pl_module))


@pytest.mark.parametrize("cadence", [{}, {"every_n_epochs": 1}], ids=["steps", "epochs"])
@pytest.mark.parametrize("qat_first", [False, True])
def test_no_event_runs_between_the_switch_to_fake_quantization_and_a_validation_of_the_quantized_model(
    cadence, qat_first
):
    """An event in the epoch QAT switched on was judged against the guard's copy of the float model: its rollback
    could not give that model back, and `fit` returned one no validation scored (trial AV: 0.7067 against a baseline
    of 0.9667 with `max_drop`=0.01). Events now wait until a validation has scored the model quantized, whichever
    callback comes first, and every rollback gives back a model a validation scored."""
    pl.seed_everything(0, verbose=False)
    model = ScoredBySparsity()
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=4, monitor="val_score", max_drop=1e-4, **cadence)
    qat = QuantizationAwareTraining(8, 8, start_epoch=1)  # calibrates in epoch 1, quantizes from epoch 2
    seen = Digests()
    callbacks = [qat, pruning] if qat_first else [pruning, qat]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=5, callbacks=[*callbacks, seen]).fit(model)
    assert not [w for w in caught if "no validation scored" in str(w.message) or "no validation has" in str(w.message)]
    actions = [d.action for d in pruning.decisions]
    assert actions[0] == "baseline" and actions.count("rollback") >= 2
    assert len(actions) == 4  # epoch 2's validation judged no event: it scored the model quantized
    assert all(q.fake_quant_enabled for _, q in quantizers(model))
    assert digest(model) in seen.seen


def test_a_fit_resumed_before_the_switch_to_fake_quantization_waits_as_the_uninterrupted_one(tmp_path):
    """Trial AX: resumed from the checkpoint of QAT's calibration epoch, the epoch event ran at train start, before
    QAT switched on there, and the next validation judged event and switch together (the uninterrupted run judges
    the quantized model alone first). The resumed run now takes the uninterrupted run's decisions."""

    def fit(ckpt_path=None, callbacks=()):
        pl.seed_everything(0, verbose=False)
        pruning = IterativePruning(0.8, start_epoch=0, end_epoch=4, monitor="val_acc", max_drop=1.0, every_n_epochs=1)
        trainer(
            max_epochs=5,
            callbacks=[pruning, QuantizationAwareTraining(8, 8, start_epoch=1), *callbacks],
            enable_checkpointing=bool(callbacks),
        ).fit(TinyModule(), ckpt_path=ckpt_path)
        return [(d.action, d.value) for d in pruning.decisions]

    whole = fit(callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")])
    assert [a for a, _ in whole] == ["baseline", "accept", "accept", "accept"]  # epoch 2's validation: no event
    assert fit(tmp_path / "epoch=1.ckpt") == whole  # the two taken before the checkpoint come back with it


class QuantizationCosts(TinyModule):
    """`val_score` is 1 in float and 0.7 while the layers fake-quantize, whatever is pruned."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        quantizing = any(q.fake_quant_enabled for _, q in quantizers(self))
        self.log("val_score", 0.7 if quantizing else 1.0)


def test_quantization_that_alone_costs_more_than_max_drop_is_said():
    """Trial AX: QAT alone cost 0.23 against `max_drop`=0.01; every later event was rolled back to the first
    quantized model, and the fit only said it ended short of its target."""
    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=4, monitor="val_score", max_drop=0.1, every_n_epochs=1)
    match = r"with quantization switched on the model scores 0.7000, 0.3000 from the baseline 1.0000 before any new"
    with pytest.warns(UserWarning, match=match):
        trainer(max_epochs=5, callbacks=[pruning, QuantizationAwareTraining(8, 8, start_epoch=1)]).fit(
            QuantizationCosts()
        )
    assert [d.action for d in pruning.decisions] == ["baseline", "accept", "rollback", "rollback"]


class SwitchOnMidEpoch(Callback):
    """A user's own switch to fake quantization in the middle of epoch 1, after that epoch's pruning events."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            enable_fake_quant(pl_module)


class QuantizedScoredBySparsity(ScoredBySparsity):
    def __init__(self) -> None:
        super().__init__()
        convert_to_qat(self.net, QuantConfig(8, 8))


def test_a_last_rollback_that_cannot_give_back_a_scored_model_is_said_at_the_end_of_fit():
    """Quantization switched on where the guard cannot hold the event back (the user's own hook, mid-epoch): the
    rollback keeps the quantizers as they are (not the copy's, off with a scale of 1, under layers that quantize:
    every weight rounded to 0), says so at once, and, as the last validation's, again when fit ends."""
    pl.seed_everything(0, verbose=False)
    model = QuantizedScoredBySparsity()
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=1, monitor="val_score", max_drop=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, callbacks=[pruning, SwitchOnMidEpoch()]).fit(model)
    said = [str(w.message) for w in caught]
    assert [d.action for d in pruning.decisions] == ["baseline", "rollback"]
    assert any("the rollback left a model no validation scored" in m for m in said)
    assert any("no validation has scored the model `fit` returns" in m for m in said)
    model.eval()  # a weight quantizer in training mode would take its scale from the weight again
    for layer in (model.net[0], model.net[2]):
        weight = layer.weight.detach()
        assert layer.weight_fake_quant.fake_quant_enabled
        assert float((layer.weight_fake_quant(weight) - weight).abs().max()) < float(weight.abs().max()) / 100


def test_a_rollback_under_quantization_returns_the_quantizers_too_and_checkpoints_score_what_they_hold(tmp_path):
    """With quantization on before the event and after, the guard's copy now holds the quantizers' ranges and
    scales too: the model rolled back to is exactly the one its validation scored, so each checkpoint re-validates
    to the score it recorded."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.callbacks.test_pruning import ScoredBySparsity

    pl.seed_everything(0, verbose=False)
    model = ScoredBySparsity()
    pruning = IterativePruning(0.5, start_epoch=2, end_epoch=5, monitor="val_score", max_drop=1e-4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    qat = QuantizationAwareTraining(4, 8, start_epoch=0)  # on from epoch 1, events from the end of epoch 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=5, callbacks=[pruning, qat, ckpt], enable_checkpointing=True).fit(model)
    assert "rollback" in [d.action for d in pruning.decisions]
    assert not [w for w in caught if "no validation scored" in str(w.message)]
    for path, recorded in ckpt.best_k_models.items():
        rescored = trainer(callbacks=[QuantizationAwareTraining(4, 8)]).validate(
            ScoredBySparsity(), ckpt_path=path, verbose=False
        )[0]["val_loss"]
        assert rescored == pytest.approx(float(recorded), rel=1e-6), path


def test_a_rollback_while_quantizers_only_observe_is_exact_and_checkpoints_score_what_they_hold(tmp_path):
    """In QAT's calibration epoch the observers run and fake quantization is off: the model computes as the float
    one the guard copied, so the rollback is exact (a trial: it was called inexact, and the checkpoint recorded the
    rejected model's score, 0.4778, for a model that re-validates to 0.6963)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.callbacks.test_pruning import ScoredBySparsity

    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=3, monitor="val_score", max_drop=1e-4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    qat = QuantizationAwareTraining(8, 8, start_epoch=2)  # observing through epoch 2, quantizing after it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=3, callbacks=[pruning, qat, ckpt], enable_checkpointing=True).fit(ScoredBySparsity())
    assert "rollback" in [d.action for d in pruning.decisions]
    assert not [w for w in caught if "no validation scored" in str(w.message)]
    for path, recorded in ckpt.best_k_models.items():
        rescored = trainer(callbacks=[QuantizationAwareTraining(8, 8)]).validate(
            ScoredBySparsity(), ckpt_path=path, verbose=False
        )[0]["val_loss"]
        assert rescored == pytest.approx(float(recorded), rel=1e-6), path


class CrashAtEpochEnd(Callback):
    """Dies at the end of `epoch`, before the callbacks after it: as a kill right after the checkpoint saved on
    that epoch's last batch (`ModelCheckpoint(every_n_train_steps=...)` dividing the epoch)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def test_resuming_from_an_epochs_last_batch_runs_that_epochs_event_and_switch(tmp_path):
    """Lightning resumes such a checkpoint at the next epoch without the epoch's end or the next one's start: the
    one-shot pruning event and the switch to fake quantization were lost, and the fit ended dense and float
    (found by a trial)."""

    def callbacks(crash: bool) -> list[Callback]:
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_last=True, save_top_k=-1)
        pruning = IterativePruning(0.7, schedule="one_shot", start_epoch=1, end_epoch=2, every_n_epochs=1)
        qat = QuantizationAwareTraining(8, 8, start_epoch=1)
        return [*([CrashAtEpochEnd(1)] if crash else []), pruning, qat, ckpt]

    pl.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(max_epochs=3, callbacks=callbacks(True), enable_checkpointing=True).fit(TinyModule())
    model = TinyModule()
    trainer(max_epochs=3, callbacks=callbacks(False), enable_checkpointing=True).fit(
        model, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3) and quantizing(model)


@pytest.mark.parametrize(
    ("crash", "pruning", "validation"),
    [(4, {"every_n_steps": 4}, {}), (3, {}, {"check_val_every_n_epoch": 2})],
    ids=["steps", "epochs-validated-every-2"],
)
def test_a_guarded_fit_resumed_from_an_epochs_last_batch_still_reaches_the_target_judged(
    tmp_path, crash, pruning, validation
):
    """Lightning resumes a checkpoint saved on an epoch's last batch without that epoch's validation: the event it
    was to judge waited for the next, every later event one validation later, and the fit ended at 0.787 / 0.641 of
    0.8 (trials CB, CD). The plan counts only validations still ahead, and the next event joins the unjudged one:
    the masks are the uninterrupted fit's."""

    def run(crashing: bool, ckpt_path: str | None, folder: str = "resumed") -> tuple[TinyModule, IterativePruning]:
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=8, save_last=True, save_top_k=-1)
        guard = IterativePruning(0.8, monitor="val_acc", max_drop=0.05, start_epoch=0, end_epoch=6, **pruning)
        model = TinyModule()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(
                max_epochs=6, callbacks=[*([CrashAtEpochEnd(crash)] if crashing else []), guard, ckpt],
                enable_checkpointing=True, **validation,
            ).fit(model, ckpt_path=ckpt_path)  # fmt: skip
        return model, guard

    pl.seed_everything(0, verbose=False)
    _, uninterrupted = run(False, None, "uninterrupted")
    pl.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="killed"):
        run(True, None)
    model, guard = run(False, str(tmp_path / "resumed" / "last.ckpt"))
    assert sparsity(model) == pytest.approx(0.8, abs=1e-3)
    assert guard.decisions[-1].action == "accept" and not guard.pruner.guard.awaiting_check
    assert all(torch.equal(guard.masks[k], uninterrupted.masks[k]) for k in uninterrupted.masks)


def _resume_after_crash(tmp_path, crash: int, callbacks, max_epochs: int = 6, edit=None):
    """Fit until the end of epoch ``crash`` (its last batch's checkpoint is the last one), then resume it (after
    ``edit(checkpoint)``, when given); returns the resumed model, its callbacks and the warnings."""

    def fit(crashing: bool, ckpt_path=None):
        model, made = TinyModule(), callbacks()
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_last=True, save_top_k=-1)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            trainer(
                max_epochs=max_epochs, callbacks=[*([CrashAtEpochEnd(crash)] if crashing else []), *made, ckpt],
                enable_checkpointing=True,
            ).fit(model, ckpt_path=ckpt_path)  # fmt: skip
        return model, made, [str(w.message) for w in said]

    pl.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="killed"):
        fit(True)
    if edit is not None:
        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
        edit(checkpoint)
        torch.save(checkpoint, tmp_path / "last.ckpt")
    return fit(False, str(tmp_path / "last.ckpt"))


def test_a_resume_without_the_validation_that_was_to_give_the_baseline_waits_for_the_next_one(tmp_path):
    """Trial CH: the skipped validation was the last before the first event; the resumed guard kept an older
    baseline (0.43 where the skipped validation scored 0.73) and accepted what the uninterrupted fit rolled back."""
    _, (pruning,), _ = _resume_after_crash(
        tmp_path, 1,
        lambda: [IterativePruning(0.8, monitor="val_acc", max_drop=0.05, start_epoch=2, end_epoch=5, every_n_steps=4)],
    )  # fmt: skip
    assert pruning.decisions[0].action == "baseline"  # given by the resumed fit's first validation


def _without_judged_copy(checkpoint):
    """A checkpoint as this library wrote it before it saved the judged model's copy (and as FSDP2 writes it)."""
    for state in checkpoint["callbacks"].values():
        state.pop("judged_copy", None)


def test_a_resume_of_the_fits_last_batch_rolls_back_the_event_no_validation_can_judge(tmp_path):
    """Trial CH: Lightning runs nothing more; the end of fit put back only the pruned weights of the event the
    skipped validation was to judge (0.45 where the checkpoint's model scored 0.75). The checkpoint holds the copy of
    the model the last validation judged now: the fit goes back to it, as an uninterrupted fit ending unjudged does."""
    resumed_from = []
    model, _, said = _resume_after_crash(
        tmp_path, 5, lambda: [IterativePruning(0.8, monitor="val_acc", max_drop=0.05, start_epoch=0, end_epoch=6)],
        edit=resumed_from.append,
    )  # fmt: skip
    state = next(s for k, s in resumed_from[0]["callbacks"].items() if k.startswith("IterativePruning"))
    copy = state["judged_copy"]["snapshot"]["tensors"]
    assert all(torch.equal(copy[k].cpu(), v) for k, v in model.state_dict().items())  # the judged model, exactly
    assert not all(torch.equal(resumed_from[0]["state_dict"][k].cpu(), v) for k, v in model.state_dict().items())
    assert any("the model went back to the one the last validation judged" in m for m in said)


def test_the_guards_decisions_survive_a_resume(tmp_path):
    """Trial DP: a resumed guarded fit listed only the decisions taken after the resume (3 of 7) in `decisions`, its
    masks and guard identical to the uninterrupted fit's."""

    def make():
        return [IterativePruning(0.8, monitor="val_acc", max_drop=0.05, start_epoch=0, end_epoch=6)]

    pl.seed_everything(0, verbose=False)
    model, whole = TinyModule(), make()
    trainer(max_epochs=6, callbacks=whole).fit(model)
    checkpoints = []
    _, resumed, _ = _resume_after_crash(tmp_path, 3, make, edit=checkpoints.append)
    state = next(s for k, s in checkpoints[0]["callbacks"].items() if k.startswith("IterativePruning"))
    saved = [GuardDecision(**d) for d in state["decisions"]]
    assert len(saved) >= 3 and saved == whole[0].decisions[: len(saved)]  # the uninterrupted fit's, so far
    assert resumed[0].decisions[: len(saved)] == saved and len(resumed[0].decisions) > len(saved)


def test_a_resume_of_the_fits_last_batch_without_the_copy_keeps_the_event_and_says_so(tmp_path):
    """Without the copy (a checkpoint written before the copy was saved, or FSDP2's shards), putting back only the
    pruned weights would leave a model trained without them that no validation scores: the event stays, said."""
    model, _, said = _resume_after_crash(
        tmp_path, 5, lambda: [IterativePruning(0.8, monitor="val_acc", max_drop=0.05, start_epoch=0, end_epoch=6)],
        edit=_without_judged_copy,
    )  # fmt: skip
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k].cpu(), v) for k, v in model.state_dict().items())
    assert any("fit ended before a validation judged the last pruning event" in m and "it is kept" in m for m in said)
    assert not any("runs beside it" in m for m in said)


class ResumableLoader(torch.utils.data.DataLoader):
    """A loader Lightning resumes mid-epoch at the batch it stopped at (its `state_dict` counts the batches served)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._served += 1
                yield batch

    def state_dict(self):
        return {"served": self._served}

    def load_state_dict(self, state):
        self._skip = state["served"]


class ResumableScoredBySparsity(ScoredBySparsity):
    def train_dataloader(self):
        return ResumableLoader(make_blobs(self.hparams.n), batch_size=32)


@pytest.mark.parametrize(("step", "cadence"), [(9, {}), (27, {}), (9, {"every_n_steps": 2})])
def test_a_guarded_fit_resumed_mid_epoch_is_the_uninterrupted_fit(tmp_path, step, cadence):
    """Trial CM: the checkpoint held no copy of the model the last validation judged, so a rollback after the resume
    put back only the pruned weights, or (at the fit's last validation) kept the rejected model: 0.32 where the
    uninterrupted fit returned 0.94, its baseline 0.92. The state holds the copy while an event awaits judgement,
    and (trial CN: `every_n_steps`, a checkpoint between a validation and the next event) once the model trained
    after the judged validation."""

    def run(folder: str, ckpt_path: str | None = None) -> tuple[nn.Module, IterativePruning]:
        pl.seed_everything(0, verbose=False)
        model = ResumableScoredBySparsity()
        guard = IterativePruning(0.9, monitor="val_score", max_drop=0.3, start_epoch=0, end_epoch=4, **cadence)
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = trainer(max_epochs=6, callbacks=[guard, ckpt], enable_checkpointing=True)
            fit.fit(model, ckpt_path=ckpt_path)
        # trial CN: the per-epoch value logged from two hooks was the rejected event's after a resume
        assert float(fit.callback_metrics["compress/sparsity"]) == pytest.approx(sparsity(model), abs=1e-6)
        return model, guard

    model, guard = run("uninterrupted")
    path = tmp_path / "uninterrupted" / f"step={step}.ckpt"
    state = next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "IterativePruning" in k)
    assert state["judged_copy"] is not None  # saved after the model moved from the judged one
    resumed, resumed_guard = run("resumed", str(path))
    assert "rollback" in [d.action for d in resumed_guard.decisions]
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items())
    assert [d.action for d in resumed_guard.decisions] == [d.action for d in guard.decisions][
        -len(resumed_guard.decisions) :
    ]


def test_the_decisions_a_checkpoint_was_still_to_log_are_logged_by_the_resumed_fit(tmp_path):
    """Trial CQ: a guarded fit with events between epochs logs a decision at the epoch's end; a checkpoint saved at a
    mid-epoch validation lost it (the resumed fit never logged that rollback). The state holds what is pending."""
    from lightning.pytorch.loggers import CSVLogger

    def run(folder: str, ckpt_path: str | None = None) -> str:
        pl.seed_everything(0, verbose=False)
        guard = IterativePruning(0.9, monitor="val_score", max_drop=0.3, start_epoch=0, end_epoch=4)
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, filename="{step}")  # at each validation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(
                max_epochs=4, callbacks=[guard, ckpt], enable_checkpointing=True, val_check_interval=0.5,
                logger=CSVLogger(tmp_path, name=folder, version=0),
            ).fit(ResumableScoredBySparsity(), ckpt_path=ckpt_path)  # fmt: skip
        return (tmp_path / folder / "version_0" / "metrics.csv").read_text()

    uninterrupted = run("uninterrupted")
    pending = [
        path for path in sorted((tmp_path / "uninterrupted").glob("*.ckpt"))
        if "compress/rollbacks" in next(
            v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "IterativePruning" in k
        )["pending_logs"]
    ]  # fmt: skip
    assert pending  # a checkpoint saved after a mid-epoch rollback, before the epoch's end logged it
    resumed = run("resumed", str(pending[0]))

    def rows(text: str, after: int) -> list[tuple[int, str]]:
        import csv
        import io

        return [
            (int(r["step"]), r["compress/rollbacks"]) for r in csv.DictReader(io.StringIO(text))
            if r.get("compress/rollbacks") and int(r["step"]) > after
        ]  # fmt: skip

    step = int(pending[0].stem.split("=")[1])
    assert rows(resumed, step) == rows(uninterrupted, step) and rows(resumed, step)


@pytest.mark.parametrize("granularity", ["element", "2:4"])
def test_a_fit_resumed_from_its_last_epochs_end_still_runs_the_event_after_it(tmp_path, granularity):
    """Trial CR: the event after the fit's last epoch runs at the end of training, which Lightning skips for a fit
    resumed from that epoch's end checkpoint (no `on_train_start`/`on_train_end`): it ended at 0.5907 of 0.6."""

    def pruning():
        return IterativePruning(0.6 if granularity == "element" else 0.5, granularity=granularity, every_n_epochs=1)

    pl.seed_everything(0, verbose=False)
    uninterrupted = TinyModule()
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer(max_epochs=3, callbacks=[pruning(), saves], enable_checkpointing=True).fit(uninterrupted)
    model = TinyModule()
    trainer(max_epochs=3, callbacks=[pruning()]).fit(model, ckpt_path=tmp_path / "epoch=2.ckpt")
    assert sparsity(model) == pytest.approx(sparsity(uninterrupted), abs=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in uninterrupted.state_dict().items())


def test_a_fit_resumed_from_the_step_max_steps_ended_it_at_mid_epoch_still_runs_the_last_event(tmp_path):
    """Trial FO: `every_n_epochs=1` in a fit `max_steps` ends mid-epoch; the last event runs at the end of training,
    after every checkpoint. Resumed from the checkpoint of that last step (Lightning trains nothing), the fit returned
    0.77 of 0.80 with the uninterrupted fit's last event missing, without a word."""
    pl.seed_everything(0, verbose=False)
    uninterrupted = TinyModule()
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=20, save_top_k=-1, filename="{step}")
    fit = trainer(max_epochs=-1, max_steps=20, callbacks=[IterativePruning(0.8, every_n_epochs=1), saves],
                  enable_checkpointing=True)  # fmt: skip
    fit.fit(uninterrupted)  # 8 batches an epoch: the fit ends in its third epoch
    assert sparsity(uninterrupted) == pytest.approx(0.8, abs=1e-3)
    model = TinyModule()
    trainer(max_epochs=-1, max_steps=20, callbacks=[IterativePruning(0.8, every_n_epochs=1)]).fit(
        model, ckpt_path=tmp_path / "step=20.ckpt"
    )
    assert sparsity(model) == pytest.approx(sparsity(uninterrupted), abs=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in uninterrupted.state_dict().items())


def test_qat_resumed_from_the_last_batch_before_start_epoch_calibrates_in_start_epoch(tmp_path):
    """Trial CH: Lightning skips the resumed epoch's start, where the observers switch on: `start_epoch` observed
    nothing, quantization switched on uncalibrated, with a false 'never ran their forward' warning."""
    pl.seed_everything(0, verbose=False)
    uninterrupted = TinyModule()
    trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(8, 8, start_epoch=2)]).fit(uninterrupted)
    model, _, said = _resume_after_crash(tmp_path, 1, lambda: [QuantizationAwareTraining(8, 8, start_epoch=2)], 4)
    assert not any("never ran their forward" in m for m in said)
    assert all(torch.equal(uninterrupted.state_dict()[k], v) for k, v in model.state_dict().items())


def test_shift_search_resumed_from_start_epochs_last_batch_chooses_the_shifts_on_the_next_validation(tmp_path):
    """Trial CO: Lightning resumes such a checkpoint without `start_epoch`'s end and validation, where the shifts are
    chosen: quantization switched on with shifts from the observed ranges, not fixed, and moved through training."""
    from lightning_compress.core.qat_layers import QATLayer

    model, (qat,), said = _resume_after_crash(
        tmp_path, 1, lambda: [QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)],
        max_epochs=4,
    )  # fmt: skip
    assert any("epoch 2's validation chooses them" in m and "from epoch 3 on" in m for m in said)
    layers = [m for m in model.modules() if isinstance(m, QATLayer)]
    assert layers and set(qat.shifts) == {n for n, m in model.named_modules() if isinstance(m, QATLayer)}
    assert all(m.weight_fake_quant.frozen_shift and m.weight_fake_quant.fake_quant_enabled for m in layers)


def test_shift_search_resumed_after_start_epochs_last_validation_chooses_the_shifts_on_the_next_epochs(tmp_path):
    """Trial CQ: resumed inside `start_epoch` after its last validation (`val_check_interval=3` of 8 batches, the
    checkpoint at its 7th), the fit failed at the epoch's end: "no validation batch ran in that epoch"."""
    from lightning_compress.core.qat_layers import QATLayer

    def qat():
        return QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)

    pl.seed_everything(0, verbose=False)
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer(max_epochs=4, callbacks=[qat(), saves], enable_checkpointing=True, val_check_interval=3).fit(TinyModule())
    model, callback = TinyModule(), qat()
    with pytest.warns(UserWarning, match=r"no validation of this fit ran in epoch 1.*epoch 2's validation chooses"):
        trainer(max_epochs=4, callbacks=[callback], val_check_interval=3).fit(
            model, ckpt_path=tmp_path / "step=15.ckpt"
        )
    layers = [m for m in model.modules() if isinstance(m, QATLayer)]
    assert set(callback.shifts) == {n for n, m in model.named_modules() if isinstance(m, QATLayer)}
    assert all(m.weight_fake_quant.frozen_shift and m.weight_fake_quant.fake_quant_enabled for m in layers)


def test_shift_search_resumed_with_no_validation_ahead_says_the_shifts_come_from_the_ranges(tmp_path):
    """Trial CR: resumed from `start_epoch`'s last batch with no epoch after it, the warning promised an epoch 2 the
    fit does not have, and the end blamed an early stop."""
    model, _, said = _resume_after_crash(
        tmp_path, 1, lambda: [QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, start_epoch=1)],
        max_epochs=2,
    )  # fmt: skip
    assert all(m.weight_fake_quant.fake_quant_enabled for _, m in qat_modules(model))  # quantized, as uninterrupted
    assert any("no validation is ahead to choose the shifts" in m for m in said)
    assert not any("epoch 2's validation chooses" in m for m in said)


def test_a_joined_event_waits_for_a_validation_of_the_model_quantized_as_the_uninterrupted_fit_does(tmp_path):
    """Trial CI: resumed from a checkpoint saved while an event awaited judgement, the pruner had no copy telling how
    the judged model's quantizers stood: the joined event ran in the batch quantization switched on, and the
    validation judged two events and quantization together. The flags are saved with the state now."""

    def callbacks():
        return [
            IterativePruning(0.8, monitor="val_acc", max_drop=0.5, start_epoch=1, end_epoch=6),
            QuantizationAwareTraining(8, 8, start_epoch=3),
        ]

    pl.seed_everything(0, verbose=False)
    made = callbacks()
    trainer(max_epochs=6, callbacks=made).fit(TinyModule())
    _, (pruning, _), _ = _resume_after_crash(tmp_path, 3, callbacks)
    assert pruning.pruner.waited_for_quantization == made[0].pruner.waited_for_quantization == 1
    assert all(torch.equal(pruning.masks[k], v) for k, v in made[0].masks.items())


def test_qat_resumed_past_freeze_observers_epoch_keeps_its_observers_frozen(tmp_path):
    """Trial CI: resumed from the last batch of `freeze_observers_epoch`, whose end (where they freeze) Lightning
    skips, the observers went on observing: 19 tensors differed from the uninterrupted fit."""
    pl.seed_everything(0, verbose=False)
    uninterrupted = TinyModule()
    qat = {"start_epoch": 1, "freeze_observers_epoch": 2}
    trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(8, 8, **qat)]).fit(uninterrupted)
    model, _, _ = _resume_after_crash(tmp_path, 2, lambda: [QuantizationAwareTraining(8, 8, **qat)], 4)
    assert all(torch.equal(uninterrupted.state_dict()[k], v) for k, v in model.state_dict().items())


def test_weight_averaging_that_would_undo_the_guard_or_average_quantizers_is_refused_before_training():
    """Lightning's weight averaging replaces the trained weights with an average at the end of fit. Beside the
    guard, a rollback was undone (fit returned the model it rejected); EMAWeightAveraging averaged the quantizers'
    buffers (scales, ranges, flags: a model at chance, a shape error with BatchNorm); SWA averaged learned scales
    with their values from before calibration (chance). A trial found all three; each is refused at setup, the
    model untouched. SWA beside minmax QAT (Parameters only) and beside unguarded pruning still runs."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    from lightning_compress.core.qat import qat_modules

    cases = [
        (IterativePruning(0.5, monitor="val_acc"), EMAWeightAveraging(), r"`monitor`='val_acc' judges the weights"),
        (IterativePruning(0.5, monitor="val_acc"), StochasticWeightAveraging(0.01), "StochasticWeightAveraging replac"),
        (QuantizationAwareTraining(), EMAWeightAveraging(), r"beside EMAWeightAveraging: .* it averages buffers"),
        (QuantizationAwareTraining(scale="learned"), StochasticWeightAveraging(0.01), r"learned scales, with their"),
    ]
    for compressing, averaging, match in cases:
        pl.seed_everything(0, verbose=False)
        model = TinyModule()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            trainer(max_epochs=2, callbacks=[averaging, compressing]).fit(model)
        assert not qat_modules(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for compressing in (QuantizationAwareTraining(), IterativePruning(0.5)):
        trainer(max_epochs=2, callbacks=[compressing, StochasticWeightAveraging(0.01)]).fit(TinyModule())


def test_arguments_that_cannot_act_in_their_combination_are_said():
    """`mode` without `monitor`, `min_density` where no floor applies and `shift_search_batches` without the search
    were accepted silently (a docs trial); `max_drop` without `monitor` already warned."""
    from lightning_compress import CompressionMonitor, IterativePruner, prune_

    with pytest.warns(UserWarning, match=r"IterativePruning: `mode`='min' has no effect without `monitor`"):
        IterativePruning(0.5, mode="min")
    with pytest.warns(UserWarning, match=r"CompressionMonitor: `mode`='min' has no effect without `monitor`"):
        CompressionMonitor(mode="min")
    with pytest.warns(UserWarning, match=r"lets `monitor`='val_loss' rise by at most `max_drop`=0.01, the default"):
        IterativePruning(0.9, monitor="val_loss")  # a trial's overfitting GRU: every event rolled back, 0% sparse
    for name in ("val_total", "valTotal", "val_myMetric"):  # trial BP: camel case without a direction word too
        with pytest.warns(UserWarning, match=rf"`monitor`='{name}' names neither a loss nor an accuracy, so the guard"):
            IterativePruning(0.9, monitor=name)  # trial BL: a sum of two losses read as max, every event undone
    for name in ("elbo_validation", "val_elbo", "valELBO"):  # trial FX: scvi-tools logs the negative ELBO as `elbo`
        with pytest.warns(UserWarning, match=r"mode='max'\): an ELBO is logged as the bound .* and as its negative"):
            IterativePruning(0.9, monitor=name)
    with pytest.warns(UserWarning, match=r"CompressionMonitor: `monitor`='elbo_validation' names neither .* an ELBO"):
        CompressionMonitor(monitor="elbo_validation")  # trial FY: said for the guard only
    assert IterativePruning(0.9, monitor="val_nelbo").config.mode == "min"  # the negative ELBO
    for name in ("val_MeanSquaredError", "val_MeanAbsoluteError", "val_abs_err", "val_root_mean_squared_error",
                 "val_max_error", "val_MaxError"):  # fmt: skip  # review: scikit-learn's largest residual, a size
        with pytest.warns(UserWarning, match=rf"lets `monitor`='{name}' rise by at most `max_drop`=0.01"):
            IterativePruning(0.9, monitor=name)  # trial BL: an error's size, in the target's units, was read as a rate
    with pytest.warns(UserWarning, match=r"`shift_search_batches`=8 has no effect without `shift_search=True`"):
        QuantizationAwareTraining(shift_search_batches=8)
    idle = r"`min_density`=0.5 has no effect with `scope`='layer' and `granularity`='element'"
    with pytest.warns(UserWarning, match=idle):
        IterativePruning(0.9, scope="layer", min_density=0.5)
    with pytest.warns(UserWarning, match=idle):
        prune_(nn.Sequential(nn.Linear(8, 8)), 0.9, scope="layer", min_density=0.5)
    with pytest.warns(UserWarning, match=r"`min_density`=0.1 has no effect .* `granularity`='2:4'"):
        IterativePruner(nn.Sequential(nn.Linear(8, 8)), 0.5, total_steps=2, granularity="2:4", min_density=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where they act, or left at their defaults: nothing is said
        IterativePruning(0.9, min_density=0.05, monitor="val_loss", mode="min", max_drop=0.05)
        for rate in ("val_error", "val_wer", "val_top1_error", "val_WordErrorRate", "val_HammingDistance",
                     "val_hamming_distance"):  # fmt: skip  # rates in [0, 1]: 0.01 fits (review: Hamming warned)
            IterativePruning(0.9, monitor=rate)
        for name in ("val_acc", "val_neg_mse", "val_neg_mean_squared_error", "val_PeakSignalNoiseRatio",
                     "val_MulticlassMatthewsCorrCoef", "val_BinaryFBetaScore", "val_f1", "val_BERTScore", "val_map",
                     "val_top1", "val/PearsonCorrCoef", "val_ExactMatch"):  # fmt: skip
            IterativePruning(0.9, monitor=name)  # names that say their direction (trial BN: these warned)
        IterativePruning(0.9, monitor="val_total", mode="min", max_drop=0.05)  # or a mode given
        IterativePruning(0.5, granularity="channel", min_density=0.2)
        IterativePruning(0.5, scope="layer")
        CompressionMonitor()
        QuantizationAwareTraining(8, 8, scale="power_of_two", shift_search=True, shift_search_batches=2)


def test_backbone_finetuning_unfreezing_pruned_layers_keeps_them_pruned():
    """A trial: with Lightning's documented BackboneFinetuning (an optimizer over the trainable parameters, the
    backbone added as a new parameter group when unfrozen), the backbone's pruned weights came back: 0.80 -> 0.13
    sparse at the next validations, and checkpoints held them."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    class FineTune(TinyModule):
        def __init__(self):
            super().__init__()
            del self.net
            self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.backbone(x))

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.01)

    class Sparsities(Callback):
        def __init__(self):
            self.seen = []

        def on_validation_start(self, trainer, pl_module):
            self.seen.append(round(sparsity(pl_module), 4))

    torch.manual_seed(0)
    model, seen = FineTune(), Sparsities()
    pruning = IterativePruning(0.8, importance="magnitude", start_epoch=0, end_epoch=2)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=3, backbone_initial_ratio_lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen backbone, said at the start
        trainer(max_epochs=5, callbacks=[pruning, unfreeze, seen]).fit(model)
    assert model.backbone[0].weight.requires_grad
    assert seen.seen[-3:] == [pytest.approx(0.8, abs=1e-3)] * 3  # epochs 2-4, the last two after the unfreeze


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_strategies_that_train_in_spawned_processes_are_refused_by_qat_and_said_by_pruning(strategy):
    """A trial: under `ddp_spawn` Lightning hands back only the weights (`strict=False`), so the caller's model ended
    float with no word, its quantizers gone, and `save_compressed` wrote a float file."""
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spawning = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, max_epochs=2)
    with pytest.raises(ValueError, match=r"spawned processes .* the model in this process would end float"):
        QuantizationAwareTraining().setup(spawning, model, "fit")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="masks and decisions stay in the workers"):
        IterativePruning(0.5).setup(spawning, model, "fit")
    with pytest.warns(UserWarning, match="its `summary` and `history` stay in the workers"):
        CompressionMonitor("val_acc").setup(spawning, model, "fit")
    plain = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        IterativePruning(0.5).setup(plain, TinyModule(), "fit")


@pytest.mark.parametrize(
    ("make", "state", "error", "match"),
    [
        (lambda: IterativePruning(0.5), "junk", TypeError, "IterativePruning's checkpoint state must be a dict"),
        (lambda: IterativePruning(0.5), {"steps": 1, "validation": "junk"}, ValueError, "has validation='?junk"),
        (
            lambda: IterativePruning(0.5),
            {"steps": 1, "validation": {"global_step": 3}},
            ValueError,
            "not the record of a validation",
        ),
        (lambda: QuantizationAwareTraining(), "junk", TypeError, "QuantizationAwareTraining's checkpoint state"),
        (lambda: QuantizationAwareTraining(), {"version": 1, "shifts": ["x"]}, ValueError, r"has shifts=\['x'\]"),
        (lambda: QuantizationAwareTraining(), {"version": 1, "shifts": {"a": ["x", 1]}}, ValueError, "damaged"),
        (lambda: QuantizationAwareTraining(), {"version": 1, "scales_group": "no"}, ValueError, "scales_group='no'"),
        (lambda: CompressionMonitor("val_acc"), [1], TypeError, "CompressionMonitor's checkpoint state must be"),
        (lambda: CompressionMonitor("val_acc"), {"monitor": "val_acc", "baseline": "x"}, ValueError, "baseline='x'"),
        (lambda: CompressionMonitor("val_acc"), {"monitor": "val_acc", "history": [{"a": 1.0}]}, ValueError, "points"),
        (lambda: CompressionMonitor("val_acc"), {"monitor": "val_acc", "history": 3}, ValueError, "history=3"),
        (lambda: CompressionMonitor("val_acc"), {"monitor": "val_acc", "fingerprints": [1]}, ValueError, r"=\[1\]"),
        (lambda: CompressionMonitor("val_acc"), {"monitor": "val_acc", "compressed_seen": "no"}, ValueError, "damaged"),
    ],
)
def test_damaged_callback_states_are_refused_at_restore_naming_the_entry(make, state, error, match):
    """A trial (AF): damaged states raised raw AttributeError/TypeError/KeyError, or loaded and failed after all
    training (a string baseline: "Unknown format code 'f'" at the end of fit); `bool("no")` made scales_group True."""
    with pytest.raises(error, match=match):
        make().load_state_dict(state)


@pytest.mark.parametrize("end_epoch", [2, 3])
def test_a_guarded_fit_short_of_its_target_because_quantization_switched_on_says_so(end_epoch):
    """Trial BR: an event that waited for a validation of the model quantized (QAT switched on after the validation
    before it) left the fit short of the target, and the note blamed the cadence of judgements. Trial CB: with
    `end_epoch` past the last judged time it blamed an early stop."""
    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.8, monitor="val_acc", max_drop=1.0, end_epoch=end_epoch)
    with pytest.warns(UserWarning, match=r"short of `target_sparsity`=0.8: .*; 1 event time\(s\) waited because "
                      r"quantization switched on since the validation before"):  # fmt: skip
        trainer(max_epochs=3, callbacks=[pruning, QuantizationAwareTraining(start_epoch=1)]).fit(TinyModule())
    assert pruning.pruner.waited_for_quantization == 1


class FrozenBackbone(TinyModule):
    """A backbone BackboneFinetuning freezes at the start of fit and unfreezes later; the optimizer over what trains."""

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_taylor_pruning_that_starts_after_backbone_finetuning_unfreezes_is_not_refused():
    """Trial BT: Taylor importance was refused at train start for a backbone BackboneFinetuning freezes in
    `on_fit_start`, with advice to unfreeze it before `fit` that cannot be followed, although pruning started only
    after the unfreeze. Said, not refused, when pruning starts in a later epoch."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    model = FrozenBackbone()
    pruning = IterativePruning(0.8, importance="taylor", start_epoch=2, end_epoch=3)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    with pytest.warns(UserWarning, match=r"prunes \['backbone.0', 'backbone.2'\], which are frozen"):
        trainer(max_epochs=4, callbacks=[pruning, unfreeze]).fit(model)
    assert sparsity(model) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match=r"`importance`='taylor' scores weights by their gradients, but"):
        trainer(max_epochs=2, callbacks=[IterativePruning(0.8, importance="taylor"), BackboneFinetuning(1)]).fit(
            FrozenBackbone()
        )


def test_channel_pruning_of_a_compiled_lightning_module():
    """Trial BT: channels of a compiled LightningModule passed to `fit` were traced through its compiled forward:
    "found no channel group it can prune" (every layer "never called as a module"). Traced with its own forward."""
    pl.seed_everything(0, verbose=False)
    model = Unlogged()
    pruning = IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=1)
    trainer(max_epochs=2, callbacks=[pruning], limit_val_batches=0).fit(torch.compile(model))
    assert float((model.net[0].weight.abs().sum(1) == 0).float().mean()) == pytest.approx(0.5)


class BuiltInSetup(TinyModule):
    """Trial EG: a head sized by what the data says, built in `setup` as Lightning documents."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None  # type: ignore[assignment]
        self.example_input_array = torch.zeros(2, 16)

    def setup(self, stage: str) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("callback", "what"),
    [
        (lambda: QuantizationAwareTraining(8, 8), "QuantizationAwareTraining converts layers"),
        (lambda: IterativePruning(0.5, granularity="channel"), "granularity='channel' traces the model"),
        (lambda: IterativePruning(0.5, export_path="m.onnx"), "`export_path`='m.onnx' runs the model"),
    ],
)
def test_layers_built_in_the_modules_setup_are_said_to_come_too_late(tmp_path, callback, what):
    """Trial EG: QAT and channel pruning said "select no weight ... it needs a Linear or Conv layer" and an ONNX
    `export_path` blamed `example_input_array`, of a module that builds its layers in `setup`: Lightning calls the
    callbacks' `setup` first. The refusal now names that order and the fix; the model is left untouched."""
    made = callback()
    if isinstance(made, IterativePruning) and made.export_path is not None:
        made = IterativePruning(0.5, export_path=tmp_path / "m.onnx")
        what = what.replace("'m.onnx'", repr(str(tmp_path / "m.onnx")))
    model = BuiltInSetup()
    with pytest.raises(ValueError, match=rf"{re.escape(what)} at `setup`, before BuiltInSetup\.setup run"):
        trainer(max_epochs=1, callbacks=[made]).fit(model)
    assert model.net is None and not qat_modules(model)  # refused before its own `setup` ran
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=1)  # element pruning selects at `on_fit_start`
    trainer(max_epochs=2, callbacks=[pruning]).fit(BuiltInSetup())
    assert pruning.pruner.masked_sparsity() == pytest.approx(0.5, abs=1e-3)


class RawOptimizer(TinyModule):
    """Manual optimization with the optimizer Lightning wraps taken raw: its steps reach no callback hook."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_pruned_weights_an_unseen_optimizer_revives_are_zeroed_before_a_validation_scores_them():
    """Trial EG: an optimizer from `self.optimizers(use_pl_optimizer=False)` (documented as bypassing the masking
    hooks) revived the pruned weights between events: each validation scored a model 0.11-0.16 sparse, the guard
    accepted "0.8954 at sparsity 0.8", and the 0.8-sparse model `fit` returned scored 0.7404. Now every validation
    scores the masked model, and a warning says what happened, once."""

    class Scored(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[float, float]] = []

        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.seen.append((sparsity(pl_module), pruning.pruner.masked_sparsity()))

    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.8, start_epoch=0, end_epoch=3, every_n_epochs=1, monitor="val_acc", max_drop=0.5)
    scored = Scored()
    with pytest.warns(
        UserWarning, match=r"pruned weights of \['net.0.weight', .* were nonzero at this validation"
    ) as w:
        trainer(max_epochs=4, callbacks=[pruning, scored]).fit(RawOptimizer())
    assert sum("were nonzero at this validation" in str(m.message) for m in w) == 1
    assert not [m for m in w if "got no gradient" in str(m.message)]  # trial EZ: the loss reaches them; no step seen
    assert len(scored.seen) == 4 and scored.seen[-1][1] == pytest.approx(0.8, abs=1e-3)
    assert all(seen == pytest.approx(masked, abs=1e-6) for seen, masked in scored.seen)


class ScoredByQuantization(TinyModule):
    """Its validation score is 1 while it computes in float and 0.8 once fake quantization is on."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_score", 0.8 if any(q.fake_quant_enabled for _, q in quantizers(self)) else 1.0)


@pytest.mark.parametrize("qat_first", [True, False])
def test_quantization_that_costs_more_than_max_drop_before_pruning_starts_is_said(qat_first):
    """Trial EH: with QAT switched on before the first pruning event, the guard took the quantized model's score as its
    baseline (0.9330 -> 0.7705) and accepted every event, and the fit returned a model 0.147 below the float one with
    nothing said; QAT switched on after the first event is said (session 21's warning)."""
    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.5, start_epoch=2 if qat_first else 1, end_epoch=4, monitor="val_score", max_drop=0.05)
    qat = QuantizationAwareTraining(8, 8, start_epoch=0 if qat_first else 3)
    with pytest.warns(UserWarning) as caught:
        trainer(max_epochs=6, callbacks=[pruning, qat]).fit(ScoredByQuantization())
    said = [str(w.message) for w in caught if "quantization switched on" in str(w.message)[:60]]
    if qat_first:
        assert (
            len(said) == 1
            and "before the first pruning event, and the model scores 0.8000, 0.2000 from 1.0000" in said[0]
        )
        assert [d.value for d in pruning.decisions if d.action == "baseline"][-1] == pytest.approx(0.8)
    else:
        assert len(said) == 1 and "with quantization switched on the model scores 0.8000" in said[0]


def test_the_plan_warning_of_a_guarded_fit_says_quantization_may_make_its_last_event_wait():
    """Trial EG: at setup the warning promised that the last judged event "prunes to the target in one step"; QAT
    switching on in the pruning window made that event wait for a validation of the quantized model, and the fit
    ended at 0.563 of 0.8, which only the end of fit explained."""
    pl.seed_everything(0, verbose=False)
    callbacks = [
        IterativePruning(0.8, end_epoch=3, monitor="val_acc", max_drop=0.5),
        QuantizationAwareTraining(start_epoch=1),
    ]
    said = r"prunes to the target in one step.*QuantizationAwareTraining \(`start_epoch`=1\) switches quantization on"
    with pytest.warns(UserWarning, match=said):
        trainer(max_epochs=-1, max_steps=30, callbacks=callbacks, num_sanity_val_steps=-1).fit(TinyModule())
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:  # QAT after the window: nothing about it
        warnings.simplefilter("always")
        later = [
            IterativePruning(0.8, end_epoch=3, monitor="val_acc", max_drop=0.5),
            QuantizationAwareTraining(start_epoch=4),
        ]
        trainer(max_epochs=5, max_steps=40, callbacks=later, num_sanity_val_steps=-1).fit(TinyModule())
    assert not [w for w in caught if "switches quantization on inside" in str(w.message)]


def test_schedules_bounded_by_max_steps_count_what_the_fit_runs():
    """Trial FR: (1) a `GradientAccumulationScheduler` that changes the epoch's length moved the clock, and the end at
    `max_steps` was read on the Trainer's count: 0.7848 of 0.80; (2) its factor was read as 1 at the start of training,
    and QAT was refused as switching on after 8 steps where epoch 0 made 2; (3) two optimizers under manual
    optimization: the schedule was placed on twice the batches the fit ran, 0.70 of 0.80."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.8)
    fit = trainer(max_epochs=-1, max_steps=12, callbacks=[pruning, GradientAccumulationScheduler({0: 1, 1: 4})])
    fit.fit(TinyModule())  # 8 batches an epoch: 8 steps, then 2 an epoch
    assert fit.global_step == 12 and pruning.pruner.masked_sparsity() == pytest.approx(0.8, abs=1e-3)
    qat = QuantizationAwareTraining(8, 8)
    model = TinyModule()
    trainer(max_epochs=-1, max_steps=5, callbacks=[qat, GradientAccumulationScheduler({0: 4})]).fit(model)
    assert quantizing(model)  # epoch 0 made 2 steps and calibrated; epoch 1 quantizes
    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.8)
    model = Manual()
    trainer(max_epochs=-1, max_steps=40, callbacks=[pruning]).fit(model)  # 20 batches
    assert pruning.pruner.masked_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_quantizers_with_nothing_to_calibrate_switch_on_as_a_later_start_epoch_starts_in_a_fit_ending_inside_it():
    """Trial FR: with `start_epoch=1` and a fit `max_steps` ends inside epoch 1, the LLM recipe was refused, told its
    calibration epoch (observed activation ranges, which it has none of) outlasts the fit."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    qat = QuantizationAwareTraining(4, 8, group_size=4, activation_granularity="per_token", start_epoch=1)
    seen: list[tuple[int, bool]] = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, quantizing(pl_module)))

    trainer(max_epochs=-1, max_steps=12, callbacks=[qat, Watch()]).fit(model)  # 8 batches an epoch
    assert {on for epoch, on in seen if epoch == 0} == {False} and {on for epoch, on in seen if epoch == 1} == {True}
