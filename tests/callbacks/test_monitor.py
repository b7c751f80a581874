"""CompressionMonitor with the real Trainer and a real TensorBoard event file."""

import logging
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_compress import CompressionMonitor, IterativePruning, QuantizationAwareTraining, save_compressed
from lightning_compress.core.summary import estimate_size
from tests.conftest import TinyModule, trainer


def test_tensorboard_tags_values_images_and_summary(tmp_path, caplog):
    import matplotlib

    backend = matplotlib.get_backend()  # the charts are drawn without touching it
    caplog.set_level(logging.INFO)
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    monitor = CompressionMonitor(monitor="val_acc")
    callbacks = [
        IterativePruning(0.8, schedule="linear", start_epoch=1, end_epoch=3, every_n_epochs=1),
        QuantizationAwareTraining(8, 8, start_epoch=3),
        monitor,
    ]
    trainer(max_epochs=5, callbacks=callbacks, logger=logger).fit(model)
    assert matplotlib.get_backend() == backend
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "compress/model/sparsity",
        "compress/model/sparsity/net.0.weight",
        "compress/model/bits/net.4.weight",
        "compress/model/effective_bits",
        "compress/model/size_bytes",
        "compress/model/compression_ratio",
        "compress/model/val_acc",
        "compress/model/val_acc_drop",
    }
    assert expected <= scalars
    sparsity = [e.value for e in events.Scalars("compress/model/sparsity")]
    assert sparsity[0] == 0.0 and sparsity[-1] == pytest.approx(0.8, abs=1e-3) and len(sparsity) == 5
    bits = [e.value for e in events.Scalars("compress/model/bits/net.4.weight")]
    assert bits[0] == 32 and bits[-1] == 8
    ratio = [e.value for e in events.Scalars("compress/model/compression_ratio")]
    assert 0.9 < ratio[0] <= 1.0 and ratio[-1] > 4  # quantizer buffers cost a little until they pay off
    # the dense baseline: the last value before any compression
    drops = [e.value for e in events.Scalars("compress/model/val_acc_drop")]
    assert drops[0] == 0.0
    # at the steps of the validation metrics they pair with (trial EA: one step later)
    assert [e.step for e in events.Scalars("compress/model/val_acc")] == [e.step for e in events.Scalars("val_acc")]
    assert [e.step for e in events.Images("compress/charts/layer_sparsity")][-1] == events.Scalars("val_acc")[-1].step
    assert {"compress/charts/layer_sparsity", "compress/charts/accuracy_vs_compression"} <= set(events.Tags()["images"])
    assert "compress/weights/net.2.weight" in events.Tags()["histograms"]
    # summary: logged once (through Lightning's logger, on rank zero), and the same data as a dict
    out = caplog.text
    assert out.count("Compression summary") == 1 and "net.2.weight" in out
    assert monitor.summary["sparsity"] == pytest.approx(0.8, abs=1e-3) and monitor.summary["final"] is not None
    assert monitor.summary["baseline"] == monitor.history[1]["value"]  # epoch 1 ends before its pruning event


class LongNames(TinyModule):
    """Layers named as deep `transformers` models name theirs (ALBERT's run past 60 characters)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_albert_layer_groups_0_albert_layers_0_attention_query_projection = self.net
        del self.net

    def forward(self, x):
        return self.encoder_albert_layer_groups_0_albert_layers_0_attention_query_projection(x)


def test_the_sparsity_chart_of_long_layer_names_draws_without_a_warning(tmp_path):
    """Trial BW: matplotlib warned "Tight layout not applied" at every validation for ALBERT's layer names."""
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    callbacks = [IterativePruning(0.5, start_epoch=0, end_epoch=1), CompressionMonitor(monitor="val_acc")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, callbacks=callbacks, logger=logger).fit(LongNames())
    assert not [w for w in caught if "layout" in str(w.message).lower()]
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert "compress/charts/layer_sparsity" in events.Tags()["images"]


def test_any_logger_and_hparams(tmp_path):
    """Every logger of the Trainer gets the values: only the first did (found by a trial with CSV + TensorBoard)."""
    pl.seed_everything(0, verbose=False)
    loggers = [CSVLogger(tmp_path, name="first", version=0), CSVLogger(tmp_path, name="csv", version=0)]
    pruning = IterativePruning(0.5, start_epoch=0, end_epoch=1)
    callbacks = [pruning, QuantizationAwareTraining(8, 8, start_epoch=0), CompressionMonitor()]
    trainer(max_epochs=2, callbacks=callbacks, logger=loggers).fit(TinyModule())
    for name in ("first", "csv"):
        metrics = (tmp_path / name / "version_0" / "metrics.csv").read_text()
        assert "compress/model/effective_bits" in metrics
        hparams = (tmp_path / name / "version_0" / "hparams.yaml").read_text()
        assert "compress/pruning/target_sparsity: 0.5" in hparams and "compress/qat/weight_bits: 8" in hparams


def _half(t: int) -> float:
    return 0.5 * min(1.0, (t + 1) / 2)


def test_every_setting_is_logged_and_a_callable_schedule_by_its_dotted_name(tmp_path):
    """Trial CP: a schedule callable was logged as `<function half at 0x7fa2...>`, an address no run reproduces, and
    `freeze_observers_epoch`, `freeze_bn_epoch`, `rewind_epoch`, `mode` and `export_path` were not logged."""
    pl.seed_everything(0, verbose=False)
    callbacks = [
        IterativePruning(0.5, schedule=_half, start_epoch=0, end_epoch=2, monitor="val_acc", max_drop=1.0),
        QuantizationAwareTraining(8, 8, start_epoch=0, freeze_observers_epoch=1, freeze_bn_epoch=1),
    ]
    trainer(max_epochs=2, callbacks=callbacks, logger=CSVLogger(tmp_path, name="csv", version=0)).fit(TinyModule())
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert f"compress/pruning/schedule: {__name__}._half" in hparams
    for line in ("compress/pruning/mode: max", "compress/pruning/rewind_epoch: none", "compress/qat/freeze_bn_epoch: 1",
                 "compress/qat/freeze_observers_epoch: 1", "compress/qat/export_path: none"):  # fmt: skip
        assert line in hparams


def test_the_callbacks_settings_leave_the_modules_hparams_first_and_two_qat_callbacks_apart(tmp_path):
    """Trial W: each callback logged its settings as a set of its own before Lightning logged the module's
    hyperparameters, and TensorBoard's HParams view keeps the first set a run logs (`hidden` and `lr` disappeared
    from it); two QAT callbacks wrote the same keys (a 4-bit and an 8-bit callback read `weight_bits: 8`). One set
    now holds the module's hyperparameters and every callback's settings."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    class WithHparams(TinyModule):
        def __init__(self, hidden: int = 32, lr: float = 0.05):
            super().__init__(hidden=hidden, lr=lr)
            self.save_hyperparameters()

    callbacks = [
        IterativePruning(0.5, start_epoch=0, end_epoch=1, include=["net.0"]),
        QuantizationAwareTraining(4, 8, start_epoch=0, include=["net.0"]),
        QuantizationAwareTraining(8, 8, start_epoch=0, include=["net.2", "net.4"]),
    ]
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(max_epochs=1, callbacks=callbacks, logger=logger).fit(WithHparams())
    (path,) = (tmp_path / "tb" / "version_0").glob("events.*")
    sessions = [  # the hyperparameters of each set logged, in order: TensorBoard's HParams view shows the first
        set(plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info.hparams)
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/session_start_info"
    ]
    assert sessions and {"hidden", "lr", "compress/qat/weight_bits", "compress/pruning/include"} <= sessions[0]
    hparams = (tmp_path / "tb" / "version_0" / "hparams.yaml").read_text()
    assert "compress/qat/weight_bits: 4" in hparams and "compress/qat1/weight_bits: 8" in hparams
    assert "compress/pruning/start_epoch: 0" in hparams and "compress/pruning/include: net.0" in hparams


def test_size_estimate_tracks_the_real_file(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    callbacks = [IterativePruning(0.9, start_epoch=0, end_epoch=1), QuantizationAwareTraining(8, 8, start_epoch=1)]
    trainer(max_epochs=3, callbacks=callbacks).fit(model)
    estimate = estimate_size(model)
    report = save_compressed(model, tmp_path / "m.lcz")
    assert 0.5 < report.file_bytes / estimate.bytes < 1.3  # LZMA only shaves what the estimate leaves
    assert estimate.effective_bits < 4


def test_the_estimate_counts_a_quantized_layer_that_never_ran_in_float_as_the_file_stores_it(tmp_path):
    """Trial BS: a fake-quant layer whose forward never ran (an unused head) holds no scale, and the file stores its
    weight in float; the monitor's summary counted it in 8 bits (9.2 effective bits per weight instead of 17.4)."""
    from torch import nn

    from lightning_compress import QuantConfig, calibrate, convert_to_qat, enable_fake_quant

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    convert_to_qat(model, QuantConfig(8, 8))
    calibrate(model, [torch.randn(8, 16)])
    enable_fake_quant(model)
    rows = {layer.name: layer for layer in estimate_size(model).layers}
    assert rows["used.weight"].bits == 8 and rows["unused.weight"].bits == 32
    assert rows["unused.weight"].bytes == 4 * 64 * 16
    report = save_compressed(model, tmp_path / "m.lcz")
    assert "unused.weight" not in {layer.name for layer in report.layers}  # stored as it is


def test_the_estimate_counts_a_tied_weight_once_and_compressed_tensors_outside_the_default_selection(tmp_path):
    """A trial: a weight tied to an embedding was counted twice (dense bytes 528,640 for 272,640 unique), and a
    pruned or int8 embedding was counted as dense float, so the monitor logged a ratio of 1.0 for a model the file
    stores 1.6x smaller (and reset its dense baseline at every validation)."""
    from torch import nn

    from lightning_compress import QuantConfig, convert_to_qat, enable_fake_quant, prune_

    class LM(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.emb, self.h, self.head = nn.Embedding(100, 16), nn.Linear(16, 16), nn.Linear(16, 100, bias=False)
            if tied:
                self.head.weight = self.emb.weight

    unique = 4 * (100 * 16 + 16 * 16 + 16)
    assert estimate_size(LM(tied=True)).dense_bytes == unique
    assert estimate_size(LM(tied=False)).dense_bytes == unique + 4 * 100 * 16
    model = LM(tied=False)
    prune_(model, 0.5, include=["emb"])
    size = estimate_size(model)
    assert "emb.weight" in [layer.name for layer in size.layers] and size.sparsity > 0
    assert size.bytes < size.dense_bytes - 4 * 100 * 16 // 3  # the embedding's zeros are not stored
    quantized = LM(tied=False)
    convert_to_qat(quantized, QuantConfig(weight_bits=8, activation_bits=None), include=["emb", "h", "head"])
    enable_fake_quant(quantized)
    quantized.head(quantized.h(quantized.emb(torch.randint(0, 100, (4, 8)))))  # each quantizer runs once
    layers = {layer.name: layer.bits for layer in estimate_size(quantized).layers}
    assert layers == {"emb.weight": 8, "h.weight": 8, "head.weight": 8}
    # biases initialized to zeros (GPT-2's) are stored small, but are no pruned layer: a dense model is not sparse
    zero_biases = nn.Sequential(nn.Linear(16, 128), nn.Linear(128, 4))
    with torch.no_grad():
        zero_biases[0].bias.zero_()
    size = estimate_size(zero_biases)
    assert size.sparsity == 0.0 and size.bytes < size.dense_bytes


def test_no_drop_is_logged_without_a_dense_baseline(tmp_path):
    """Regression: pruning from the first step left no dense validation, and the drop was logged as 0.0."""
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_acc")
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="no dense baseline and `val_acc_drop` is not logged"):
        trainer(
            max_epochs=2, callbacks=[IterativePruning(0.5, start_epoch=0, end_epoch=2), monitor], logger=logger
        ).fit(TinyModule())
    assert monitor.baseline is None
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "compress/model/val_acc," in logged and "val_acc_drop" not in logged


@pytest.mark.parametrize("sanity_steps", [-1, 1, 2])
def test_a_sanity_check_over_the_whole_validation_set_gives_the_dense_baseline(tmp_path, sanity_steps):
    """A trial: the README's own example prunes from its first step, so its monitor had no dense baseline (it warned
    and its summary read "dense n/a"). A sanity check asked for every validation batch scores the dense model; one
    of part of them is not comparable with a whole validation and gives none, nor does Lightning's default of two
    batches on a validation set of two (TinyModule's), as for the guard (trial EG)."""
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    monitor = CompressionMonitor(monitor="val_acc")
    dense = trainer().validate(model, verbose=False)[0]["val_acc"]
    callbacks = [IterativePruning(0.5, start_epoch=0, end_epoch=2), monitor]
    logger = CSVLogger(tmp_path)
    fit = trainer(max_epochs=2, callbacks=callbacks, logger=logger, num_sanity_val_steps=sanity_steps)
    if sanity_steps == -1:
        fit.fit(model)
        assert monitor.baseline == pytest.approx(dense)
        logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
        assert "compress/model/val_acc_drop" in logged and monitor.summary["baseline"] == pytest.approx(dense)
    else:
        with pytest.warns(UserWarning, match=r"no dense baseline .*`Trainer\(num_sanity_val_steps=-1\)`"):
            fit.fit(model)
        assert monitor.baseline is None


def test_a_fit_that_ends_inside_its_first_epoch_is_not_told_to_start_compressing_later():
    """Trial FZ: QAT switched on before the first validation of a `max_steps` fine-tune, and the warning advised
    `start_epoch=1`, which both callbacks refuse in such a fit; only the whole sanity check gives a baseline there."""
    pl.seed_everything(0, verbose=False)
    callbacks = [QuantizationAwareTraining(), CompressionMonitor(monitor="val_acc")]  # on after step 1 of 6
    with pytest.warns(UserWarning, match=r"no dense baseline") as caught:
        trainer(max_epochs=-1, max_steps=6, val_check_interval=3, callbacks=callbacks).fit(TinyModule())
    said = [str(w.message) for w in caught if "no dense baseline" in str(w.message)]
    assert "ends inside its first epoch" in said[0] and "`start_epoch=1`" not in said[0]


def test_a_recipe_switching_on_as_training_starts_is_not_called_compressed_before_the_fit():
    """Trial FZ: the LLM recipe switches on at the first step of a `max_steps` fine-tune, before the monitor (after it
    in the callbacks) looked at the model as training started: it called the model compressed before this fit and
    advised validating it dense "in the fit that first compresses it", which is this fit."""
    pl.seed_everything(0, verbose=False)
    recipe = QuantizationAwareTraining(weight_bits=4, group_size=8, activation_granularity="per_token")
    callbacks = [recipe, CompressionMonitor(monitor="val_acc")]
    with pytest.warns(UserWarning, match=r"no dense baseline") as caught:
        trainer(max_epochs=-1, max_steps=6, val_check_interval=3, callbacks=callbacks).fit(TinyModule())
    said = [str(w.message) for w in caught if "no dense baseline" in str(w.message)]
    assert "already compressed at the first validation" in said[0] and "num_sanity_val_steps=-1" in said[0]


def test_a_resumed_fit_keeps_the_dense_baseline_and_the_history(tmp_path):
    """A trial: after `fit(ckpt_path=...)` the monitor had no baseline (the drop was no longer logged, the summary
    read "dense n/a") and warned to start compressing later, which the run already did."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        monitor = CompressionMonitor(monitor="val_acc")
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
        callbacks = [IterativePruning(0.5, start_epoch=1, end_epoch=3), monitor, ckpt]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=4, callbacks=callbacks, enable_checkpointing=True).fit(TinyModule(), ckpt_path=ckpt_path)
        assert not [w for w in caught if "CompressionMonitor" in str(w.message)]
        return monitor

    full = run()
    resumed = run(ckpt_path=tmp_path / "epoch=1.ckpt")
    assert full.baseline is not None and resumed.baseline == full.baseline
    assert resumed.history == full.history and len(full.history) == 4
    assert resumed.summary["baseline"] == full.summary["baseline"]
    # trial EH: resumed from the last epoch's checkpoint (nothing left to train), the model `fit` returns is the one its
    # restored last point scored, but the restored points had no fingerprint: the summary said "not validated"
    done = run(ckpt_path=tmp_path / "epoch=3.ckpt")
    assert full.summary["final"] is not None and done.summary["final"] == full.summary["final"]
    # another metric: nothing of val_acc's is restored (trial W: a val_acc baseline beside val_loss values)
    other = CompressionMonitor(monitor="val_loss")
    with pytest.warns(UserWarning, match=r"watched 'val_acc', this one watches 'val_loss'"):
        other.load_state_dict(full.state_dict())
    assert other.baseline is None and other.history == []


def test_the_monitor_never_changes_the_model(tmp_path):
    """Regression: at the end of fit (the model in train mode) the size estimate ran the weight quantizers, which
    observed the weights again and moved the minmax scales: the model `fit` returned differed from the same fit
    without the monitor, and from the file `export_path` had written just before."""
    from lightning_compress import load_compressed

    def fit(monitor: bool):
        pl.seed_everything(0, verbose=False)
        model = TinyModule()
        callbacks = [QuantizationAwareTraining(8, 8, start_epoch=1, export_path=tmp_path / f"{monitor}.lcz")]
        if monitor:
            callbacks.append(CompressionMonitor(monitor="val_acc"))
        trainer(max_epochs=3, callbacks=callbacks).fit(model)
        return model

    plain, watched = fit(False), fit(True)
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items())
    fresh = TinyModule()
    load_compressed(fresh, tmp_path / "True.lcz")
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), watched.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": 1}, TypeError, "`monitor` must be a metric name"),
        ({"monitor": ""}, ValueError, "`monitor`='' names no metric"),
        ({"mode": "up"}, ValueError, "`mode`='up' is not one of"),
        ({"log_images": "yes"}, TypeError, "`log_images` must be a bool"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressionMonitor(**kwargs)


def test_unknown_monitor_is_named():
    with pytest.raises(ValueError, match="`monitor`='val_f1' was not logged"):
        trainer(max_epochs=1, callbacks=[CompressionMonitor(monitor="val_f1")]).fit(TinyModule())


def test_an_unknown_monitor_is_refused_by_the_sanity_check_before_training():
    """The sanity check had shown the metric missing, but the refusal came after a training epoch (new-user trial)."""

    class NoTraining(pl.Callback):
        def on_train_batch_start(self, *args):
            raise AssertionError("training started")

    callbacks = [CompressionMonitor(monitor="val_f1"), NoTraining()]
    with pytest.raises(ValueError, match="`monitor`='val_f1' was not logged"):
        trainer(max_epochs=1, callbacks=callbacks, num_sanity_val_steps=2).fit(TinyModule())


def test_the_summary_of_a_model_nothing_compressed_does_not_call_it_smaller(caplog):
    """A trial: a model with nothing compressed (and a QAT model before its switch, 0.99 with its buffers) read
    '1.0x smaller'."""
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=1, callbacks=[CompressionMonitor()]).fit(TinyModule())
    summary = [r.getMessage() for r in caplog.records if "Compression summary" in r.getMessage()]
    assert len(summary) == 1 and "x smaller" not in summary[0] and "1.00x the dense size" in summary[0]


def test_a_fit_without_validation_says_the_monitor_was_never_read():
    monitor = CompressionMonitor(monitor="val_acc")
    with pytest.warns(UserWarning, match=r"no validation ran during the fit, so `monitor`='val_acc' was never read"):
        trainer(max_epochs=1, limit_val_batches=0, callbacks=[monitor]).fit(TinyModule())
    assert monitor.summary["baseline"] is None and monitor.summary["final"] is None


@pytest.mark.parametrize("monitor_first", [True, False])
def test_beside_a_guard_that_rolls_back_the_points_pair_each_value_with_the_model_it_scored(monitor_first):
    """Listed after a guard that rolled an event back, the monitor saw the model back at sparsity 0 and took the
    rejected model's loss as the dense baseline (0.5568 for 0.5025); and it read `val_loss` as higher-is-better,
    logging a rise as a negative drop (a trial). It now measures the model when the validation starts, and infers
    the mode from the name as the guard does."""
    pl.seed_everything(0, verbose=False)
    guard = IterativePruning(0.95, start_epoch=1, end_epoch=2, monitor="val_loss", max_drop=0.0)
    monitor = CompressionMonitor(monitor="val_loss")
    assert monitor.mode == "min" and CompressionMonitor(monitor="val_acc").mode == "max"
    callbacks = [monitor, guard] if monitor_first else [guard, monitor]
    trainer(max_epochs=4, callbacks=callbacks).fit(TinyModule())
    assert any(d.action == "rollback" for d in guard.decisions)
    baselines = [d.value for d in guard.decisions if d.action == "baseline"]
    assert monitor.baseline == pytest.approx(baselines[-1])
    for point, decision in zip(monitor.history, guard.decisions, strict=True):
        assert point["value"] == pytest.approx(decision.value)
        assert (point["sparsity"] > 0) == (decision.action != "baseline")  # the model each value scored


def test_the_monitor_counts_the_recurrent_and_attention_matrices_pruning_prunes():
    """A trial's LSTM pruned to 90% read '0.0% sparse, 1.0x smaller' in the monitor, whose dense baseline was then
    the sparse model: it counted Linear/Conv weights only. It now counts what pruning selects."""
    from tests.callbacks.test_pruning import SequenceClassifier

    pl.seed_everything(0, verbose=False)
    model = SequenceClassifier("lstm")
    pruning = IterativePruning(0.9, start_epoch=1, end_epoch=3, exclude=["head"])
    monitor = CompressionMonitor(monitor="val_acc", log_images=False)
    trainer(max_epochs=4, callbacks=[pruning, monitor]).fit(model)
    layers = {layer.name for layer in estimate_size(model).layers}
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "attn.in_proj_weight"} <= layers
    assert monitor.summary["sparsity"] > 0.85 and monitor.summary["compression_ratio"] > 3
    assert monitor.summary["baseline"] == monitor.history[0]["value"]  # before the first event: dense
    assert monitor.history[0]["sparsity"] == 0.0 and monitor.history[-1]["sparsity"] > 0.85


@pytest.mark.parametrize("monitor_first", [True, False])
def test_the_summary_gives_the_score_of_the_model_fit_returns_after_a_rollback(monitor_first):
    """A trial: the guard rolled the last event back, and the summary gave the rejected model's score (0.8417)
    beside the size of the model fit returned (0% sparse, score 1.0)."""
    from lightning_compress import IterativePruning
    from tests.callbacks.test_pruning import ScoredBySparsity

    pl.seed_everything(0, verbose=False)
    model = ScoredBySparsity()
    pruning = IterativePruning(0.5, start_epoch=1, end_epoch=3, monitor="val_score", max_drop=1e-4, every_n_epochs=1)
    monitor = CompressionMonitor(monitor="val_score")
    callbacks = [monitor, pruning] if monitor_first else [pruning, monitor]
    trainer(max_epochs=4, callbacks=callbacks).fit(model)
    assert [d.action for d in pruning.decisions][-1] in ("rollback", "stop")
    assert monitor.summary["sparsity"] == 0.0
    assert monitor.summary["final"] == pytest.approx(1.0) == monitor.summary["baseline"]


def test_the_summary_gives_no_score_when_no_validation_scored_the_model_fit_returns(caplog):
    """Trial CP: quantization switched on at the end of fit (no epoch after `start_epoch`), and the summary paired the
    2-bit model's size with the float model's score (0.92, where the 2-bit model scored 0.70)."""
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_acc")
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(2, 8, start_epoch=2), monitor]).fit(TinyModule())
    assert monitor.summary["effective_bits"] < 32 and monitor.history and monitor.summary["final"] is None
    assert "-> compressed not validated" in caplog.text


def test_the_summary_says_where_the_baseline_and_the_final_value_were_scored(caplog, tmp_path):
    """Trial GE: with QAT from `start_epoch=0` the baseline is the model after one epoch, and "dense 0.5669 ->
    compressed 0.3274" read five more epochs of training as the gain of quantizing."""
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_loss")
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit = trainer(
        max_epochs=3, callbacks=[QuantizationAwareTraining(start_epoch=0), monitor, ckpt], enable_checkpointing=True
    )
    with caplog.at_level(logging.INFO):
        fit.fit(TinyModule())
    assert monitor.summary["baseline_at"] == "epoch 0" and monitor.summary["final_at"] == "epoch 2"
    assert re.search(r"val_loss: dense [0-9.]+ \(epoch 0\) -> compressed [0-9.]+ \(epoch 2\)", caplog.text)
    sanity = CompressionMonitor(monitor="val_loss")  # pruning from the first step: the sanity check is the baseline
    pl.seed_everything(0, verbose=False)
    callbacks = [IterativePruning(0.5, start_epoch=0, end_epoch=2), sanity]
    trainer(max_epochs=2, callbacks=callbacks, num_sanity_val_steps=-1).fit(TinyModule())
    assert sanity.summary["baseline_at"] == "before training"
    resumed = CompressionMonitor(monitor="val_loss")  # the checkpoint keeps where its baseline was scored
    resumed.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][monitor.state_key])
    assert resumed.state_dict()["baseline_at"] == "epoch 0"
    with pytest.raises(ValueError, match="the checkpoint is damaged"):
        resumed.load_state_dict({**monitor.state_dict(), "baseline_at": 3})


def test_the_summary_gives_no_score_to_weights_trained_after_the_last_validation():
    """Trial CR: matched on sparsity and bits alone, the summary gave the last validation's 0.6463 to a model trained
    an epoch further (`check_val_every_n_epoch=2`), which scored 0.8185."""
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_acc")
    trainer(max_epochs=3, callbacks=[monitor], check_val_every_n_epoch=2).fit(TinyModule())
    assert monitor.history and monitor.summary["final"] is None
    pl.seed_everything(0, verbose=False)
    trainer(max_epochs=2, callbacks=[monitor], check_val_every_n_epoch=2).fit(TinyModule())
    assert monitor.summary["final"] == pytest.approx(monitor.history[-1]["value"])  # it scored the model returned


def test_a_second_fit_measures_drops_from_its_own_dense_baseline():
    """Trial CP: a monitor reused for a second fit kept the first model's baseline, and summarized the second model,
    sparse at every validation, as dropping from it."""
    from lightning_compress import prune_

    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_acc")
    trainer(max_epochs=1, callbacks=[monitor]).fit(TinyModule())
    assert monitor.baseline is not None
    sparse = TinyModule()
    prune_(sparse, 0.5)
    trainer(max_epochs=1, callbacks=[monitor, IterativePruning(0.5, start_epoch=0, end_epoch=1)]).fit(sparse)
    assert monitor.baseline is None and monitor.summary["baseline"] is None


class _LossEveryOtherEpoch(TinyModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.current_epoch % 2 == 0:
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


@pytest.mark.parametrize("monitor_first", [True, False])
def test_a_validation_that_does_not_log_the_monitor_gives_a_point_without_a_value(monitor_first):
    """Trial AJ: the point of a validation that did not log `monitor` paired the new model with the earlier
    validation's value (a 99% sparse model with the dense model's score); beside a guard, in either order."""
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_loss")
    pruning = IterativePruning(0.9, schedule="one_shot", start_epoch=1, end_epoch=2)
    callbacks = [monitor, pruning] if monitor_first else [pruning, monitor]
    with pytest.warns(UserWarning, match=r"CompressionMonitor: the validation at epoch 1, .* its point has no value"):
        trainer(max_epochs=3, callbacks=callbacks).fit(_LossEveryOtherEpoch())
    assert ["value" in p for p in monitor.history] == [True, False, True]
    assert monitor.history[1]["sparsity"] > 0.8


def test_two_monitors_watch_two_metrics_and_resume_each_its_own(tmp_path):
    """Trial AJ: two monitors (`val_loss`, `val_acc`) were refused by Lightning as two stateful callbacks of a kind."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    loss, acc = CompressionMonitor(monitor="val_loss"), CompressionMonitor(monitor="val_acc")
    pruning = IterativePruning(0.5, start_epoch=1, end_epoch=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[pruning, loss, acc, ckpt], enable_checkpointing=True).fit(TinyModule())
    assert loss.baseline != acc.baseline and len(loss.history) == len(acc.history) == 2
    again = [CompressionMonitor(monitor="val_acc"), CompressionMonitor(monitor="val_loss")]
    trainer(max_epochs=3, callbacks=[IterativePruning(0.5, start_epoch=1, end_epoch=2), *again]).fit(
        TinyModule(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert again[0].baseline == acc.baseline and again[1].baseline == loss.baseline
    assert len(again[0].history) == 3


def test_a_checkpoint_saved_under_the_class_name_still_resumes_the_monitor(tmp_path):
    """Trial AM: checkpoints written before the state key named the metric keep the state under
    "CompressionMonitor"; Lightning's fallback key is the class itself, so the baseline and history were dropped."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(monitor="val_acc")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[IterativePruning(0.5, start_epoch=1, end_epoch=2), monitor, ckpt],
            enable_checkpointing=True).fit(TinyModule())  # fmt: skip
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved["callbacks"] = {
        ("CompressionMonitor" if k == monitor.state_key else k): v for k, v in saved["callbacks"].items()
    }  # as an older release wrote it
    torch.save(saved, tmp_path / "old.ckpt")
    again = CompressionMonitor(monitor="val_acc")
    trainer(max_epochs=3, callbacks=[IterativePruning(0.5, start_epoch=1, end_epoch=2), again]).fit(
        TinyModule(), ckpt_path=tmp_path / "old.ckpt"
    )
    assert again.baseline == monitor.baseline and len(again.history) == 3


def test_the_fingerprint_of_the_weights_does_not_depend_on_the_order_a_device_sums_them_in():
    """A GPU fit's validations take the fingerprint on the GPU and `on_fit_end` takes it on the CPU, where Lightning has
    moved the model: a float sum of weights whose magnitudes span more than a double holds depended on that order
    (here the same values reversed), and the summary would say no validation scored the model `fit` returns."""
    from lightning_compress.callbacks.monitor import _fingerprint

    values = torch.cat([torch.ones(1000), torch.tensor([2.0**60])])
    assert float(values.double().sum()) != float(values.flip(0).double().sum())  # a float sum would differ
    forward, backward = torch.nn.Linear(1001, 1, bias=False), torch.nn.Linear(1001, 1, bias=False)
    with torch.no_grad():
        forward.weight.copy_(values)
        backward.weight.copy_(values.flip(0))
    assert _fingerprint(forward) == _fingerprint(backward)
    with torch.no_grad():
        forward.weight[0, 0] = 1.0000001  # one weight changed by one step of float32
    assert _fingerprint(forward) != _fingerprint(backward)


class DriftingScore(TinyModule):
    """Its validation score is 1 - sparsity, plus 0.001 per optimizer step: a dense model scores higher later."""

    def validation_step(self, batch, batch_idx):
        from lightning_compress import sparsity

        super().validation_step(batch, batch_idx)
        self.log("val_score", 1.0 - sparsity(self) + 0.001 * self.global_step)


def test_the_dense_baseline_stays_when_a_rollback_returns_to_the_dense_model():
    """Trial EH: the guard rolled an event back to the dense model, a later validation scored it dense again, and the
    monitor took that score as its baseline (0.9330 became 0.9414) where the guard kept the first: the monitor's
    baseline is the last value before the model was first compressed."""
    pl.seed_everything(0, verbose=False)
    pruning = IterativePruning(0.9, schedule="one_shot", start_epoch=1, end_epoch=2, monitor="val_score", max_drop=0.3)
    monitor = CompressionMonitor(monitor="val_score")
    trainer(max_epochs=4, callbacks=[pruning, monitor], val_check_interval=0.5).fit(DriftingScore())
    assert [d.action for d in pruning.decisions][:5] == ["baseline"] * 4 + ["rollback"]
    dense_again = [p for p in monitor.history[5:] if p["sparsity"] == 0]
    assert dense_again and dense_again[0]["value"] > monitor.baseline + 1e-3  # a later dense validation, higher
    assert monitor.baseline == pytest.approx(pruning.decisions[3].value)


def test_no_baseline_for_a_model_compressed_before_the_fit_says_so(caplog):
    """Trial EH: a model pruned before (`prune_`, then `keep_zeros`) has no dense validation in the fit; the warning
    advised `num_sanity_val_steps=-1` and `start_epoch=1`, which the fit already had. It is also said without a
    logger (it was reached only when logging)."""
    from lightning_compress import prune_

    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    prune_(model, 0.8)
    monitor = CompressionMonitor(monitor="val_acc")
    callbacks = [IterativePruning(0.9, start_epoch=1, end_epoch=2, keep_zeros=True), monitor]
    with pytest.warns(UserWarning, match=r"already sparse or quantized when this fit's training started") as caught:
        trainer(max_epochs=3, callbacks=callbacks, num_sanity_val_steps=-1).fit(model)
    said = [str(w.message) for w in caught if "no dense baseline" in str(w.message)]
    assert len(said) == 1 and "num_sanity_val_steps" not in said[0] and monitor.baseline is None


def test_a_module_whose_state_holds_a_dict_is_monitored_and_exported(tmp_path):
    """Trial GJ: nequip's training module keeps its metrics' settings as a dict in its state dict; the monitor failed
    with `'dict' object has no attribute 'untyped_storage'` as the fit started."""
    from lightning_compress import load_compressed
    from tests.conftest import ModuleWithExtraState

    model = ModuleWithExtraState()
    monitor = CompressionMonitor(monitor="val_acc")
    path = tmp_path / "model.lcz"
    with pytest.warns(UserWarning, match=r"leaves out the state dict entries that are not tensors"):
        trainer(max_epochs=2, callbacks=[IterativePruning(0.5, start_epoch=1, export_path=path), monitor]).fit(model)
    assert monitor.summary["compression_ratio"] > 1.5 and monitor.summary["final"] is not None
    fresh = ModuleWithExtraState()
    load_compressed(fresh, path)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))
