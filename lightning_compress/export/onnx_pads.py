"""Padding between quantized layers in an int8 ONNX graph: the integer codes are padded, not their float values.

``transformers``' MobileNetV1 pads before each convolution (TensorFlow's "SAME"), as other ports of TensorFlow
models do: ``Conv -> Clip -> Pad -> Q -> DQ -> Conv``. The quantization moves before the ``Pad``
(:func:`~.onnx_passes.quantize_before_pass_through`), so the convolution before it runs as an integer kernel, and
:func:`pad_quantized_codes` then pads the codes.
"""

from __future__ import annotations

from typing import Any

from .onnx_passes import GraphIndex

__all__ = ["pad_quantized_codes"]


def pad_quantized_codes(proto: Any, numpy_helper: Any) -> None:
    """Rewrite ``DequantizeLinear -> Pad -> QuantizeLinear`` of one per-tensor scale and zero point as a ``Pad`` of
    the codes: copies of codes (``reflect``, ``edge``, ``wrap``), or the code ``QuantizeLinear`` gives the padding
    value (the zero point for 0), rounded as it rounds: exactly the codes the float form gives. onnxruntime 1.32 runs
    the float form as written, a dequantization, a float pad and a quantization between two integer kernels."""
    import numpy as np
    from onnx import helper

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, producer, consumers = index.constants, index.producer, index.consumers

    def params(node: Any) -> tuple[Any, Any] | None:
        # both given: without a zero point, a DequantizeLinear's codes are of its input's type, which is not known
        names = list(node.input[1:3])
        if len(names) < 2 or not all(name and name in constants for name in names):
            return None
        return constants[names[0]], constants[names[1]]

    # nodes named by their output (unique in a graph): a float Pad's, the Pad of codes that takes its place; the
    # QuantizeLinear nodes after them, removed
    replaced: dict[str, Any] = {}
    removed: set[str] = set()
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        dq, users = producer.get(pad.input[0]), consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        before, after = params(dq), params(q)
        if before is None or after is None or len(pad.input) < 2:  # opset < 11: pads in attributes
            continue
        (scale, zero), (scale_q, zero_q) = before, after
        alike = scale.size == zero.size == 1 and scale_q.size == zero_q.size == 1 and zero.dtype == zero_q.dtype
        if not (alike and float(scale) == float(scale_q) and int(zero) == int(zero_q)):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        code = ""
        if mode == "constant":
            given = len(pad.input) > 2 and pad.input[2]
            if given and pad.input[2] not in constants:
                continue
            value = np.float32(constants[pad.input[2]].reshape(()) if given else 0.0)
            info = np.iinfo(zero.dtype)
            rounded = np.round(value / np.float32(scale.reshape(()))) + int(zero)  # half to even, as ONNX rounds
            code = index.fresh(f"{pad.output[0]}_code")
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(np.clip(rounded, info.min, info.max), zero.dtype), code)
            )
        inputs = [dq.input[0], pad.input[1], code, *pad.input[3:4]]
        while inputs and not inputs[-1]:
            inputs.pop()
        name = index.fresh(f"{pad.name or 'Pad'}_codes")
        replaced[pad.output[0]] = helper.make_node("Pad", inputs, [q.output[0]], name=name, mode=mode)
        removed.add(q.output[0])
    if replaced:  # one pass over the nodes, in their order (the Pad of codes where the float one was)
        nodes = []
        for node in graph.node:
            first = node.output[0] if node.output else ""
            if first not in removed:
                kept = type(node)()
                kept.CopyFrom(replaced.get(first, node))
                nodes.append(kept)
        graph.ClearField("node")
        graph.node.extend(nodes)
    index.drop_unused("DequantizeLinear", "Constant")  # and the float padding value
