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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.int4 import int4_export_mode
from ..core.qat import export_mode, quantizers
from ..core.structure import without_cache
from .report import CompressionReport, LayerReport

__all__ = ["export_onnx"]


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"export_onnx needs `{name}`: install the extra with pip install 'lightning-compress[onnx]'."
        ) from err


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return (dict(example_inputs),)  # a trailing dict: keyword arguments
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError(
        f"`example_inputs` must be a Tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}."
    )


class _Keywords(nn.Module):
    """Calls ``model(**{name: tensor})`` from positional tensors: the tracer passes inputs positionally."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 17,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    accuracy_level: int = 0,
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
            first dimension of each is the batch.
        input_names: names of the graph inputs (default ``input_0, ...`` or the dict keys).
        output_names: names of the graph outputs (default ``output_0, ...``).
        opset: ONNX opset (13 or newer for per-channel quantization).
        dynamic_axes: more dynamic dimensions per input or output name, on top of the batch (dimension 0),
            e.g. ``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}, "output_0": {1: "sequence"}}``.
        accuracy_level: ``MatMulNBits``' compute type for int4 layers: ``0`` (float activations, W4A16)
            or ``4`` (int8 activations, quantized by onnxruntime per block).

    Returns:
        A :class:`CompressionReport` of the quantized weights and the file size.

    Raises:
        ImportError: ``onnx`` is not installed (``pip install 'lightning-compress[onnx]'``).
    """
    onnx = _require("onnx")
    from onnx import numpy_helper

    args = _as_args(example_inputs)
    if isinstance(example_inputs, Mapping):
        names = list(input_names or example_inputs.keys())
    else:
        names = list(input_names or [f"input_{i}" for i in range(len(args))])
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"`accuracy_level`={accuracy_level!r} is not one of MatMulNBits' levels 0..4.")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    low = sorted(  # float16 group scales are values, not the model's dtype
        {str(t.dtype) for n, t in tensors if t.dtype in (torch.bfloat16, torch.float16) and "_fake_quant." not in n}
    )
    if low:
        raise ValueError(
            f"export_onnx writes float32 graphs, but {type(model).__name__} has {low} tensors: export a float32 copy "
            "(`copy.deepcopy(model).float()`; int4 group scales stay float16 values) or call `model.float()` first."
        )
    grouped = any(q.groups and q.fake_quant_enabled for _, q in quantizers(model))
    mode = int4_export_mode(model, accuracy_level) if grouped else export_mode(model)
    with mode as swapped, without_cache(model), torch.no_grad():
        outputs = model(**args[0]) if isinstance(example_inputs, Mapping) else model(*args)
        n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        outs = list(output_names or [f"output_{i}" for i in range(n_out)])
        path = Path(path)
        traced = path.with_name(path.name + ".traced")
        keyword = isinstance(example_inputs, Mapping)
        try:
            torch.onnx.export(
                _Keywords(model, names) if keyword else model,
                tuple(example_inputs[k] for k in names) if keyword else args,
                str(traced),
                input_names=names,
                output_names=outs,
                dynamic_axes={name: {0: "batch", **dict((dynamic_axes or {}).get(name, {}))} for name in names + outs},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
                custom_opsets={"com.microsoft": 1} if grouped else None,
            )
        except torch.onnx.errors.UnsupportedOperatorError as err:
            traced.unlink(missing_ok=True)
            raise ValueError(
                f"export_onnx cannot trace {type(model).__name__}: {str(err).splitlines()[0]} What to change: "
                "for a `transformers` decoder (GPT-2, Llama), pass `attention_mask` along with `input_ids` in "
                "`example_inputs` (the mask built without one uses operators the exporter lacks); otherwise "
                "replace that operator in the model's forward, or try a newer `opset`."
            ) from err
    try:
        proto = onnx.load(str(traced))
    finally:
        traced.unlink(missing_ok=True)
    layers = _int8_weights(proto, numpy_helper) + _int4_reports(swapped if isinstance(swapped, dict) else {})
    _fold_batch_norms(proto, numpy_helper)
    _quantize_before_pass_through(proto, numpy_helper)
    _integer_float_gemms(proto, numpy_helper)
    onnx.checker.check_model(proto)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return CompressionReport.of_file(path, "onnx-int4" if grouped else "onnx", layers, model)


def _int4_reports(swapped: dict[str, Any]) -> list[LayerReport]:
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
        for name, w in swapped.items()
    ]


def _int8_weights(proto: Any, numpy_helper: Any) -> list[LayerReport]:
    """Replace ``QuantizeLinear(constant weight)`` by an int8 initializer; return one report per weight."""
    import numpy as np

    graph = proto.graph
    index = _GraphIndex(graph, numpy_helper)
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
        reports.append(
            LayerReport(
                name=_layer_name(node.input[0]),
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


class _GraphIndex:
    """One index of an ONNX graph for every rewrite pass: constant values, producers, consumers.

    Constants are initializers, ``Constant`` nodes and ``Identity`` nodes forwarding a constant
    (the exporter de-duplicates initializers that way). Built at the start of a pass; a pass that
    rewires nodes ends with :meth:`drop_unused`.
    """

    def __init__(self, graph: Any, numpy_helper: Any) -> None:
        self.graph = graph
        self.constants: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:  # topological order: an Identity follows what it forwards
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
            elif node.op_type == "Identity" and node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.names = {init.name for init in graph.initializer} | set(self.producer)

    def fresh(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... if taken: new initializers never collide."""
        candidate, i = name, 0
        while candidate in self.names:
            i += 1
            candidate = f"{name}_{i}"
        self.names.add(candidate)
        return candidate

    def drop_unused(self, *op_types: str) -> None:
        """Remove nodes of ``op_types`` whose output nothing reads, then unread initializers."""
        graph = self.graph
        used = {name for node in graph.node for name in node.input} | self.outputs
        for node in [n for n in graph.node if n.op_type in op_types and n.output[0] not in used]:
            graph.node.remove(node)
        used = {name for node in graph.node for name in node.input} | self.outputs
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _fold_batch_norms(proto: Any, numpy_helper: Any) -> None:
    """Fold ``BatchNormalization`` into the int8 ``Conv`` before it, exactly.

    With per-channel weight scales, scaling channel ``c`` by ``k_c = gamma / sqrt(var + eps)``
    only changes its scale: the int8 codes stay, the scale becomes ``s_c * k_c`` and the bias
    ``(b - mean) * k_c + beta``. The Conv can then run as an int8 kernel.
    """
    import numpy as np

    graph = proto.graph
    index = _GraphIndex(graph, numpy_helper)
    constants, producer, consumers, outputs = index.constants, index.producer, index.consumers, index.outputs
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in outputs:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or len(bn.output) != 1:
            continue
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(n in constants for n in dq.input):
            continue
        if not all(n in constants for n in bn.input[1:5]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (constants[n].astype(np.float64) for n in bn.input[1:5])
        k = gamma / np.sqrt(var + eps)
        scale = constants[dq.input[1]].astype(np.float64).reshape(-1)
        if scale.size != k.size:
            continue  # per-tensor weight scale: folding would need new codes
        bias = constants[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        names = (index.fresh(f"{dq.input[1]}_bnfold"), index.fresh(f"{bn.output[0]}_bias"))
        graph.initializer.extend(
            [
                numpy_helper.from_array((scale * k).astype(np.float32), names[0]),
                numpy_helper.from_array(((bias - mean) * k + beta).astype(np.float32), names[1]),
            ]
        )
        dq.input[1] = names[0]
        if len(conv.input) > 2:
            conv.input[2] = names[1]
        else:
            conv.input.append(names[1])
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)


_PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _quantize_before_pass_through(proto: Any, numpy_helper: Any) -> None:
    """Copy each activation QuantizeLinear/DequantizeLinear pair in front of the ops it commutes with.

    Max pooling and reshapes commute with a monotonic quantization, so
    ``x -> MaxPool -> Flatten -> Q -> DQ`` equals ``x -> Q -> DQ -> MaxPool -> Flatten -> Q -> DQ``
    value for value; the second form lets onnxruntime run the layer producing ``x`` as an int8
    kernel with an int8 output.
    """
    from onnx import helper

    graph = proto.graph
    index = _GraphIndex(graph, numpy_helper)
    constants, producer, consumers = index.constants, index.producer, index.consumers
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if not all(name in constants for name in q.input[1:]):
            continue
        head = q.input[0]
        first = None
        while True:
            node = producer.get(head)
            if node is None or node.op_type not in _PASS_THROUGH or len(consumers.get(head, [])) != 1:
                break
            first = node
            head = node.input[0]
        if first is None or len(consumers.get(head, [])) != 1:
            continue
        name = index.fresh(f"{head}_requantized")
        params = [f"{name}_scale", f"{name}_zero_point"][: len(q.input) - 1]
        graph.initializer.extend(
            numpy_helper.from_array(constants[src], dst) for src, dst in zip(q.input[1:], params, strict=True)
        )
        new_q = helper.make_node("QuantizeLinear", [head, *params], [name + "_q"])
        new_dq = helper.make_node("DequantizeLinear", [name + "_q", *params], [name])
        first.input[0] = name
        position = list(graph.node).index(first)
        graph.node.insert(position, new_dq)
        graph.node.insert(position, new_q)


def _integer_float_gemms(proto: Any, numpy_helper: Any) -> None:
    """Rewrite ``Gemm(DQ(uint8 x), DQ(int8 W))`` with a float output as ``MatMulInteger -> Cast -> Mul -> Add``.

    onnxruntime fuses a QDQ ``Gemm`` into its int8 ``QGemm`` only when the output is quantized
    again; a model's last layer (float logits) would otherwise run in float on dequantized weights.
    ``MatMulInteger`` is standard ONNX; integer accumulation is exact, so the values equal the
    float Gemm's up to float rounding.
    """
    import numpy as np
    from onnx import TensorProto, helper

    graph = proto.graph
    index = _GraphIndex(graph, numpy_helper)
    constants, producer, consumers = index.constants, index.producer, index.consumers

    def requantized(name: str) -> bool:
        for user in consumers.get(name, []):
            if user.op_type == "QuantizeLinear":
                return True
            if user.op_type == "Relu" and requantized(user.output[0]):
                return True
        return False

    for gemm in [n for n in graph.node if n.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0:
            continue
        if attrs.get("beta", 1.0) != 1.0 or requantized(gemm.output[0]):
            continue
        dq_a, dq_b = producer.get(gemm.input[0]), producer.get(gemm.input[1])
        if dq_a is None or dq_b is None or dq_a.op_type != "DequantizeLinear" or dq_b.op_type != "DequantizeLinear":
            continue
        if dq_b.input[0] not in constants or not all(n in constants for n in (*dq_a.input[1:], *dq_b.input[1:])):
            continue
        weight = constants[dq_b.input[0]]
        a_scale = constants[dq_a.input[1]].astype(np.float32)
        w_scale = constants[dq_b.input[1]].astype(np.float32).reshape(-1)
        w_zero = constants[dq_b.input[2]] if len(dq_b.input) > 2 else np.zeros(1, np.int8)
        if weight.dtype != np.int8 or a_scale.size != 1 or np.any(w_zero != 0) or weight.ndim != 2:
            continue
        base = gemm.output[0]
        keys = ("wt", "wzp", "a_scale", "w_scale", "scale", "int", "float", "scaled")
        names = {k: index.fresh(f"{base}_{k}") for k in keys}
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(weight.T), names["wt"]),
                numpy_helper.from_array(np.zeros(weight.shape[0], np.int8), names["wzp"]),
                numpy_helper.from_array(a_scale.reshape(()), names["a_scale"]),
                numpy_helper.from_array(w_scale, names["w_scale"]),
            ]
        )
        has_bias = len(gemm.input) > 2 and gemm.input[2]
        integer_inputs = [dq_a.input[0], names["wt"], dq_a.input[2], names["wzp"]]
        # the scale as Mul(a_scale, w_scale): the pattern onnxruntime fuses into MatMulIntegerToFloat
        new_nodes = [
            helper.make_node("MatMulInteger", integer_inputs, [names["int"]]),
            helper.make_node("Cast", [names["int"]], [names["float"]], to=TensorProto.FLOAT),
            helper.make_node("Mul", [names["a_scale"], names["w_scale"]], [names["scale"]]),
            helper.make_node("Mul", [names["float"], names["scale"]], [names["scaled"] if has_bias else base]),
        ]
        if has_bias:
            new_nodes.append(helper.make_node("Add", [names["scaled"], gemm.input[2]], [base]))
        position = list(graph.node).index(gemm)
        graph.node.remove(gemm)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(position + offset, new)
    index.drop_unused("DequantizeLinear")


def _layer_name(onnx_name: str) -> str:
    """``/net/net.0/weight_fake_quant/Constant_output_0`` -> ``net.0.weight``."""
    parts = [p for p in onnx_name.split("/") if p]
    if "weight_fake_quant" in parts:
        index = parts.index("weight_fake_quant")
        if index > 0:
            return parts[index - 1] + ".weight"
    return onnx_name
