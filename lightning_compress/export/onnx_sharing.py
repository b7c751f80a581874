"""Tensors an exported ONNX graph holds twice, stored once: the file smaller, the values and kernels the same.

An exporter writes each use of a weight as a constant of its own: a tied embedding and output head (GPT-2's ``wte``
and ``lm_head``) give a matrix and its transpose in float, or, in int4, the packed codes and scales that
``GatherBlockQuantized`` and ``MatMulNBits`` read, twice over. The second copy becomes a ``Transpose`` or ``Reshape``
of the first, which onnxruntime folds when it loads the model.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["share_identical_constants", "share_transposed_initializers"]


def share_transposed_initializers(proto: Any, numpy_helper: Any, min_size: int = 4096) -> None:
    """Store once a float matrix the graph holds twice, as itself and transposed (of ``min_size`` entries or more).

    A weight used both ways, a tied embedding and output head (GPT-2's ``wte`` and ``lm_head``), is stored twice:
    the exporter folds the transpose into a constant of its own (trial: a tied LM's file twice the embedding's size).
    The transposed copy becomes a ``Transpose`` of the other, which onnxruntime folds again when it loads the
    model: the same values and kernels, the file one copy smaller.
    """
    import numpy as np
    from onnx import TensorProto, helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    # the fake-quantized float weights of an int4 export's fallback are Constant nodes (trial DT: a tied table twice)
    constants_as_initializers(graph, 4 * min_size)
    matrices = [
        init
        for init in graph.initializer
        if len(init.dims) == 2 and init.data_type == TensorProto.FLOAT and init.name not in inputs
        and init.dims[0] * init.dims[1] >= min_size
    ]  # fmt: skip
    by_shape: dict[tuple[int, int], list[Any]] = {}
    for init in matrices:
        by_shape.setdefault((int(init.dims[0]), int(init.dims[1])), []).append(init)
    replaced: set[str] = set()
    for init in matrices:
        if init.name in replaced:
            continue
        partners = [p for p in by_shape.get((int(init.dims[1]), int(init.dims[0])), []) if p is not init]
        if not partners:
            continue
        transposed = numpy_helper.to_array(init).T
        for other in partners:
            if other.name in replaced or not np.array_equal(numpy_helper.to_array(other), transposed):
                continue
            replaced.add(other.name)
            graph.initializer.remove(other)
            graph.node.insert(0, helper.make_node("Transpose", [init.name], [other.name], perm=[1, 0]))


def share_identical_constants(proto: Any, numpy_helper: Any, min_bytes: int = 256) -> None:
    """Store once the constants (initializers and ``Constant`` nodes, of ``min_bytes`` or more) that hold the same
    values in the same order, whatever their shapes: the others become a ``Reshape`` of the first (an ``Identity``
    when the shapes are equal too). Graph inputs and outputs are left alone."""
    from onnx import helper

    graph = proto.graph
    kept_names = {i.name for i in graph.input} | {o.name for o in graph.output}
    constants_as_initializers(graph, min_bytes)
    candidates = [i for i in graph.initializer if i.name not in kept_names and _size(i) >= min_bytes]
    sizes: dict[tuple[int, int], int] = {}
    for init in candidates:  # only constants of a type and size another has are read and hashed
        sizes[(init.data_type, _size(init))] = sizes.get((init.data_type, _size(init)), 0) + 1
    first: dict[tuple[int, bytes], Any] = {}
    for init in candidates:
        if sizes[(init.data_type, _size(init))] < 2:
            continue
        key = (init.data_type, hashlib.sha256(numpy_helper.to_array(init).tobytes()).digest())
        kept = first.setdefault(key, init)
        if kept is init:
            continue
        graph.initializer.remove(init)
        if list(kept.dims) == list(init.dims):
            graph.node.insert(0, helper.make_node("Identity", [kept.name], [init.name]))
            continue
        shape = numpy_helper.from_array(_int64(list(init.dims)), f"{init.name}_shape")
        graph.initializer.append(shape)
        graph.node.insert(0, helper.make_node("Reshape", [kept.name, shape.name], [init.name]))


def constants_as_initializers(graph: Any, min_bytes: int) -> None:
    """Turn the ``Constant`` nodes of ``min_bytes`` or more (a graph output's excepted) into initializers of the same
    name: the same values, read by the passes that look at initializers."""
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        tensor = node.attribute[0].t
        if node.output[0] in outputs or _size(tensor) < min_bytes:
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)


def _size(tensor: Any) -> int:
    """Bytes of a tensor's values (raw or in typed fields)."""
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count  # typed fields: at least one byte each


def _int64(values: list[int]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.int64)
