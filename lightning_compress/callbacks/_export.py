"""Export at the end of ``fit`` for both callbacks (``export_path=``)."""

from __future__ import annotations

import copy
import itertools
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..core.checks import check_output_path
from ..core.compact import compact
from ..core.qat import quantizers
from ..core.sharding import is_sharded
from ..core.skeleton import materialize_, meta_copy
from ..core.tracing import check_example_inputs
from ..export.compressed import load_compressed, save_compressed
from ..export.onnx import check_traceable, export_onnx
from ..export.report import CompressionReport
from ._validation import may_shard, noting_layers_built_late


def how_to_give_examples(pl_module: pl.LightningModule) -> str:
    """How to set ``example_input_array`` (trial FS: a module pytorch-tabular builds could not be edited, and a forward
    taking one dict was given it as keywords)."""
    name = type(pl_module).__name__
    return (
        f"set `example_input_array` on the {name}, in its `__init__` or on the instance before `fit` (a module "
        "another library builds; one it builds inside `fit`, as darts does: from a callback's `setup` hook, listed "
        "before this one): a tensor, a tuple of positional inputs (a forward that takes one dict: `(batch_dict,)`), "
        "or a dict of keyword inputs."
    )


def check_export_path(path: Any) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, (str, Path)):
        raise TypeError(f"`export_path` must be a path (str or pathlib.Path) or None, got {path!r}.")
    if not Path(path).name or Path(path).is_dir():
        raise ValueError(f"`export_path`={str(path)!r} must name a file (e.g. 'model.lcz' or 'model.onnx').")
    return check_output_path(path, "export_path", create_parents=True)


def check_export_ready(trainer: pl.Trainer, path: Path | None, pl_module: pl.LightningModule) -> None:
    """``.onnx`` needs example inputs that the model's ``forward`` takes, and a forward the ONNX exporter can
    convert: fail at setup, not after hours of training.

    The forward runs once, in eval mode and without gradients, then is traced without its weights
    (:func:`~lightning_compress.export.onnx.check_traceable`), unless the strategy may shard the module (its
    weights are not all there at setup)."""
    if path is None or not _is_onnx(path):
        return
    if pl_module.example_input_array is None:
        raise ValueError(
            f"`export_path`={str(path)!r} is an ONNX file, which needs example inputs: "
            + how_to_give_examples(pl_module)
        )
    if may_shard(trainer) or any(p.is_meta for p in pl_module.parameters()):
        return
    with noting_layers_built_late(pl_module, f"`export_path`={str(path)!r} runs the model"):
        check_example_inputs(
            pl_module, example_inputs(pl_module), "example_input_array", f"`export_path`={str(path)!r} exports on it: "
        )
    try:  # an operation the exporter cannot convert fails now, not after the fit (trial BY)
        check_traceable(pl_module, example_inputs(pl_module))
    except ValueError as err:
        said = str(err).replace("`example_inputs`", "`example_input_array`")
        # the callbacks export at opset 17 (trial CA: the message suggested an option they do not have)
        said = re.sub(r"`export_onnx\(\.\.\., opset=(\d+)\)`", r"call `export_onnx(..., opset=\1)` after the fit", said)
        raise ValueError(f"`export_path`={str(path)!r}: {said}") from err


def example_inputs(pl_module: pl.LightningModule) -> Any:
    """``example_input_array`` through the module's batch-transfer hooks, on its device (``None`` if unset).

    Floating-point inputs take the module's dtype when its weights are bfloat16/float16 (``precision="bf16-true"``
    converts the module, not ``example_input_array``)."""
    example = pl_module.example_input_array
    if example is None:
        return None
    example = pl_module.on_before_batch_transfer(example, 0)
    example = pl_module.transfer_batch_to_device(example, weights_device(pl_module), 0)
    example = pl_module.on_after_batch_transfer(example, 0)
    dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
    if dtype in (torch.bfloat16, torch.float16):
        example = apply_to_collection(example, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)
    return example


def weights_device(pl_module: pl.LightningModule) -> torch.device:
    """Where the module's weights are now. Not ``pl_module.device`` at ``setup``: Lightning sets that to the
    accelerator's device before it moves the module there (a GPU fit traced CPU weights with CUDA inputs)."""
    for tensor in itertools.chain(pl_module.parameters(), pl_module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return pl_module.device


def export_template(
    trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path | None, compacted: bool = False
) -> nn.Module | None:
    """At ``setup``, under a strategy that may shard the module (FSDP2): a copy of it without its weights (meta
    parameters, no memory), for an export that needs the whole model (ONNX, or a compacted file); else ``None``.

    At the end of fit the sharded model is gathered into it on rank zero (:func:`export_at_fit_end`).
    """
    if path is None or not may_shard(trainer) or not (_is_onnx(path) or compacted):
        return None
    data = (Dataset, DataLoader)  # data sets a module holds (often large) are referred to, not copied
    shared = [v for m in pl_module.modules() for v in vars(m).values() if isinstance(v, data)]
    mesh = pl_module.device_mesh
    return meta_copy(pl_module, buffers=False, share=shared if mesh is None else [*shared, mesh])


def check_export_template(template: nn.Module | None, pl_module: pl.LightningModule, callback: str) -> None:
    """At ``on_fit_start`` (after ``configure_model``): the copy taken at ``setup`` must hold every weight of the
    model (not so when ``configure_model`` builds layers); fake-quant layers converted since are rebuilt at export."""
    if template is None:
        return
    copied = {name for name, _ in template.named_parameters()}
    quantizer_prefixes = tuple(f"{name}." for name, _ in quantizers(pl_module))
    missing = [
        name
        for name, _ in pl_module.named_parameters()
        if name not in copied and not name.startswith(quantizer_prefixes)
    ]
    if missing:
        raise ValueError(
            f"{callback}'s `export_path` exports the whole model at the end of a sharded fit, rebuilt from the module "
            f"as it was at `setup`, but {missing[:3]} did not exist then (built in `configure_model`?). Build the "
            "layers in `__init__` and only shard them in `configure_model`, or export a compressed file "
            "(export_path='model.lcz')."
        )


def export_at_fit_end(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    path: Path,
    compacted: bool = False,
    template: nn.Module | None = None,
    calibration: list[Any] | None = None,
) -> CompressionReport | None:
    """Write the model (unchanged) to ``path`` on global rank zero; ``.onnx`` gives ONNX, anything else our format.

    ``compacted``: export a compacted copy (pruned channels removed); the model in training keeps its shapes.
    A model sharded by FSDP2 is gathered by every process into a compressed file; rank zero writes it, or, with
    a ``template`` (:func:`export_template`), loads it into the template and exports that (ONNX, compacted).
    ``calibration``: batches of inputs an ONNX export measures float convolution outputs on (``None`` or empty:
    not measured).

    Every process waits for rank zero, so the file exists on return from ``fit`` in all of them, and gets its
    report; an export that fails on rank zero raises there and, instead of leaving the others waiting, in every
    other process too.
    """
    error: Exception | None = None
    report = None
    try:
        report = _export_on_rank_zero(trainer, pl_module, path, compacted, template, calibration or None)
    except Exception as exc:  # said to every process below, then raised here
        error = exc
    if trainer.strategy.reduce_boolean_decision(error is not None, all=False) and error is None:
        raise RuntimeError(f"Writing `export_path`={str(path)!r} failed in another process: see its error.")
    if error is not None:
        raise error
    if trainer.world_size > 1:  # every process returns rank zero's report (trial BU: `None` on the others)
        report = trainer.strategy.broadcast(report, src=0)
    return report


class ValidationInputs:
    """What the LightningModule's ``forward`` receives in a fit's validation (the last one's first ``limit``
    calls), each like ``example_input_array`` (a tensor, a tuple of positional tensors, or a dict of keyword ones),
    on the CPU in float32: the batches an ONNX ``export_path`` measures float convolution outputs on
    (``export_onnx``'s ``calibration``). A ``validation_step`` that does not call ``self(...)`` leaves none."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.batches: list[Any] = []
        self._hook: Any = None
        self._wanted: Any = None  # the signature of `example_input_array`

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path | None) -> None:
        """At a validation's start: record it, when it is a fit's (not the sanity check) and ``path`` is ONNX."""
        self.stop()
        example = pl_module.example_input_array
        if path is not None and _is_onnx(path) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.batches = []
            self._wanted = _signature(example_inputs(pl_module)) if example is not None else None
            self._hook = pl_module.register_forward_pre_hook(self._record, with_kwargs=True)

    def take(self) -> list[Any]:
        """The batches recorded, handed over once."""
        self.stop()
        batches, self.batches = self.batches, []
        return batches

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep a call whose inputs are like ``example_input_array``: the graph takes no other (trial BT: padded
        sequences, uint8 images; trial BU: under DDP Lightning calls the module with ``(batch, batch_idx)`` to reach
        ``validation_step``, which took half the budget)."""
        if len(self.batches) >= self.limit or (args and kwargs):
            return
        # the forms Lightning calls `forward` with `example_input_array` in: `(**dict)`, `(*tuple)` or `(tensor)`;
        # `self(x=x)` for a one-tensor example too (trial BV: a tuple example, or a keyword call, recorded nothing)
        forms: list[Any] = [kwargs, *kwargs.values()][: 1 + (len(kwargs) == 1)] if kwargs else [args, *args[:1]]
        inputs = next((form for form in forms if _signature(form) == self._wanted), None)
        if inputs is None:
            return
        self.batches.append(
            apply_to_collection(
                inputs, Tensor, lambda t: t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()
            )
        )


def _export_on_rank_zero(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    path: Path,
    compacted: bool,
    template: nn.Module | None,
    calibration: list[Any] | None,
) -> CompressionReport | None:
    path.parent.mkdir(parents=True, exist_ok=True)  # every process: the sharded file is written by all of them
    if any(is_sharded(p) for p in pl_module.parameters()):  # (trial BU: FSDP2 failed after training without it)
        if template is None:
            report = save_compressed(pl_module, path)  # every process gathers; rank zero writes
            rank_zero_info(f"Exported the compressed model:\n{report}")
            return report
        with tempfile.TemporaryDirectory() as staging:
            staged = Path(staging) / "gathered.lcz"
            save_compressed(pl_module, staged)  # every process gathers; rank zero writes
            if trainer.global_rank != 0:
                return None
            dtypes = {name: t.dtype for name, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]}
            load_compressed(materialize_(template, "cpu", dtypes), staged)  # the dtypes of the trained model
        return _export(template, path, move_data_to_device(example_inputs(pl_module), "cpu"), compacted, calibration)
    if trainer.global_rank != 0:
        return None
    model: nn.Module = pl_module
    if compacted or (_is_onnx(path) and _low_precision(pl_module)):
        model = copy.deepcopy(pl_module)  # LightningModule.__getstate__ drops the trainer
    return _export(model, path, example_inputs(pl_module), compacted, calibration)


def _is_onnx(path: Path) -> bool:
    """An ONNX path: ``.onnx`` in any case (a trial's ``model.ONNX`` received a compressed file)."""
    return path.suffix.lower() == ".onnx"


def _low_precision(model: nn.Module) -> bool:
    """Whether ``model`` holds floating-point weights other than float32 (bfloat16/float16, or float64 under
    ``precision="64-true"``; beside int4 group scales, which are float16 values): ONNX graphs are float32."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return any(t.is_floating_point() and t.dtype != torch.float32 and "_fake_quant." not in n for n, t in tensors)


def _signature(value: Any) -> Any:
    """What an input must share with ``example_input_array`` to feed the exported graph: its structure (dict keys,
    sequence lengths), each tensor's kind (floating point, which the graph takes as float32, or its dtype) and sizes
    but the batch's (the graph fixes them); other values by type."""
    if isinstance(value, Tensor):
        return ("float" if value.is_floating_point() else str(value.dtype), tuple(value.shape[1:]))
    if isinstance(value, Mapping):
        return {str(k): _signature(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_signature(v) for v in value]
    return type(value).__name__


def _export_onnx(model: nn.Module, path: Path, example: Any, calibration: list[Any] | None) -> CompressionReport:
    """``export_onnx`` with the recorded inputs as ``calibration``; inputs it cannot run cost the measurement, not
    the file (written without it, with a warning)."""
    if calibration is not None:  # on the CPU, where onnxruntime reads them
        try:
            return export_onnx(model, path, example, calibration=calibration)
        except ValueError as err:
            if "`calibration`" not in str(err):
                raise
            rank_zero_warn(f"The ONNX export is written without measuring convolution outputs: {err}")
    return export_onnx(model, path, example)


def _export(
    model: nn.Module, path: Path, example: Any, compact_first: bool, calibration: list[Any] | None = None
) -> CompressionReport:
    """Compact ``model`` in place if asked, then write it to ``path`` (``model`` is a copy or the template when it
    is compacted or, for ONNX, cast to float32: ONNX graphs are float32, with int8/int4 weights, and a float32
    copy of bfloat16 weights holds exactly their values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_onnx(path) and _low_precision(model):
        model.float()
        example = apply_to_collection(example, Tensor, lambda t: t.float() if t.is_floating_point() else t)
    if compact_first:
        rank_zero_info(f"Compacted the exported copy:\n{compact(model, example)}")
    onnx = _is_onnx(path)
    report = _export_onnx(model, path, example, calibration) if onnx else save_compressed(model, path)
    rank_zero_info(f"Exported the compressed model:\n{report}")
    return report
