"""ONNX export of a fake-quantized model: int8 weights, QuantizeLinear/DequantizeLinear on activations.

The model is traced in :func:`~lightning_compress.core.qat.export_mode` (constant scales, the
quantized weights as constants), which the exporter turns into QDQ pairs. Each
``QuantizeLinear(float weight) -> DequantizeLinear`` pair is then replaced by an int8 initializer
holding the codes (computed with the package's rounding rule) feeding the DequantizeLinear: the
file carries 1 byte per weight and onnxruntime fuses the pattern into its int8 kernels, as it does
for its own ``quantize_static`` output. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import importlib
import re
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import check_int, check_module, check_output_path, first_line, is_integer
from ..core.int4 import int4_export_mode
from ..core.qat import export_mode, qat_modules, quantizers
from ..core.sharding import is_sharded
from ..core.tracing import buffers_kept, check_example_inputs, forward_state_kept, fresh_containers, without_cache
from ..core.wrappers import eager, uncompiled
from .container import replacing
from .onnx_batch import GraphCheck, batch_size, example_error, graph_note, max_error, other_batch
from .onnx_calibration import float_output_convs, measure_ranges, quantize_conv_outputs
from .onnx_composites import composite_ops, pyg_extreme_aggregations
from .onnx_pads import pad_quantized_codes
from .onnx_passes import (
    GraphIndex,
    bias_shifts,
    fold_batch_norms,
    gather_quantized_rows,
    integer_float_gemms,
    keep_biases_in_int32,
    quantize_before_pass_through,
    unsigned_integers,
)
from .onnx_sharing import share_identical_constants, share_transposed_initializers
from .onnx_tracing import (
    as_args,
    check_batched,
    check_inputs_carried,
    check_names,
    check_traceable,
    composite_attention,
    listed,
    tensor_leaves,
    trace_error,
    tracing_call,
    unread_entries,
    unwrapped,
)
from .report import CompressionReport, LayerReport
from .state_entries import check_traceable_state

__all__ = ["check_traceable", "export_onnx"]


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"export_onnx needs `{name}`: install the extra with pip install 'lightning-compress[onnx]'."
        ) from err


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 17,
    dynamic_axes: Mapping[str, Mapping[int, str | None]] | None = None,
    accuracy_level: int = 0,
    calibration: Iterable[Any] | None = None,
    weight_type: str = "uint8",
) -> CompressionReport:
    """Export ``model`` to an ONNX file with int8 weights (int4 group weights) and a dynamic batch dimension.

    Layers with 4-bit weights in groups of a power of two >= 16 input weights
    (``QuantConfig(weight_bits=4, group_size=32)``) become onnxruntime's ``MatMulNBits`` (the int4
    kernel LLM runtimes use; ``accuracy_level=4`` lets it quantize activations to int8 per block, the
    runtime's form of per-token int8 activations); the other fake-quant layers become int8 Q/DQ.

    Args:
        model: a model converted by :func:`~lightning_compress.convert_to_qat` (or trained with
            ``QuantizationAwareTraining``); float layers are exported as they are.
        path: the ``.onnx`` file to write.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors; the
            first dimension of each is the batch. A dict's values that hold no tensor (``return_dict=False``,
            ``None``) are passed to every call as they are, constants of the graph.
        input_names: names of the graph inputs (default ``input_0, ...`` or the keys of a dict's tensors).
        output_names: names of the graph outputs (default ``output_0, ...``), one per tensor of what ``forward``
            returns, tuples, lists and dicts flattened in order.
        opset: ONNX opset (13 or newer for per-channel quantization).
        dynamic_axes: more dynamic dimensions per input or output name, on top of the batch (dimension 0),
            e.g. ``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}, "output_0": {1: "sequence"}}``;
            another name for dimension 0 replaces ``"batch"``, and ``None`` makes a dimension static (a PyTorch
            Geometric model: ``{"input_0": {0: "nodes"}, "input_1": {0: None, 1: "edges"}, "output_0": {0:
            "nodes"}}`` for ``x`` and ``edge_index``).
        accuracy_level: ``MatMulNBits``' compute type for int4 layers: ``0`` (float activations, W4A16)
            or ``4`` (int8 activations, quantized by onnxruntime per block).
        calibration: batches of inputs, each like ``example_inputs`` (e.g. a few hundred validation samples), on
            which the range of each quantized convolution's output that no quantized layer reads first (before a
            residual add, a GroupNorm, global pooling, a convolutional head) is measured, as onnxruntime's
            ``quantize_static`` does: that output gets a uint8 Q/DQ pair, one more rounding, and onnxruntime runs
            the convolution in int8 (``QLinearConv``) instead of in float on dequantized inputs (slower than the
            float model). ``None``: such convolutions keep float outputs, with a warning.
        weight_type: how the 8-bit codes are stored. ``"uint8"`` (default): each weight code plus 128 with a zero
            point of 128 (and signed activations likewise), the same values, which onnxruntime multiplies with its
            u8u8 kernels, exact on every CPU. ``"int8"``: the codes as they are, for its u8s8 kernels, faster where
            the CPU has VNNI (AVX512-VNNI, AVX-VNNI) but wrong on x86 CPUs with AVX2 alone, which add pairs of
            products in int16 and saturate (onnxruntime's ``quantize_static`` writes this form).

    Returns:
        A :class:`CompressionReport` of the quantized weights and the file size.

    Raises:
        ImportError: ``onnx`` is not installed (``pip install 'lightning-compress[onnx]'``).
        ValueError: ``model``'s parameters are sharded (FSDP2).
    """
    # the TorchScript exporter cannot trace compiled modules; the tracer's and the checks' forwards leave no buffer
    # changed (trial FQ: a module counting its calls in a buffer went from 0 to 4, on an export refused too)
    with uncompiled(unwrapped(model)) as plain, buffers_kept(plain):
        return _export_onnx(
            plain, path, example_inputs, input_names=input_names, output_names=output_names, opset=opset,
            dynamic_axes=dynamic_axes, accuracy_level=accuracy_level, calibration=calibration, weight_type=weight_type,
        )  # fmt: skip


def _export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    opset: int,
    dynamic_axes: Mapping[str, Mapping[int, str | None]] | None,
    accuracy_level: int,
    calibration: Iterable[Any] | None,
    weight_type: str,
) -> CompressionReport:
    check_module(model, materialized=True)
    if weight_type not in ("uint8", "int8"):
        raise ValueError(f"`weight_type` must be 'uint8' (exact on every CPU) or 'int8', got {weight_type!r}.")
    if calibration is not None and (
        isinstance(calibration, (Tensor, Mapping, str)) or not isinstance(calibration, Iterable)
    ):
        raise TypeError(
            "`calibration` must be an iterable of batches, each like `example_inputs` (e.g. a list of tensors), or "
            f"None, got {type(calibration).__name__}."
        )
    if isinstance(calibration, (list, tuple)):  # checked even where no convolution needs it (a trial: [1, 2] passed)
        odd = [type(b).__name__ for b in calibration if not isinstance(b, (Tensor, Mapping, list, tuple))]
        if odd:
            raise ValueError(f"`calibration` holds {odd[:3]}: each batch must be like `example_inputs`.")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "`model` is a TorchScript module: export_onnx traces the eager model; pass it before `torch.jit.script`."
        )
    path = check_output_path(path)
    for argument, names_given in (("input_names", input_names), ("output_names", output_names)):
        if names_given is not None and (
            isinstance(names_given, str) or not all(isinstance(n, str) for n in listed(names_given, argument))
        ):
            raise TypeError(f"`{argument}` must be a list of strings or None, got {names_given!r}.")
    check_int(opset, "opset", minimum=13)
    check_int(accuracy_level, "accuracy_level")
    if dynamic_axes is not None and not (
        isinstance(dynamic_axes, Mapping)
        and all(
            isinstance(k, str)
            and isinstance(v, Mapping)
            and all(is_integer(d) and int(d) >= 0 and (n is None or isinstance(n, str)) for d, n in v.items())
            for k, v in dynamic_axes.items()
        )
    ):
        raise TypeError(
            "`dynamic_axes` must map input/output names to {dimension: name or None} dicts, e.g. "
            f"{{'input_ids': {{1: 'sequence'}}}}, got {dynamic_axes!r}."
        )
    sharded = next((name for name, p in model.named_parameters() if is_sharded(p)), None)
    if sharded is not None:
        raise ValueError(
            f"export_onnx traces a whole model, but {type(model).__name__}'s parameters are sharded (FSDP2; "
            f"{sharded!r}): set the callback's `export_path='model.onnx'` (it gathers the model and exports it on "
            "rank 0), or call save_compressed(model, 'model.lcz') on every process, then load_compressed it into "
            "an unsharded instance of the model and export that."
        )
    check_traceable_state(model)
    onnx = _require("onnx")
    from onnx import numpy_helper

    check_inputs_carried(example_inputs)  # (before the tuple it is read as: a PyTorch Geometric `Batch` is none)
    args = as_args(example_inputs)
    if isinstance(example_inputs, dict):  # values holding no tensor (`return_dict=False`) are graph constants
        names = list(input_names or [k for k, v in example_inputs.items() if tensor_leaves(v, "")])
    else:
        names = list(input_names or [f"input_{i}" for i in range(len(args))])
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"`accuracy_level`={accuracy_level!r} is not one of MatMulNBits' levels 0..4.")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    low = sorted(  # float16 group scales are values, not the model's dtype; float64 has no QuantizeLinear kernel
        {
            str(t.dtype)
            for n, t in tensors
            if t.is_floating_point() and t.dtype != torch.float32 and "_fake_quant." not in n
        }
    )
    if low:
        raise ValueError(
            f"export_onnx writes float32 graphs, but {type(model).__name__} has {low} tensors: export a float32 copy "
            "(`copy.deepcopy(model).float()`; int4 group scales stay float16 values) or call `model.float()` first."
        )
    check_example_inputs(model, example_inputs)  # a forward that fails names them, not the tracer's stack
    extremes = pyg_extreme_aggregations(model)
    if extremes:
        warnings.warn(
            f"export_onnx: {extremes[:3]}{' ...' if len(extremes) > 3 else ''} aggregate by max or min through "
            "PyTorch Geometric's `scatter`, which takes a path of its own while torch exports to ONNX: it starts from "
            "zero, so the graph gives max(0, ·) (min(0, ·)) of each node's messages, wrong wherever they are all "
            "negative (positive). Aggregate by mean or sum to export, or keep the model as the compressed file.",
            UserWarning,
            stacklevel=3,
        )
    grouped = any(q.groups and q.fake_quant_enabled for _, q in quantizers(model))
    mode = int4_export_mode(model, accuracy_level) if grouped else export_mode(model)
    keyword = isinstance(example_inputs, dict)  # keyword arguments, as Lightning calls a module with a dict
    traced_model, traced_args, keys, leaf_names = tracing_call(model, example_inputs)
    if leaf_names is not None:
        names = list(input_names or leaf_names)
    check_batched(traced_args, names)
    with (
        mode as swapped,
        eager(model),
        without_cache(model),
        # a cache the traced forwards fill is taken back (PyG's cached GCNConv: trial FE); no dispatch mode, which
        # the exporter's tracer cannot run under
        forward_state_kept(model, parameters=False),
        torch.no_grad(),
        composite_attention(),
        composite_ops(),
        warnings.catch_warnings(),
    ):
        if accuracy_level and not (grouped and swapped):  # trial DE: level 4 was dropped in silence
            warnings.warn(
                f"export_onnx: `accuracy_level`={accuracy_level} has no effect: it is MatMulNBits' compute type, and "
                f"no layer of {type(model).__name__} exports as MatMulNBits (4-bit weights in groups of a power of "
                "two >= 16 input weights).",
                UserWarning,
                stacklevel=3,
            )
        # the activation scales are read as Python numbers on purpose: they are the graph's constants
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"lightning_compress\.")
        # the exporter is this function's choice (its QDQ layout), not the caller's: torch's notice is not for them
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export")
        with unread_entries(model) as unread:  # left out of the baseline: the graph holds none of them
            called = fresh_containers(args)  # the graph's template stays as given (trial GC: a forward adding a key)
            outputs = model(**called[0]) if keyword else model(*called)
        n_out = len(tensor_leaves(outputs, "output"))  # the exporter flattens tuples, lists and dicts into its outputs
        # dimension 0 named otherwise, or static, for an input (a graph's nodes and edges): not a batch to cut
        renamed = any(0 in dict((dynamic_axes or {}).get(name, {})) for name in names)
        # checked at the example whatever the axes (trial GF: PyTorch Geometric's documented axes turned the check off,
        # and a graph 1.36 off its model was written unsaid); at another batch where dimension 0 is the batch
        batch_check = _graph_check(model, traced_model, traced_args, outputs, names, other=not renamed)
        outs = list(output_names or [f"output_{i}" for i in range(n_out)])
        check_names(names, outs, len(traced_args), n_out, dynamic_axes)
        traced = path.with_name(f".{path.name}.{secrets.token_hex(6)}.traced")  # no file of the user's taken over
        try:
            torch.onnx.export(
                traced_model,
                fresh_containers(traced_args),  # copies: a forward writing into its inputs leaves the example as given
                str(traced),
                input_names=names,
                output_names=outs,
                dynamic_axes=_axes(names + outs, dynamic_axes),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
                custom_opsets={"com.microsoft": 1} if grouped and swapped else None,  # MatMulNBits' domain
            )
        except (RuntimeError, AssertionError) as err:  # the exporter's (an operator it lacks, a SymbolicValueError,
            # a symbolic's assertion: trial EQ's GLM-4, 'All tensors must have the same rank'), or the model's
            traced.unlink(missing_ok=True)
            raise trace_error(err, model, example_inputs, opset) from err
    try:
        proto = onnx.load(str(traced))
    finally:
        traced.unlink(missing_ok=True)
    held = {init.name for init in proto.graph.initializer}  # read where the watch cannot see (a scripted function)
    unread[:] = [key for key in unread if key not in held]
    known = [name for name, _ in qat_modules(model)]
    layers = _int8_weights(proto, numpy_helper, known) + _int4_reports(swapped if isinstance(swapped, dict) else {})
    fold_batch_norms(proto, numpy_helper)
    quantize_before_pass_through(proto, numpy_helper)
    integer_float_gemms(proto, numpy_helper)
    keep_biases_in_int32(proto, numpy_helper)
    if weight_type == "uint8":
        unsigned_integers(proto, numpy_helper)  # the passes before read int8 codes; exact kernels on every x86 CPU
    pad_quantized_codes(proto, numpy_helper)  # after the zero points' last change
    gather_quantized_rows(proto, numpy_helper)
    share_transposed_initializers(proto, numpy_helper)
    by_key = keyword and leaf_names is None  # plain keyword tensors, fed by key; nested ones by their leaves' names
    order = (
        keys if by_key else [name for name, _ in tensor_leaves(args, "input")]
    )  # the graph's inputs, as the example's
    modes = {q.mode for _, q in quantizers(model)}
    # a fixed-point model's calibrated outputs get power-of-two scales too (trial CO: range / 255 scales in it)
    power_of_two = modes == {"power_of_two"}
    # the graph before its calibrated output pairs (None without them): what they add is told by the self-check below
    uncalibrated = _quantize_float_conv_outputs(proto, numpy_helper, calibration, order, by_key, power_of_two)
    _warn_about_moved_biases(bias_shifts(proto, numpy_helper))
    share_identical_constants(proto, numpy_helper)  # last: a tied int4 embedding and head read one copy of the codes
    onnx.checker.check_model(proto)
    with replacing(path) as tmp:
        onnx.save(proto, str(tmp))
    note = graph_note(path, batch_check) if batch_check is not None else None
    if batch_check is not None and uncalibrated is not None:
        note = _calibration_note(path, batch_check, *uncalibrated, note is not None) or note
    if note is not None:
        warnings.warn(f"export_onnx: {note}", UserWarning, stacklevel=3)
    # "onnx-int4" only when a layer is stored in 4 bits (trial EJ: 8-bit, 2-bit or odd groups export float weights,
    # and the report said int4 of a file larger than the float model's `torch.save`)
    return CompressionReport.of_file(path, "onnx-int4" if grouped and swapped else "onnx", layers, model, unread)


def _axes(names: list[str], given: Mapping[str, Mapping[int, str | None]] | None) -> dict[str, dict[int, str]]:
    """The exporter's dynamic axes: dimension 0 of every input and output is ``"batch"`` unless ``given`` names it
    otherwise, or ``None`` (static: a graph's ``edge_index`` is ``(2, edges)``), with ``given``'s other dimensions."""
    out = {}
    for name in names:
        axes = {0: "batch", **dict((given or {}).get(name, {}))}
        out[name] = {int(dim): label for dim, label in axes.items() if label is not None}
    return out


def _graph_check(
    model: nn.Module,
    traced_model: nn.Module,
    traced_args: tuple[Any, ...],
    outputs: Any,
    names: Sequence[str],
    other: bool = True,
) -> GraphCheck | None:
    """What :func:`~.onnx_batch.graph_note` compares: the graph's inputs and the model's outputs at the example, and
    (``other``, where dimension 0 of every input is the batch) at another batch (one more forward of the model; where
    the model does not run there itself, a note saying the batch was not checked). ``None`` where there is nothing
    to compare: a model in training mode (another forward would move its BatchNorm statistics; dropout draws
    anew)."""
    tensors = list(traced_args)
    if any(m.training for m in model.modules()):
        return None
    batch = batch_size(tensors) if all(isinstance(t, Tensor) for t in tensors) else None
    expected = [t for _, t in tensor_leaves(outputs, "output")]
    quantized = bool(quantizers(model))  # any: a rounding tolerance, never a false alarm
    try:  # a model that draws random numbers in eval mode (Reformer's LSH) cannot be compared with its graph
        again = traced_model(*fresh_containers(tensors))  # (trial GD: an in-place scale doubled the caller's input)
        random = max_error([t for _, t in tensor_leaves(again, "output")], expected) or 0.0
    except Exception:
        random = 0.0
    if batch is None or not other:  # no batch dimension to cut (a graph's nodes and edges): the example alone
        return GraphCheck(tensors, expected, batch or 0, quantized, names=names, random=random)
    others = other_batch(tensors, batch)
    try:
        expected_others = [t for _, t in tensor_leaves(traced_model(*fresh_containers(others)), "output")]
    except Exception as err:  # trial ER: an LSTM given (h0, c0), whose batch is their dimension 1
        first = first_line(err, 200)
        skipped = (
            f"the model does not run on its example cut to {'its first sample' if batch > 1 else 'two copies'} along "
            f"dimension 0 of every input ({type(err).__name__}: {first}), so the dynamic batch the graph declares "
            "(dimension 0 of every input and output) was not checked: where an input holds the batch in another "
            "dimension (an LSTM's `(h0, c0)`, a sequence-first input), the graph runs only at the example's sizes "
            "there; give `dynamic_axes` for that dimension, or serve it at the example's sizes."
        )
        return GraphCheck(tensors, expected, batch, quantized, skipped=skipped, names=names, random=random)
    return GraphCheck(tensors, expected, batch, quantized, others, expected_others, names=names, random=random)


_CALIBRATION_GROWTH = 4.0  # calibrated outputs that multiply the graph's error on the example by more than this ...
_CALIBRATION_SHARE = 0.02  # ... to more than this share of the largest output are said (int8 rounding: ~0.1-1%)


def _calibration_note(path: Path, check: GraphCheck, uncalibrated: Any, count: int, wrong: bool) -> str | None:
    """A note where the ``count`` convolution outputs quantized on ``calibration`` add most of the graph's error on the
    example: the graph at ``path`` is beyond what rounding explains (``wrong``, trial FV: a depth head 1.78 off outputs
    up to 2.72, 9e-7 without; the exporter was blamed), or more than ``_CALIBRATION_GROWTH`` times as far from the
    model as the same graph without them, and by more than ``_CALIBRATION_SHARE`` of the largest output (trial FW:
    calibrated on batches a fifth of the served data's scale, 3.6% against 0.10%, said nowhere)."""
    import onnx

    found = example_error(path, check)
    plain = path.with_name(f".{path.name}.{secrets.token_hex(6)}.uncalibrated")
    try:
        onnx.save(uncalibrated, str(plain))
        without = example_error(plain, check)
    finally:
        plain.unlink(missing_ok=True)
    if found is None or without is None or without[0] > found[0] / 2:
        return None
    grew = found[0] > _CALIBRATION_GROWTH * without[0] and found[0] > _CALIBRATION_SHARE * found[1]
    if not (wrong or grew):
        return None
    return (
        f"the graph's outputs on the example differ from the model's by {found[0]:.3g} (of outputs up to "
        f"{found[1]:.3g}), and by {without[0]:.3g} without the output quantization of the {count} convolution(s) "
        "whose ranges were measured on `calibration`: an output beyond those batches' range is clipped, and each "
        "adds a rounding. Calibrate on batches like the data the graph will serve (more of them), or pass "
        "`calibration=None` (those convolutions then run in float, slower; the callbacks' ONNX `export_path` always "
        "calibrates, on the fit's last validation inputs: call `export_onnx` after `fit` to export without)."
    )


def _quantize_float_conv_outputs(
    proto: Any, numpy_helper: Any, calibration: Iterable[Any] | None, order: list[str], keyword: bool,
    power_of_two: bool = False,
) -> tuple[Any, int] | None:  # fmt: skip
    """Give the convolutions with float outputs a quantized output, from ranges measured on ``calibration``
    (:mod:`.onnx_calibration`); without batches, say how many run in float. ``order``: the example's keyword
    inputs (``keyword``), or the names of its tensors (dict keys, else positions), in the graph's order.
    ``power_of_two``: the model quantizes with power-of-two scales only, and so do these outputs. Returns a copy of
    the graph before them and how many outputs were quantized; ``None`` where none was (no copy is made)."""
    kept: list[str] = []  # those whose outputs reach the model's: float, with calibration too
    weights: set[bytes] = set()
    convs = float_output_convs(proto, numpy_helper, kept, weights)
    calls = f" ({len(convs)} calls: the forward calls them in a loop)" if len(convs) > len(weights) else ""
    if calibration is None and kept and not convs:
        warnings.warn(  # trial FY: a ResNet returning its last feature map ran 3 of 5 convolutions in float, unsaid
            f"export_onnx: {len(kept)} quantized convolution(s) whose outputs reach the model's outputs through no "
            "quantized layer keep float outputs (so that no calibration range clips what the model returns): "
            "onnxruntime runs them in float on dequantized inputs, which can be slower than the float model.",
            UserWarning,
            stacklevel=4,
        )
    if not convs:
        return None
    if calibration is None:
        warnings.warn(
            f"export_onnx: {len(weights)} quantized convolution(s){calls} have outputs no quantized layer reads first "
            "(before a residual add, a concatenation, a norm other than BatchNorm, or global pooling)"
            + (f", and {len(kept)} more reach the model's outputs (float either way)" if kept else "")
            + ": "
            "onnxruntime runs them in float on dequantized inputs, which can be slower than the float model. Pass "
            "`calibration` (a few batches of inputs) to `export_onnx` to measure their output ranges, so that they run "
            "in int8 (the "
            "callbacks' ONNX `export_path` passes the inputs `forward` received in the fit's last validation, those "
            "like `example_input_array`: none here).",
            UserWarning,
            stacklevel=4,
        )
        return None
    names = [i.name for i in proto.graph.input]
    feeds = [_feed(number, batch, names, order, keyword) for number, batch in enumerate(calibration)]
    if not feeds:
        raise ValueError("`calibration` holds no batch: pass at least one, or None.")
    try:
        ranges = measure_ranges(proto, convs, feeds)
    except Exception as err:  # onnxruntime's: a shape the graph does not take (a dynamic axis not declared)
        raise ValueError(f"`calibration` batches do not run in the exported graph: {str(err)[:300]}") from err
    uncalibrated = type(proto)()
    uncalibrated.CopyFrom(proto)
    quantize_conv_outputs(proto, numpy_helper, ranges, power_of_two)
    return uncalibrated, len(ranges)


def _holds_dict(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_dict(item) for item in value)


def _feed(number: int, batch: Any, names: list[str], order: list[str], keyword: bool) -> dict[str, Any]:
    """Calibration batch ``number`` as onnxruntime's feed for the graph inputs ``names``: keyword inputs by their
    keys, the tensors of a nested input by the names of the example's (``order``: a dict's keys, in any order, other
    keys left out; trial BT: reordered keys were fed to the wrong inputs, trial BV: with `input_names` too), else in
    order."""
    like = "each batch must be like `example_inputs`"
    if keyword:
        missing = [k for k in order if not isinstance(batch, Mapping) or k not in batch]
        if missing:
            raise ValueError(f"`calibration` batch {number} lacks the keyword input(s) {missing}: {like}.")
        tensors = [batch[k] for k in order]
    else:
        try:
            leaves = tensor_leaves(as_args(batch), "input")
        except TypeError as err:  # not a tensor, tuple or dict
            raise ValueError(f"`calibration` batch {number} is a {type(batch).__name__}: {like}.") from err
        named = dict(leaves)
        unique = len(named) == len(leaves) and len(set(order)) == len(order)
        if _holds_dict(batch) and unique and all(name in named for name in order):  # named by dict keys
            tensors = [named[name] for name in order]
        else:
            tensors = [t for _, t in leaves]
    if len(tensors) != len(names) or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(
            f"`calibration` batch {number} holds {len(tensors)} tensor(s) where the graph takes {len(names)} "
            f"({names}): {like}."
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors, strict=True)}


def _int4_reports(swapped: dict[str, Any]) -> list[LayerReport]:
    """One row per packed weight: layers tied to one weight (an embedding and its output head) read one copy of the
    codes in the graph, counted once, under the first name (trial EB: twice, a total above the float model's)."""
    first: dict[int, tuple[str, Any]] = {}
    for name, w in swapped.items():
        first.setdefault(id(w.weight), (name, w))
    return [
        LayerReport(
            name=f"{name}.weight",
            numel=int(w.weight.numel()),
            nonzero=int(w.weight.count_nonzero()),
            bits=4,
            bytes_before=int(w.weight.numel()) * 4,
            bytes_after=w.nbytes,
            index_coding="dense",
        )
        for name, w in first.values()
    ]


_BIAS_SHIFT_SAID = 0.1  # of an output step: about one output code in ten flips where a bias moves that far


def _warn_about_moved_biases(shifts: Mapping[str, float]) -> None:
    """Say which float biases onnxruntime's integer kernels move far enough to change outputs (:func:`bias_shifts`;
    trial DN: a 2-bit CNN's ONNX changed 48 of 540 predictions). ``quantize_bias=True`` trains with the bias on the
    kernels' grid."""
    moved = {name: shift for name, shift in shifts.items() if shift >= _BIAS_SHIFT_SAID}
    if moved:
        names = sorted(moved, key=moved.__getitem__, reverse=True)
        warnings.warn(
            f"export_onnx: onnxruntime's integer kernels add the biases of {names[:3]}{' ...' * (len(names) > 3)} as "
            "int32 codes on the grid weight scale x input scale, which moves them by up to "
            f"{max(moved.values()):.2f} of their output's quantization step (coarse weight scales: weights under 8 "
            "bits), so the ONNX outputs differ from the model's. Train with `quantize_bias=True` (the model then adds "
            "the biases the runtime adds).",
            UserWarning,
            stacklevel=4,
        )


def _int8_weights(proto: Any, numpy_helper: Any, known: Sequence[str] = ()) -> list[LayerReport]:
    """Replace ``QuantizeLinear(constant)`` by an int8 initializer; return one report per weight, named by the
    model's layer (``known``: the fake-quant layers' qualified names). An input quantizer's constant (an activation
    the exporter folded) is replaced too, and is not reported."""
    import numpy as np

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, consumers = index.constants, index.consumers
    reports: list[LayerReport] = []
    remove: list[Any] = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or not all(name in constants for name in node.input):
            continue
        weight = constants[node.input[0]].astype(np.float32)
        scale = constants[node.input[1]].astype(np.float32)
        zero_point = constants[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale, dtype=np.int8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis % weight.ndim] = -1
        inv = (np.float32(1.0) / scale).reshape(shape)
        codes = np.rint(weight * inv) + zero_point.astype(np.float32).reshape(shape)
        info = np.iinfo(zero_point.dtype)
        codes = np.clip(codes, info.min, info.max).astype(zero_point.dtype)
        name = index.fresh(node.input[0] + "_quantized")  # identical constants share one input name
        graph.initializer.append(numpy_helper.from_array(codes, name))
        for dq in consumers.get(node.output[0], []):
            dq.input[0] = name
        remove.append(node)
        if re.search(r"/input_fake_quant(_\d+)?/", node.name):
            continue  # an activation the exporter folded to a constant (DeBERTa's position embeddings): not a weight
        reports.append(
            LayerReport(
                name=_layer_name(node.input[0], known),
                numel=int(weight.size),
                nonzero=int(np.count_nonzero(codes)),
                bits=8,
                bytes_before=int(weight.size) * 4,
                bytes_after=int(codes.size) + int(scale.size) * 4,
                index_coding="dense",
            )
        )
    for node in remove:
        graph.node.remove(node)
    index.drop_unused("Constant")  # the float weights the int8 initializers replaced
    return reports


def _layer_name(onnx_name: str, known: Sequence[str] = ()) -> str:
    """``/net/net.0/weight_fake_quant/Constant_output_0`` -> ``net.0.weight``: the scopes before the weight's
    quantizer, joined as the longest of ``known`` they end with (the exporter may add a wrapper's scope in front;
    Llama's ``/model/model/layers.0/self_attn/q_proj/...`` is ``model.layers.0.self_attn.q_proj``), or the one of
    ``known`` (in module order) to end with them (an ``nn.ModuleDict`` adds no scope; the exporter numbers a repeated
    scope, ``weight_fake_quant_1``, in the order the layers run), else the innermost scope (which repeats from block
    to block)."""
    parts = [p for p in onnx_name.split("/") if p]
    at = next((i for i, p in enumerate(parts) if re.fullmatch(r"weight_fake_quant(_\d+)?", p)), None)
    if not at:  # no quantizer scope, or nothing before it
        return onnx_name
    repeat = int(parts[at].rpartition("_")[2]) if parts[at] != "weight_fake_quant" else 0
    scopes = parts[:at]
    names = set(known)
    merged: list[str] = []  # a child's scope may repeat its parent's name: `layer/layer.0` is `layer.0` (a trial:
    for part in scopes:  # HF ResNet's stages.1 convolutions were reported as stages.0's)
        if merged and part.startswith(merged[-1] + "."):
            merged[-1] = part
        else:
            merged.append(part)
    for candidate in (merged, scopes):
        for first in range(len(candidate)):
            joined = ".".join(candidate[first:])
            if joined in names:
                return joined + ".weight"
    for first in range(len(scopes)):  # a container the exporter names no scope for (nn.ModuleDict: `/l1/` of
        joined = ".".join(scopes[first:])  # `layers.l1`)
        ending = [name for name in known if name.endswith("." + joined)]
        if repeat < len(ending):
            return ending[repeat] + ".weight"
    return scopes[-1] + ".weight"
