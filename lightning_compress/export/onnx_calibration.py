"""Output quantization of the convolutions a QAT model leaves with float outputs, from ranges measured on data.

Fake quantization puts Q/DQ pairs on the inputs of quantized layers. A convolution whose output no quantized layer
reads first (one before a residual ``Add``, a ``GroupNorm``, global pooling, or a convolutional head) keeps a float
output, and onnxruntime fuses a QDQ ``Conv`` into its int8 ``QLinearConv`` only when that output is quantized again:
such a convolution runs in float, on dequantized inputs, slower than the float model (a trial: a residual block
12.7 ms against 8.7 ms in float, 5.8 ms with onnxruntime's ``quantize_static``). Measuring each such output's range
on calibration batches, as ``quantize_static`` does, gives it a uint8 Q/DQ pair: one more rounding (a step of its
range / 255), and every convolution runs as ``QLinearConv``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .onnx_passes import GraphIndex

__all__ = ["float_output_convs", "measure_ranges", "quantize_conv_outputs"]

# activations onnxruntime fuses between a QDQ convolution and the QuantizeLinear after it (ReLU, and ReLU6 /
# Hardtanh as `Clip`: a trial's ReLU6 CNN ran as QLinearConv already and was warned about)
_CLAMPS = ("Relu", "Clip")


def float_output_convs(
    proto: Any, numpy_helper: Any, kept: list[str] | None = None, weights: set[bytes] | None = None
) -> list[str]:
    """The convolutions onnxruntime runs in float: ``Conv`` nodes that read a dequantized activation and dequantized
    int8 weights, and whose output no ``QuantizeLinear`` reads (directly or through a ``Relu`` or ``Clip``). Each is
    named by the tensor to quantize: its output, or the output of the ``Relu``/``Clip`` chain that alone reads it
    (its range is then the activation's: trial FV, a depth head's ReLU read a range of (-20.9, 0.95), 95% of its
    steps on values the ReLU drops). A convolution whose output reaches a graph output through no quantized layer
    (the model's own output, as a depth or segmentation head's, scaled or reshaped) is left out: that output keeps its
    precision, unclipped by the calibration batches' range (trial FV: depths above 0.95 were clipped, 1.78 off
    outputs up to 2.72); ``kept`` gets the outputs of those. ``weights`` gets a digest of the codes of each convolution
    found: a forward that calls one in a loop (a spiking network over its time steps: trial GL) has a node per call."""
    index = GraphIndex(proto.graph, numpy_helper)
    producer, consumers, constants = index.producer, index.consumers, index.constants

    def reaches_output(name: str) -> bool:
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if tensor in index.outputs:
                return True
            if tensor not in seen:
                seen.add(tensor)
                stack.extend(out for user in consumers.get(tensor, []) if user.op_type != "QuantizeLinear"
                             for out in user.output)  # fmt: skip
        return False

    def after_clamps(name: str) -> str:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type in _CLAMPS:
            return after_clamps(users[0].output[0])
        return name

    def requantized(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and all(
            user.op_type == "QuantizeLinear" or (user.op_type in _CLAMPS and requantized(user.output[0]))
            for user in users
        )

    found = []
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        x, w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if x is None or w is None or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
            continue
        if w.input[0] not in constants or str(constants[w.input[0]].dtype) not in ("int8", "uint8"):
            continue
        if requantized(conv.output[0]):
            continue
        if not reaches_output(conv.output[0]):
            found.append(after_clamps(conv.output[0]))
            if weights is not None:
                weights.add(hashlib.sha256(constants[w.input[0]].tobytes()).digest())
        elif kept is not None:
            kept.append(conv.output[0])
    return found


def measure_ranges(
    proto: Any, outputs: list[str], feeds: Iterable[Mapping[str, Any]]
) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of each of ``outputs`` over the batches ``feeds`` (input name -> numpy array), run by
    onnxruntime on ``proto`` with those tensors made graph outputs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    probe = type(proto)()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        values = session.run(outputs, dict(feed))
        for name, value in zip(outputs, values, strict=True):
            low, high = float(np.min(value)), float(np.max(value))
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
    return ranges


def quantize_conv_outputs(
    proto: Any, numpy_helper: Any, ranges: Mapping[str, tuple[float, float]], power_of_two: bool = False
) -> None:
    """Put a uint8 ``QuantizeLinear -> DequantizeLinear`` pair after each tensor of ``ranges`` (its range widened to
    hold 0, as ``quantize_static`` does), read by every node that read the tensor. ``power_of_two``: each scale is
    the smallest power of two that holds the range (a fixed-point model's, whose other scales are all powers of
    two), with an integer zero point as before."""
    import numpy as np
    from onnx import helper

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    for name, (low, high) in ranges.items():
        low, high = min(low, 0.0), max(high, 0.0)
        scale = np.float32(max(high - low, 1e-8) / 255.0)
        if power_of_two:
            scale = np.float32(2.0 ** math.ceil(math.log2(float(scale))))
        zero = np.uint8(np.clip(np.rint(-low / scale), 0, 255))
        params = [index.fresh(f"{name}_out_scale"), index.fresh(f"{name}_out_zero_point")]
        graph.initializer.extend(
            [numpy_helper.from_array(np.array(scale), params[0]), numpy_helper.from_array(np.array(zero), params[1])]
        )
        produced, quantized = index.fresh(f"{name}_float"), index.fresh(f"{name}_quantized")
        producer = index.producer[name]
        producer.output[list(producer.output).index(name)] = produced  # readers and graph outputs keep the name
        position = list(graph.node).index(producer) + 1
        graph.node.insert(position, helper.make_node("DequantizeLinear", [quantized, *params], [name]))
        graph.node.insert(position, helper.make_node("QuantizeLinear", [produced, *params], [quantized]))
