"""``CompressionMonitor``: watch accuracy against compression while fine-tuning."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from ..core.checks import is_real
from ..core.controller import monitor_mode
from ..core.qat import quantizers
from ..core.sharding import full, local, reshard
from ..core.summary import ModelSize, estimate_size
from ._guard import (
    LoggedNames,
    check_monitor_name,
    named_after_the_stage,
    read_monitor,
    says_no_direction,
    stale_note,
    warn_no_direction,
)
from ._validation import runs_in_spawned_processes, sanity_check_is_a_baseline
from ._validation_plan import clock_max_steps, steps_per_epoch

__all__ = ["CompressionMonitor"]


class CompressionMonitor(Callback):
    r"""Log, at every validation of ``fit``, what the model would weigh if exported now, and its accuracy.

    Through any Lightning logger: ``compress/model/sparsity`` and ``.../sparsity/<weight>``,
    ``compress/model/bits/<weight>``, ``compress/model/effective_bits`` (bits per weight, positions
    and scales included), ``compress/model/size_bytes``, ``compress/model/compression_ratio``
    (against the dense float state dict) and, with ``monitor``, ``compress/model/<monitor>`` and
    ``compress/model/<monitor>_drop`` (from the dense baseline: the last value seen while the model
    was neither sparse nor quantized). With a ``TensorBoardLogger`` also weight histograms of the
    compressed layers, a per-layer sparsity bar chart, an accuracy-vs-compression chart (needs
    matplotlib) and the compression callbacks' settings as hyperparameters. At the end of ``fit``
    a summary table is logged once (rank zero, an info message of Lightning's Python logger, not a logger's
    metric); the same data is :attr:`summary`.

    Args:
        monitor: a logged validation metric, e.g. ``"val_acc"`` (``None``: sizes only).
        mode: ``"max"`` if higher ``monitor`` is better, ``"min"`` otherwise; ``None`` (default): ``"min"`` for a
            name that reads as lower-is-better (``val_loss``, ``val_ppl``, ...), ``"max"`` otherwise, as
            :class:`IterativePruning` infers it.
        log_images: TensorBoard histograms and charts (on by default).

    Example:
        >>> from lightning_compress import CompressionMonitor
        >>> monitor = CompressionMonitor(monitor="val_acc")
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, log_images: bool = True) -> None:
        super().__init__()
        check_monitor_name(monitor)
        if not isinstance(log_images, bool):
            raise TypeError(f"`log_images` must be a bool, got {log_images!r}.")
        self.monitor = monitor
        if mode is not None and monitor is None:
            warnings.warn(
                f"CompressionMonitor: `mode`={mode!r} has no effect without `monitor` (no metric to read).",
                UserWarning,
                stacklevel=2,
            )
        self.mode = monitor_mode(monitor, mode, "CompressionMonitor")
        if monitor is not None and mode is None and says_no_direction(monitor):  # trial FY: said for the guard only
            warn_no_direction("CompressionMonitor", "its drop from the baseline", monitor, stacklevel=3)
        self.log_images = log_images
        self.baseline: float | None = None
        self._baseline_at: str | None = None  # where the baseline was scored ("epoch 3"), for the summary
        self.history: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {}
        self._warned_matplotlib = False
        self._said_no_baseline = False
        self._one_epoch = False  # `max_steps` ends the fit inside its first epoch
        self._compressed_seen = False  # a validation scored the model sparse or quantized: the baseline stays
        self._compressed_at_start = False  # the model was sparse or quantized when training started
        self._validated: tuple[ModelSize, bool, int] | None = None  # the model a validation scores, at its start
        self._fingerprints: list[int | None] = []  # of each point's model (this process's; None: restored points)
        self._logged = LoggedNames()  # which names that validation logged itself

    @property
    def state_key(self) -> str:
        """One per watched metric: two monitors (``val_loss`` and ``val_acc``) in one Trainer (a trial: Lightning
        refused them as two stateful callbacks of one kind). A checkpoint saved under the class name still loads."""
        return self._generate_state_key(monitor=self.monitor)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written before the state key named the metric keeps the state under the class name: it is
        read from there (a trial: the baseline and history were dropped without a word)."""
        states = checkpoint.get("callbacks")
        legacy = type(self).__qualname__
        if isinstance(states, dict) and self.state_key not in states and legacy in states:
            states[self.state_key] = states[legacy]  # its saved monitor is compared with this one's on loading

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new fit starts a new history (a checkpoint's, restored after this, continues its own)."""
        if stage == "fit":
            self.history, self.baseline = [], None  # (trial CP: a second fit kept the first model's baseline)
            self._baseline_at = None
            self._fingerprints = []
            self._said_no_baseline = self._compressed_seen = self._compressed_at_start = False
            if runs_in_spawned_processes(trainer):
                rank_zero_warn(
                    "CompressionMonitor under a strategy that trains in spawned processes (`ddp_spawn`, `ddp_fork`, "
                    "`ddp_notebook`): its `summary` and `history` stay in the workers (empty in the calling process); "
                    "the loggers still get every point. Use strategy='ddp' to read them after `fit`."
                )

    def state_dict(self) -> dict[str, Any]:
        """The dense baseline and the history, for a checkpoint: a resumed fit measures drops from the same
        baseline."""
        return {
            "monitor": self.monitor,
            "baseline": self.baseline,
            "baseline_at": self._baseline_at,
            "history": [dict(point) for point in self.history],
            "fingerprints": list(self._fingerprints),  # a resumed fit's summary matches the model `fit` returns
            "compressed_seen": self._compressed_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"CompressionMonitor's checkpoint state must be a dict, got {type(state_dict).__name__}.")
        if not state_dict:
            return
        _check_state(state_dict)
        saved = state_dict.get("monitor", self.monitor)
        if saved != self.monitor:  # a trial: a val_acc baseline and history summarized beside val_loss values
            rank_zero_warn(
                f"CompressionMonitor: the checkpoint's monitor watched {saved!r}, this one watches {self.monitor!r}: "
                "its baseline and history are not restored."
            )
            return
        self.baseline = state_dict.get("baseline")
        self._baseline_at = state_dict.get("baseline_at")  # (none in a checkpoint written before session 44)
        self.history = [dict(point) for point in state_dict.get("history", [])]
        # a checkpoint written before session 36 has no fingerprints: its points match no model at the end of fit
        self._fingerprints = list(state_dict.get("fingerprints", [None] * len(self.history)))
        self._compressed_seen = bool(state_dict.get("compressed_seen", any(p["sparsity"] > 0 for p in self.history)))

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The sanity check's validation already shows whether ``monitor`` is logged: refuse before training. One
        that ran every validation batch (``num_sanity_val_steps=-1``) on a model neither sparse nor quantized gives
        the dense baseline, for a fit that compresses from its first step."""
        # with several validation loaders Lightning keeps no metric of the sanity check: nothing to check then
        if self.monitor is None or trainer.num_sanity_val_steps == 0 or not trainer.callback_metrics:
            return
        if named_after_the_stage(trainer, self.monitor):  # the first validation reads it (trial FF)
            return
        value = self._monitored(trainer)
        reshard(pl_module)  # a forward without backward left FSDP2's root unit gathered (trial BE: a segfault)
        if (
            sanity_check_is_a_baseline(trainer)
            and value is not None
            and not _compressed(pl_module, estimate_size(pl_module))
        ):
            self.baseline, self._baseline_at = value, "before training"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Whether the model is compressed before this fit (a model pruned before, a resumed checkpoint's weights,
        loaded by now): then no validation of this fit scores it dense, which the warning without a baseline says.
        Looked at before training starts, where a callback may switch quantization on (trial FZ: the LLM recipe's,
        and the model was called compressed before the fit that compressed it)."""
        reshard(pl_module)
        self._compressed_at_start = _compressed(pl_module, estimate_size(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch, max_steps = steps_per_epoch(trainer), clock_max_steps(trainer)
        self._one_epoch = per_epoch is not None and max_steps is not None and max_steps <= per_epoch

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the model the validation scores now: a callback may change it at the validation's end (the
        guard's rollback), and the point logged must pair the value with the model it belongs to."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        reshard(pl_module)
        size = estimate_size(pl_module)
        self._validated = size, _compressed(pl_module, size), _fingerprint(pl_module)
        self._logged.start(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        started = self._validated is not None
        if not started:
            self.on_validation_start(trainer, pl_module)
        assert self._validated is not None
        (size, compressed, fingerprint), self._validated = self._validated, None
        value = self._monitored(trainer)
        if value is not None and started and not self._logged.logged(trainer, self.monitor or ""):
            rank_zero_warn(stale_note("CompressionMonitor", trainer, self.monitor or "", "its point has no value"))
            value = None
        if value is not None and not compressed and not self._compressed_seen:
            # the last value before the model was first compressed: a guard's rollback to the dense model, validated
            # again, does not move it (trial EH: 0.9330 became 0.9414, where the guard kept 0.9330)
            self.baseline, self._baseline_at = value, f"epoch {trainer.current_epoch}"
        self._compressed_seen = self._compressed_seen or compressed
        if value is not None and self.baseline is None:
            self._drop(value)  # says why there is no baseline, with or without a logger
        point = {
            "step": float(trainer.global_step),
            "epoch": float(trainer.current_epoch),
            "sparsity": size.sparsity,
            "compression_ratio": size.compression_ratio,
            "effective_bits": size.effective_bits,
        }
        if value is not None:
            point["value"] = value
        self.history.append(point)
        self._fingerprints.append(fingerprint)
        self._log(trainer, pl_module, size, value)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reshard(pl_module)
        size = estimate_size(pl_module)
        # the value of the last validation that scored the model fit returns: after a guard's rollback the last one
        # scored the rejected model (the Trainer's metrics then still hold its values); none when no validation
        # scored it (trial CP: quantization switched on, or an event ran, after the last validation: the summary
        # paired a 2-bit model's size with the float model's 0.92, where it scored 0.70)
        # (trial CR: matched on sparsity and bits alone, it gave a score to SWA's average and to weights trained after
        # the last validation): the weights must be those the validation saw
        now = _fingerprint(pl_module)
        same = [
            p for p, f in zip(self.history, self._fingerprints, strict=True)
            if (p["sparsity"], p["effective_bits"]) == (size.sparsity, size.effective_bits) and f == now
        ]  # fmt: skip
        final = same[-1].get("value") if same else None
        if self.monitor is not None and not self.history:
            rank_zero_warn(
                f"CompressionMonitor: no validation ran during the fit, so `monitor`={self.monitor!r} was never read "
                "and the summary has no baseline or final value: give the fit validation data (`val_dataloaders`, "
                "`limit_val_batches` > 0)."
            )
        self.summary = {
            **size.to_dict(),
            "monitor": self.monitor,
            "baseline": self.baseline,
            "final": final,
            # where each was scored: the model trained on between them (trial GE: QAT's calibration epoch gave the
            # baseline, and five more epochs of training read as the gain of quantizing)
            "baseline_at": self._baseline_at if self.baseline is not None else None,
            "final_at": f"epoch {int(same[-1]['epoch'])}" if final is not None else None,
        }
        _log_summary(self.summary, validated=bool(self.history))

    # ------------------------------------------------------------------ helpers
    def _monitored(self, trainer: pl.Trainer) -> float | None:
        if self.monitor is None:
            return None
        return read_monitor(trainer, self.monitor)  # the processes' mean, as the guard judges it (trial BF)

    def _drop(self, value: float) -> float | None:
        """Drop from the dense baseline; ``None`` without one (the model was compressed at the first validation)."""
        if self.baseline is None:
            if not self._said_no_baseline:
                self._said_no_baseline = True
                if self._compressed_at_start:  # trial EH: it advised settings the fit already had
                    why = (
                        "the model was already sparse or quantized when this fit's training started (`prune_`, "
                        "`keep_zeros`, an earlier fit or its checkpoint), so no validation of this fit scores it "
                        "dense"
                    )
                    fix = "Validate the dense model in the fit that first compresses it."
                else:
                    why = "the model was already compressed at the first validation"
                    fix = "Validate the dense model first: a sanity check over the whole validation set " + (
                        "(`Trainer(num_sanity_val_steps=-1)`; this fit ends inside its first epoch, where a later "
                        "`start_epoch` never comes: trial FZ)."
                        if self._one_epoch
                        else "(`Trainer(num_sanity_val_steps=-1)`), or start compressing after a validation (e.g. "
                        "`start_epoch=1`)."
                    )
                rank_zero_warn(
                    f"CompressionMonitor: {why}, so there is no dense baseline and `{self.monitor}_drop` is not "
                    f"logged. {fix}"
                )
            return None
        return self.baseline - value if self.mode == "max" else value - self.baseline

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, size: ModelSize, value: float | None) -> None:
        if not trainer.loggers:
            return
        metrics: dict[str, float] = {
            "compress/model/sparsity": size.sparsity,
            "compress/model/effective_bits": size.effective_bits,
            "compress/model/size_bytes": float(size.bytes),
            "compress/model/compression_ratio": size.compression_ratio,
        }
        for layer in size.layers:
            metrics[f"compress/model/sparsity/{layer.name}"] = layer.sparsity
            metrics[f"compress/model/bits/{layer.name}"] = float(layer.bits)
        if value is not None and self.monitor is not None:
            metrics[f"compress/model/{self.monitor}"] = value
            drop = self._drop(value)
            if drop is not None:
                metrics[f"compress/model/{self.monitor}_drop"] = drop
        # the step Lightning logs this validation's metrics at: the batches trained before the one it follows (trial
        # EA: one step later, every point stood apart from its `val_acc` in TensorBoard)
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:  # every logger, as Lightning's own `self.log` does
            logger.log_metrics(metrics, step=step)
            if self.log_images and isinstance(logger, TensorBoardLogger):
                self._tensorboard(logger, pl_module, size, step)

    def _tensorboard(
        self, logger: TensorBoardLogger, pl_module: pl.LightningModule, size: ModelSize, step: int
    ) -> None:
        names = {layer.name for layer in size.layers}
        for name, param in pl_module.named_parameters():
            if name in names:  # every process: a weight sharded by FSDP2 is gathered, one layer at a time
                values = full(param.detach()).float().reshape(-1)
                self._histogram(logger, f"compress/weights/{name}", values[values != 0], step)
        self._charts(logger, size, step)

    @rank_zero_only
    def _histogram(self, logger: TensorBoardLogger, tag: str, values: Tensor, step: int) -> None:
        if values.numel():
            logger.experiment.add_histogram(tag, values.cpu(), step)

    @rank_zero_only
    def _charts(self, logger: TensorBoardLogger, size: ModelSize, step: int) -> None:
        experiment = logger.experiment
        try:  # figures without pyplot: the user's matplotlib backend and global state are left alone
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned_matplotlib:
                warnings.warn("CompressionMonitor: install matplotlib for the TensorBoard charts.", stacklevel=2)
                self._warned_matplotlib = True
            return
        names = [layer.name for layer in size.layers]
        # wide enough for the names (trial BW: ALBERT's long names warned "Tight layout not applied" at every
        # validation), about 0.08 inch a character
        figure = Figure(figsize=(4 + 0.08 * max(map(len, names), default=0), 0.3 * len(names) + 1.5))
        axis = figure.subplots()
        axis.barh(names, [100 * layer.sparsity for layer in size.layers])
        axis.set_xlabel("sparsity (%)")
        axis.set_xlim(0, 100)
        with warnings.catch_warnings():  # a layout that cannot fit is drawn as it is, said by nobody
            warnings.filterwarnings("ignore", message="Tight layout not applied")
            figure.tight_layout()
        experiment.add_figure("compress/charts/layer_sparsity", figure, step)
        points = [p for p in self.history if "value" in p]
        if points:
            figure = Figure(figsize=(5, 4))
            axis = figure.subplots()
            axis.plot([p["compression_ratio"] for p in points], [p["value"] for p in points], marker="o")
            axis.set_xlabel("compression ratio (x)")
            axis.set_ylabel(self.monitor or "")
            if self.baseline is not None:
                axis.axhline(self.baseline, linestyle="--", color="grey", label="dense")
                axis.legend()
            figure.tight_layout()
            experiment.add_figure("compress/charts/accuracy_vs_compression", figure, step)


def _compressed(pl_module: pl.LightningModule, size: ModelSize) -> bool:
    """Whether the model is sparse or quantized now (not a dense baseline)."""
    return size.sparsity > 0 or any(q.fake_quant_enabled for _, q in quantizers(pl_module))


def _relation(ratio: float) -> str:
    """The estimate against the dense model, in words: "1.0x smaller" would misread a model as large or larger."""
    return f"{ratio:.1f}x smaller" if ratio >= 1.05 else f"{1 / ratio:.2f}x the dense size" if ratio else "empty"


_SAME_WIDTH_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(model: nn.Module) -> int:
    """The sum of the bit patterns of this process's parameters (their shards under FSDP2), telling whether the
    weights changed. An integer sum is exact in any order: the validations of a GPU fit take it on the GPU and
    ``on_fit_end`` on the CPU, where Lightning has moved the model back; a float sum differs there in its last bits
    when the weights' magnitudes span more than a double holds (then the summary said no validation scored the model
    `fit` returns)."""
    total = 0
    with torch.no_grad():
        for parameter in model.parameters():
            values = local(parameter).detach().contiguous()
            bits = values.view(_SAME_WIDTH_INTEGERS[values.element_size()])
            total += int(bits.sum(dtype=torch.int64))
    return total


def _log_summary(summary: dict[str, Any], validated: bool) -> None:
    layers = summary["layers"]
    width = max([len(layer["name"]) for layer in layers] + [6])
    lines = [f"{'layer':<{width}}  {'sparsity':>8}  {'bits':>4}  {'dense':>10}  {'compressed':>10}"]
    for layer in layers:
        lines.append(
            f"{layer['name']:<{width}}  {100 * layer['sparsity']:>7.1f}%  {layer['bits']:>4}  "
            f"{layer['dense_bytes']:>10,}  {layer['bytes']:>10,}"
        )
    lines.append(
        f"{'model':<{width}}  {100 * summary['sparsity']:>7.1f}%  {'':>4}  {summary['dense_bytes']:>10,}  "
        f"{summary['bytes']:>10,}   {_relation(summary['compression_ratio'])}, "
        f"{summary['effective_bits']:.2f} bits per weight of the layers above"
    )
    if summary["monitor"] is not None and validated:
        before = "n/a" if summary["baseline"] is None else f"{summary['baseline']:.4f}"
        after = (
            "not validated (no validation scored the model `fit` returns: `trainer.validate(model)` scores it)"
            if summary["final"] is None
            else f"{summary['final']:.4f}"
        )
        at = [summary.get(key) for key in ("baseline_at", "final_at")]
        before += f" ({at[0]})" if at[0] and summary["baseline"] is not None else ""
        after += f" ({at[1]})" if at[1] and summary["final"] is not None else ""
        lines.append(f"{summary['monitor']}: dense {before} -> compressed {after}")
    rank_zero_info("\nCompression summary (estimated sizes before entropy coding):\n" + "\n".join(lines))


_POINT_KEYS = ("step", "epoch", "sparsity", "compression_ratio", "effective_bits")


def _check_state(state: dict[str, Any]) -> None:
    """Refuse a saved baseline or history :meth:`CompressionMonitor.state_dict` could not have written (a trial: a
    string baseline and a point without its sparsity failed at the end of fit, after all training)."""
    baseline, history = state.get("baseline"), state.get("history", [])
    good_baseline = baseline is None or (is_real(baseline) and math.isfinite(baseline))
    good_history = isinstance(history, list) and all(
        isinstance(point, dict)
        and all(key in point for key in _POINT_KEYS)
        and all(isinstance(k, str) and is_real(v) for k, v in point.items())
        for point in history
    )
    prints = state.get("fingerprints", [None] * len(history) if isinstance(history, list) else None)
    good_prints = (
        isinstance(prints, list)
        and isinstance(history, list)
        and len(prints) == len(history)
        and all(f is None or (isinstance(f, int) and not isinstance(f, bool)) for f in prints)
        and isinstance(state.get("compressed_seen", False), bool)
        and isinstance(state.get("baseline_at"), (str, type(None)))
    )
    if not (good_baseline and good_history and good_prints):
        raise ValueError(
            f"The checkpoint's CompressionMonitor state has baseline={repr(baseline)[:40]}, history="
            f"{str(history)[:80]}, fingerprints={str(prints)[:40]}: not what it saves (a finite number or None; "
            f"points of numbers with {list(_POINT_KEYS)}; one integer or None per point); the checkpoint is damaged."
        )
