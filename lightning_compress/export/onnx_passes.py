"""Rewrites of an exported ONNX graph that let onnxruntime run the quantized layers as integer kernels.

Each pass reads the graph through one :class:`GraphIndex` and keeps values exactly (up to float
rounding): they move or fold quantization, never change what is computed; :func:`keep_biases_in_int32` coarsens only
the weights of a channel whose bias the integer kernels could not hold, by less than that bias's precision.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GraphIndex",
    "bias_shifts",
    "fold_batch_norms",
    "gather_quantized_rows",
    "integer_float_gemms",
    "keep_biases_in_int32",
    "quantize_before_pass_through",
    "unsigned_integers",
]


class GraphIndex:
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
            for name in _names_read(node):  # a Loop or If also reads what its bodies read from this scope
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

    def single_reader_chain(self, name: str, op_types: set[str], shapes_read: bool = False) -> list[Any]:
        """The nodes of ``op_types`` from ``name`` back, nearest first, while each one's output has no other
        reader: the ops a quantization can move across without changing what another node reads. ``shapes_read``:
        readers of only the shape (``Shape``, ``Size``) do not count; a quantization keeps the shape."""
        chain = []
        node = self.producer.get(name)
        while node is not None and node.op_type in op_types and len(self.readers(node.output[0], shapes_read)) == 1:
            chain.append(node)
            node = self.producer.get(node.input[0])
        return chain

    def readers(self, name: str, shapes_read: bool = False) -> list[Any]:
        """The nodes reading ``name``; with ``shapes_read``, not those that read only its shape."""
        found = self.consumers.get(name, [])
        return [n for n in found if n.op_type not in _SHAPE_READERS] if shapes_read else found

    def drop_unused(self, *op_types: str) -> None:
        """Remove nodes of ``op_types`` whose output nothing reads, then unread initializers."""
        graph = self.graph
        used = {name for node in graph.node for name in _names_read(node)} | self.outputs
        for node in [n for n in graph.node if n.op_type in op_types and n.output[0] not in used]:
            graph.node.remove(node)
        used = {name for node in graph.node for name in _names_read(node)} | self.outputs
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _names_read(node: Any) -> set[str]:
    """The names ``node`` reads: its inputs, and those the graphs in its attributes (a ``Loop``'s or ``If``'s
    bodies) read from the enclosing scope (a trial: an ``EmbeddingBag``'s Loop body read a weight and constants that
    were dropped as unused)."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {out for n in body.node for out in n.output}
            inner |= {i.name for i in body.input} | {init.name for init in body.initializer}
            names |= {name for n in body.node for name in _names_read(n)} - inner
    return names


def fold_batch_norms(proto: Any, numpy_helper: Any) -> None:
    """Fold ``BatchNormalization`` into the int8 ``Conv`` before it, exactly.

    With per-channel weight scales, scaling channel ``c`` by ``k_c = gamma / sqrt(var + eps)``
    only changes its scale: the int8 codes stay, the scale becomes ``s_c * k_c`` and the bias
    ``(b - mean) * k_c + beta``. The Conv can then run as an int8 kernel.
    """
    import numpy as np

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
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


# a Pad leaves the values it keeps alone and adds constants (or copies), which the quantization after it rounds
_PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad"}
_SHAPE_READERS = {"Shape", "Size"}  # ops that read a tensor's shape, not its values
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}  # pure data movement, commuting with any quantization


def quantize_before_pass_through(proto: Any, numpy_helper: Any) -> None:
    """Copy each activation QuantizeLinear/DequantizeLinear pair in front of the ops it commutes with.

    Max pooling and reshapes commute with a monotonic quantization, so
    ``x -> MaxPool -> Flatten -> Q -> DQ`` equals ``x -> Q -> DQ -> MaxPool -> Flatten -> Q -> DQ``
    value for value; the second form lets onnxruntime run the layer producing ``x`` as an int8
    kernel with an int8 output. So does a ``Pad``: the values it keeps are already quantized, and those it adds are
    rounded by the quantization after it as before (trial DV: ``transformers``' MobileNetV1 pads before each
    convolution, TensorFlow's "SAME", and every convolution ran in float, 11x slower than the float model).
    """
    from onnx import helper

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, consumers = index.constants, index.consumers
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if not all(name in constants for name in q.input[1:]):
            continue
        # readers of only the shape do not count (trial EC: CvT's `view` of a convolution's output reads its shape,
        # so its projections' convolutions kept float outputs, and `calibration` rounded them twice)
        chain = index.single_reader_chain(q.input[0], _PASS_THROUGH, shapes_read=True)
        if not chain:
            continue
        first = chain[-1]
        head = first.input[0]
        if len(index.readers(head, shapes_read=True)) != 1:
            continue
        name = index.fresh(f"{head}_requantized")
        params = [f"{name}_scale", f"{name}_zero_point"][: len(q.input) - 1]
        graph.initializer.extend(
            numpy_helper.from_array(constants[src], dst) for src, dst in zip(q.input[1:], params, strict=True)
        )
        new_q = helper.make_node("QuantizeLinear", [head, *params], [name + "_q"])
        new_dq = helper.make_node("DequantizeLinear", [name + "_q", *params], [name])
        first.input[0] = name
        shapes = [r for r in consumers.get(head, []) if r.op_type in _SHAPE_READERS]
        for reader in shapes:  # the shape from the dequantized copy: the Q is the head's one reader
            reader.input[0] = name
        nodes = list(graph.node)
        position = min(nodes.index(node) for node in [first, *shapes])  # before every node that reads the copy
        graph.node.insert(position, new_dq)
        graph.node.insert(position, new_q)


def integer_float_gemms(proto: Any, numpy_helper: Any) -> None:
    """Rewrite ``Gemm(DQ(uint8 x), DQ(int8 W))`` with a float output as ``MatMulInteger -> Cast -> Mul -> Add``.

    onnxruntime fuses a QDQ ``Gemm`` into its int8 ``QGemm`` only when the output is quantized
    again; a model's last layer (float logits) would otherwise run in float on dequantized weights.
    ``MatMulInteger`` is standard ONNX; integer accumulation is exact, so the values equal the
    float Gemm's up to float rounding. The weight may be stored either way round (``transB`` 1 for
    ``nn.Linear``, 0 for a ``transformers`` Conv1D, scaled along its second axis), and reshapes
    between the activation's DequantizeLinear and the Gemm (a Conv1D flattens its input) move onto
    the integer tensor: a per-tensor scale commutes with them.
    """
    import numpy as np
    from onnx import TensorProto, helper

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
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
        transposed = attrs.get("transB", 0)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        if attrs.get("beta", 1.0) != 1.0 or requantized(gemm.output[0]):
            continue
        reshapes = index.single_reader_chain(gemm.input[0], _RESHAPES)
        dq_a = producer.get(reshapes[-1].input[0] if reshapes else gemm.input[0])
        dq_b = producer.get(gemm.input[1])
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
        out_axis = 0 if transposed else 1  # the axis of the weight's output channels
        axis = next((helper.get_attribute_value(a) for a in dq_b.attribute if a.name == "axis"), 1)
        if w_scale.size != 1 and (w_scale.size != weight.shape[out_axis] or axis % 2 != out_axis):
            continue
        integer_input = dq_a.input[0]
        if reshapes:  # the reshapes read the integer tensor; their float input stays for its other readers
            reshapes[-1].input[0] = integer_input
            integer_input = reshapes[0].output[0]
            for user in consumers.get(dq_a.output[0], []):
                if user.op_type == "Shape":  # the shape the reshape reads: the integer tensor has it too
                    user.input[0] = dq_a.input[0]
        base = gemm.output[0]
        keys = ("wt", "wzp", "a_scale", "w_scale", "scale", "int", "float", "scaled")
        names = {k: index.fresh(f"{base}_{k}") for k in keys}
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(weight.T if transposed else weight), names["wt"]),
                numpy_helper.from_array(np.zeros(weight.shape[out_axis], np.int8), names["wzp"]),
                numpy_helper.from_array(a_scale.reshape(()), names["a_scale"]),
                numpy_helper.from_array(w_scale, names["w_scale"]),
            ]
        )
        has_bias = len(gemm.input) > 2 and gemm.input[2]
        integer_inputs = [integer_input, names["wt"], dq_a.input[2], names["wzp"]]
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


def unsigned_integers(proto: Any, numpy_helper: Any) -> None:
    """Store every int8 code of the graph as uint8 with a zero point of 128: the same values, other kernels.

    onnxruntime multiplies uint8 activations by int8 weights (its "u8s8" kernels) with ``vpmaddubsw`` on x86 CPUs
    without VNNI (AVX2 only), which adds each pair of products in int16 and saturates: a pair beyond 32,767 is cut,
    and the outputs are wrong (trial DK: a 16-32-4 MLP's outputs off by 0.18 of 0.74; trials DK and DN: the digits
    example's ONNX logits off by up to 4.1, 3 predictions changed; a lone ``MatMulInteger`` off by up to 164,039).
    Its "u8u8" kernels widen to int16 first and are exact. So an int8 weight (a ``DequantizeLinear`` of a constant,
    symmetric: zero point 0) becomes ``code + 128`` with zero point 128, a ``MatMulInteger``'s int8 weight the same
    with one scalar zero point (a per-column one takes a slower kernel), and a signed activation's
    ``QuantizeLinear``/``DequantizeLinear`` pair (power-of-two activations with negative values) gets its zero
    point plus 128: ``round(x / s) + z`` and the clamp move together, so every dequantized value is unchanged.
    """
    import numpy as np

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, consumers = index.constants, index.consumers

    def shifted(values: Any, name: str) -> str:
        fresh = index.fresh(f"{name}_u8")
        graph.initializer.append(numpy_helper.from_array((values.astype(np.int16) + 128).astype(np.uint8), fresh))
        return fresh

    def zero_of(node: Any, at: int, like: Any) -> Any:
        return constants[node.input[at]] if len(node.input) > at and node.input[at] else np.zeros_like(like, np.int8)

    done: dict[tuple[str, str], tuple[str, str]] = {}  # a weight read by several nodes is stored once
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and all(name in constants for name in node.input):
            codes, scale = constants[node.input[0]], constants[node.input[1]]
            if codes.dtype != np.int8 or np.any(zero_of(node, 2, scale) != 0):
                continue
            key = (node.input[0], node.input[1])
            if key not in done:
                zero = index.fresh(f"{node.input[0]}_u8_zero_point")
                graph.initializer.append(numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), zero))
                done[key] = (shifted(codes, node.input[0]), zero)
            del node.input[2:]
            node.input[0] = done[key][0]
            node.input.append(done[key][1])
        elif node.op_type == "MatMulInteger" and node.input[1] in constants:
            weight = constants[node.input[1]]
            if weight.dtype != np.int8 or np.any(zero_of(node, 3, weight[0]) != 0):
                continue
            zero = index.fresh(f"{node.input[1]}_u8_zero_point")
            graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zero))
            node.input[1] = shifted(weight, node.input[1])
            while len(node.input) < 4:
                node.input.append("")
            node.input[3] = zero
        elif node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in constants:
            old = node.input[2]
            users = consumers.get(node.output[0], [])
            if constants[old].dtype != np.int8 or not all(
                user.op_type in ("DequantizeLinear", "MatMulInteger") and user.input[0] == node.output[0]
                and len(user.input) > 2 and user.input[2] == old
                for user in users
            ):  # fmt: skip
                continue
            new = shifted(constants[old], old)
            for user in [node, *users]:
                user.input[2] = new
    index.drop_unused("Identity")  # the exporter forwards a shared int8 zero point through one


def gather_quantized_rows(proto: Any, numpy_helper: Any) -> None:
    """Rewrite ``Gather(DequantizeLinear(int8 table), ids)`` as ``DequantizeLinear(Gather(int8 table, ids))``.

    A quantized embedding exports as a dequantization of the whole table followed by a lookup:
    onnxruntime then dequantizes every row at every call (tens of millions of values for a BERT
    vocabulary) to read a few. Looking up the int8 rows first and dequantizing only those (with
    their per-row scales looked up too) gives the same values.
    """
    import numpy as np
    from onnx import TensorProto, helper

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, producer = index.constants, index.producer
    for gather in [n for n in graph.node if n.op_type == "Gather"]:
        if next((a.i for a in gather.attribute if a.name == "axis"), 0) != 0:
            continue
        dq = producer.get(gather.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(n in constants for n in dq.input):
            continue
        codes, scale = constants[dq.input[0]], constants[dq.input[1]]
        zero = constants[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(scale, dtype=codes.dtype)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        per_row = scale.ndim == 1 and scale.size == codes.shape[0] and axis % codes.ndim == 0
        if codes.ndim != 2 or zero.size == 0 or np.any(zero != zero.flat[0]) or not (scale.size == 1 or per_row):
            continue  # one zero point for every row (0, or 128 for uint8 codes: `unsigned_integers`)
        base = gather.output[0]
        keys = ("rows", "float", "centred", "zero", "scales", "row_scales", "axes", "column")
        names = {k: index.fresh(f"{base}_{k}") for k in keys}
        nodes = [helper.make_node("Gather", [dq.input[0], gather.input[1]], [names["rows"]], axis=0)]
        if per_row:
            graph.initializer.extend(
                [
                    numpy_helper.from_array(scale.astype(np.float32), names["scales"]),
                    numpy_helper.from_array(np.array([-1], np.int64), names["axes"]),
                    numpy_helper.from_array(np.array(zero.flat[0], np.float32), names["zero"]),
                ]
            )
            nodes += [
                helper.make_node("Cast", [names["rows"]], [names["float"]], to=TensorProto.FLOAT),
                helper.make_node("Sub", [names["float"], names["zero"]], [names["centred"]]),
                helper.make_node("Gather", [names["scales"], gather.input[1]], [names["row_scales"]], axis=0),
                helper.make_node("Unsqueeze", [names["row_scales"], names["axes"]], [names["column"]]),
                helper.make_node("Mul", [names["centred"], names["column"]], [base]),
            ]
        else:
            nodes.append(helper.make_node("DequantizeLinear", [names["rows"], *dq.input[1:]], [base]))
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)
    index.drop_unused("DequantizeLinear")


_INT32_ROOM = 2.0**29  # the largest |bias| / (s_w * s_x) left as it is: int32 with room for the rounding


def keep_biases_in_int32(proto: Any, numpy_helper: Any) -> None:
    """Give each int8 ``Conv``/``Gemm`` a weight scale under which its bias fits onnxruntime's int32 bias.

    onnxruntime runs ``DequantizeLinear -> Conv/Gemm`` as ``QLinearConv``/``QGemm`` with the float bias as int32 codes
    ``round(b / (s_w * s_x))``. Where that overflows (a channel whose weights are zero or tiny: pruned, a BatchNorm
    weight of 0 folded in, learned scales at their floor; or an input whose range is tiny) the bias came out as
    ``-2**31 * s_w * s_x`` whatever its sign. Such a channel gets the scale ``|b| / (s_x * 2**29)`` (for power-of-two
    scales the next power of two) and its weight codes are requantized to it: the change of its weights is smaller
    than the bias grid's step, and the bias is kept to 2**-29 of itself.
    """
    import numpy as np

    graph = proto.graph
    index = GraphIndex(graph, numpy_helper)
    constants, producer = index.constants, index.producer
    for node in [n for n in graph.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or not node.input[2] or node.input[2] not in constants:
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue  # the exporter's Linear is Gemm(x, W^T): weights as (out, in), per-channel along axis 0
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if not all(n in constants for n in (*x_dq.input[1:2], *w_dq.input)) or len(w_dq.input) < 2:
            continue
        codes = constants[w_dq.input[0]]
        s_x = float(np.asarray(constants[x_dq.input[1]], dtype=np.float64).reshape(-1)[0])
        s_w = np.asarray(constants[w_dq.input[1]], dtype=np.float64).reshape(-1)
        bias = np.asarray(constants[node.input[2]], dtype=np.float64).reshape(-1)
        zero = np.asarray(constants[w_dq.input[2]]) if len(w_dq.input) > 2 and w_dq.input[2] else np.zeros(1)
        offset = {"int8": 0, "uint8": 128}.get(str(codes.dtype))  # int8 codes, or stored as uint8 (`unsigned_integers`)
        if offset is None or np.any(zero != offset) or s_w.size != bias.size or s_x <= 0.0:
            continue  # per-channel int8 weights (what export_onnx writes), a per-tensor input scale
        needed = np.abs(bias) / (s_x * _INT32_ROOM)
        move = needed > np.abs(s_w)  # a folded BatchNorm's negative weight gives a negative scale
        if not move.any():
            continue
        size = np.abs(s_w)
        power_of_two = bool(np.all(size > 0) and np.all(np.log2(size) == np.round(np.log2(size))))
        magnitude = np.exp2(np.ceil(np.log2(needed, where=move, out=np.ones_like(needed)))) if power_of_two else needed
        new = np.where(move, np.where(s_w < 0, -magnitude, magnitude), s_w)
        # channels that keep their scale keep their codes (a pruned channel's scale is 0: 0 / 0 warned, trial BX)
        ratio = np.divide(s_w, new, out=np.ones_like(s_w), where=move).reshape((-1,) + (1,) * (codes.ndim - 1))
        signed = np.clip(np.round((codes.astype(np.float64) - offset) * ratio), -127, 127)
        requantized = (signed + offset).astype(codes.dtype)
        names = (index.fresh(f"{w_dq.input[0]}_int32bias"), index.fresh(f"{w_dq.input[1]}_int32bias"))
        graph.initializer.extend(
            [numpy_helper.from_array(requantized, names[0]), numpy_helper.from_array(new.astype(np.float32), names[1])]
        )
        w_dq.input[0], w_dq.input[1] = names
    index.drop_unused()


def bias_shifts(proto: Any, numpy_helper: Any) -> dict[str, float]:
    """How far onnxruntime's integer kernels move each float bias, in steps of the output's quantization.

    A ``Conv``/``Gemm`` on dequantized inputs and weights whose output is quantized again (directly or through a
    ``Relu``/``Clip``) runs as ``QLinearConv``/``QGemm``, which adds the bias as int32 codes on the grid
    ``s_w * s_x``: each bias moves to the nearest grid point. Returned per node name: the largest move over its
    channels, divided by the output's scale (an output code flips with about that probability); other nodes keep their
    float bias (a ``MatMulInteger`` adds it after the integer product) and are left out.
    """
    import numpy as np

    index = GraphIndex(proto.graph, numpy_helper)
    constants, producer, consumers = index.constants, index.producer, index.consumers

    def output_scale(name: str) -> float | None:
        users = consumers.get(name, [])
        scales = []
        for user in users:
            if user.op_type == "QuantizeLinear" and len(user.input) > 1 and user.input[1] in constants:
                scales.append(float(np.asarray(constants[user.input[1]]).reshape(-1)[0]))
            elif user.op_type in ("Relu", "Clip") and (inner := output_scale(user.output[0])) is not None:
                scales.append(inner)
            else:
                return None
        return min(scales) if scales else None

    shifts: dict[str, float] = {}
    for node in [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or node.input[2] not in constants:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if not all(n in constants for n in (x_dq.input[1], w_dq.input[1])):
            continue
        step = output_scale(node.output[0])
        if step is None or step <= 0.0:
            continue
        s_x = float(np.asarray(constants[x_dq.input[1]], dtype=np.float64).reshape(-1)[0])
        grid = np.abs(np.asarray(constants[w_dq.input[1]], dtype=np.float64).reshape(-1)) * s_x
        bias = np.asarray(constants[node.input[2]], dtype=np.float64).reshape(-1)
        if grid.size not in (1, bias.size) or not np.all(grid > 0):
            continue
        moved = np.abs(bias - np.round(bias / grid) * grid)
        shifts[node.name or node.output[0]] = float(moved.max() / step)
    return shifts
