"""Pieces the benchmark scripts share (run them from the repository root: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import PruningSchedule
from lightning_compress.core.selection import select_targets


def quiet_trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def model_pruning(target: float, start: int, end: int, lottery: bool, model: nn.Module) -> ModelPruning:
    """Lightning's ModelPruning with global L1 on the weights ``IterativePruning`` selects by default (every
    Linear/Conv weight, recurrent and attention matrices, experts) and the same cubic sparsity as
    ``IterativePruning(target, start_epoch=start, end_epoch=end)`` after every epoch."""
    schedule = PruningSchedule("cubic", target, start, end)

    def amount(epoch: int) -> float:  # torch.nn.utils.prune compounds: prune a fraction of what is left
        before, after = schedule.sparsity_at(epoch), schedule.sparsity_at(epoch + 1)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the default leaves out was said when IterativePruning selected
        params = [(t.module, t.attr) for t in select_targets(model, module_tensors=True)]
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):  # it reads out_proj.weight without calling out_proj, so the
            module.register_forward_pre_hook(_out_proj_pruning)  # pruning hook there must run first (trial BO)
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=params,
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=lottery,
        verbose=0,
    )


def _out_proj_pruning(attention: nn.Module, args: object) -> None:
    """Recompute ``out_proj.weight`` from its ``torch.nn.utils.prune`` mask before ``nn.MultiheadAttention`` reads it:
    otherwise it stays the tensor of the last pruning and the second backward through it fails."""
    for hook in list(attention.out_proj._forward_pre_hooks.values()):
        hook(attention.out_proj, args)


def mlp_layers() -> nn.Sequential:
    """The 10.4M-parameter MLP of the overhead and export benchmarks: 1024-2360-2360-1024-10."""
    return nn.Sequential(
        nn.Linear(1024, 2360),
        nn.ReLU(),
        nn.Linear(2360, 2360),
        nn.ReLU(),
        nn.Linear(2360, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


class Stubbed(nn.Module):
    """What torch.ao eager QAT needs around a network: QuantStub / DeQuantStub."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.net = net
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.net(self.quant(x)))


def prepare_torch_ao_qat(net: nn.Module) -> nn.Module:
    """Wrap ``net`` in stubs and run ``torch.ao.quantization.prepare_qat`` (x86 qconfig) on it."""
    stubbed = Stubbed(net)
    stubbed.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(stubbed.train(), inplace=True)
    return stubbed


def interleaved_ms(calls: dict[str, Callable[[], object]], rounds: int = 30, reps: int = 1) -> dict[str, float]:
    """Median milliseconds of process CPU time per call, one thread, in interleaved rounds whose order rotates.

    Every callable runs once untimed first; then each round times ``reps`` calls of every one of
    them, the order shifted by one each round, so drift in machine load hits all of them alike.
    """
    torch.set_num_threads(1)
    names = list(calls)
    per: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                begin = time.process_time()
                for _ in range(reps):
                    calls[name]()
                per[name].append((time.process_time() - begin) / reps)
    return {name: 1000 * statistics.median(values) for name, values in per.items()}


def quantize_static_qdq(src: object, dst: object, batches: list[torch.Tensor]) -> None:
    """onnxruntime's ``quantize_static`` of the fp32 file ``src`` (one input, ``input_0``) into ``dst``: QDQ,
    per-channel int8 weights, uint8 activations, calibrated on ``batches``: the anchor the int8 exports are timed
    against."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input_0": b.numpy()} for b in batches])

        def get_next(self) -> dict[str, object] | None:
            return next(self.items, None)

    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def no_arguments(doc: str | None) -> None:
    """For a benchmark that takes no arguments: ``--help`` prints its docstring, anything else is refused (a trial:
    ``--help`` ran the whole benchmark, or a 5 GB child)."""
    import argparse

    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def dense_vs_channels(
    dense: pl.LightningModule,
    seed: int,
    epochs: int,
    train: object,
    val: object,
    validate: Callable[[pl.LightningModule], float],
    metric: str,
    inputs: tuple[torch.Tensor, ...],
) -> tuple[dict[str, object], dict[str, nn.Module]]:
    """From the weights of ``dense``, ``epochs`` more of plain training (``"dense"``) and of
    ``IterativePruning(0.5, granularity="channel")`` with every other argument at its default, then ``compact()``
    checked on ``inputs`` (``"channels50"``), both from seed ``seed + 100`` on the ``train`` loader. Returns the
    figures (``{method}_{metric}``, ``compacted_{metric}``, ``max_abs_diff``, ``params``, ``macs``, ``channels``) and
    the two models, in eval mode."""
    import copy

    from lightning_compress import IterativePruning, compact

    out: dict[str, object] = {}
    models: dict[str, nn.Module] = {}
    for method in ("dense", "channels50"):
        pl.seed_everything(seed + 100, verbose=False)
        module = copy.deepcopy(dense)
        callbacks = [IterativePruning(0.5, granularity="channel")] if method == "channels50" else []
        quiet_trainer(epochs, callbacks).fit(module, train, val)
        module.eval()
        out[f"{method}_{metric}"] = validate(module)
        if method == "channels50":
            with torch.no_grad():
                before = module(*inputs)
                report = compact(module, inputs)
                out["max_abs_diff"] = float((module(*inputs) - before).abs().max())
            out[f"compacted_{metric}"] = validate(module)
            out["params"] = (report.params_before, report.params_after)
            out["macs"] = (report.macs_before, report.macs_after)
            out["channels"] = {name: list(sizes) for name, sizes in report.channels.items()}
        models[method] = module
    return out, models
