"""Group-wise int4 weights as onnxruntime's ``MatMulNBits`` (com.microsoft): what an LLM runtime runs.

A layer fake-quantized with 4-bit weights in groups of ``block_size`` consecutive input weights
(``QuantConfig(weight_bits=4, group_size=32)``) maps onto ``MatMulNBits`` exactly: the codes
``c`` in [-8, 7] are stored unsigned (``c + 8``, the operator's default zero point), two to a
byte, low nibble first, as ``B[N, K / block_size, block_size / 2]``; the scales are
``scales[N * K / block_size]``. While :func:`int4_export_mode` is on, each such layer computes
``x @ W_q^T + b`` (the fake-quant weights, no activation fake quantization) through an autograd
function whose ONNX form is one ``MatMulNBits`` node (plus an ``Add`` for the bias).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from .layers import restore_training
from .quant import dequantize, quantize

__all__ = ["Int4Weights", "int4_export_mode", "pack_int4_blocks"]


def pack_int4_blocks(codes: Tensor, block_size: int) -> Tensor:
    """Signed 4-bit codes ``(N, K)`` -> ``uint8 (N, K / block_size, block_size / 2)``, ``c + 8``, low nibble first."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    n, k = unsigned.shape
    pairs = unsigned.reshape(n, k // block_size, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


class _MatMulNBits(torch.autograd.Function):
    """``x @ weight^T (+ bias)`` in PyTorch; one ``com.microsoft::MatMulNBits`` node in ONNX."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        packed: Tensor,
        scales: Tensor,
        bias: Tensor | None,
        k: int,
        n: int,
        block_size: int,
        accuracy_level: int,
    ) -> Tensor:
        out = x.matmul(weight.t().to(x.dtype))
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i")
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, weight, packed, scales, bias, k: int, n: int, block_size: int, accuracy_level: int
    ):
        out = g.op(
            "com.microsoft::MatMulNBits",
            x,
            packed,
            scales,
            K_i=k,
            N_i=n,
            bits_i=4,
            block_size_i=block_size,
            accuracy_level_i=accuracy_level,
        )
        return out if bias is None else g.op("Add", out, bias)


class _GatherBlockQuantized(torch.autograd.Function):
    """``weight[ids]`` in PyTorch; one ``com.microsoft::GatherBlockQuantized`` node in ONNX, which reads the rows from
    the packed codes ``MatMulNBits`` reads (the same bytes: a tied embedding and head store them once)."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, packed: Tensor, scales: Tensor, block_size: int) -> Tensor:
        return F.embedding(ids, weight)

    @staticmethod
    @symbolic_helper.parse_args("v", "v", "v", "v", "i")
    def symbolic(g, ids, weight, packed, scales, block_size: int):  # type: ignore[no-untyped-def]
        return g.op(
            "com.microsoft::GatherBlockQuantized",
            packed,
            ids,
            scales,
            gather_axis_i=0,
            quantize_axis_i=1,
            block_size_i=block_size,
            bits_i=4,
        )


@dataclass
class Int4Weights:
    """One layer's weights in ``MatMulNBits`` form, and how to call them."""

    weight: Tensor  # (N, K) dequantized: what PyTorch computes with
    packed: Tensor  # uint8 (N, K / block, block / 2)
    scales: Tensor  # float32 (N * K / block,)
    bias: Tensor | None
    block_size: int
    accuracy_level: int
    input_quantizer: Any = None  # a static activation quantizer in export mode (Q/DQ before the matmul), or None

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4 * self.scales.numel()

    def __call__(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        n, k = self.weight.shape
        out = _MatMulNBits.apply(
            x, self.weight, self.packed, self.scales, self.bias, k, n, self.block_size, self.accuracy_level
        )
        return out

    def gather(self, ids: Tensor) -> Tensor:
        """The rows ``ids`` of the weight (an embedding's lookup), read from the packed codes in ONNX."""
        n, k = self.weight.shape
        packed = self.packed.reshape(n, k // 2)
        scales = self.scales.reshape(n, k // self.block_size)
        return cast(Tensor, _GatherBlockQuantized.apply(ids, self.weight, packed, scales, self.block_size))


def int4_weights(layer: Any, accuracy_level: int) -> Int4Weights | None:
    """The ``MatMulNBits`` form of a fake-quant layer with 4-bit group weights (``None`` if it has none)."""
    quantizer = layer.weight_fake_quant
    if not (quantizer.fake_quant_enabled and quantizer.groups and quantizer.bits == 4):
        return None
    weight = layer.weight.detach()
    if not quantizer.initialized:  # switched on and never run: the scales come from the weight, as in forward
        quantizer.observe(weight)
    rows = weight if quantizer.channel_axis == 0 else weight.t()  # (N, K)
    block = rows.shape[1] // quantizer.groups
    if block < 16 or block & (block - 1):
        return None  # MatMulNBits needs a power-of-two block of at least 16
    scale = quantizer.expanded_scale(weight.shape)
    scale = scale if quantizer.channel_axis == 0 else scale.t()
    zero = torch.zeros((), dtype=torch.int32)
    codes = quantize(rows, scale, zero, -8, 7)
    dequantized = dequantize(codes, scale, zero)
    bias = getattr(layer, "bias", None)  # an embedding has none
    bias = bias.detach().float() if bias is not None else None
    scales = quantizer.effective_scale().detach().float().reshape(-1).contiguous()
    return Int4Weights(dequantized, pack_int4_blocks(codes, block), scales, bias, block, accuracy_level)


class DequantizedWeights:
    """A group-quantized layer ``MatMulNBits`` cannot take (not 4 bits, or a block that is not a power of two
    of at least 16): ``x @ W_q^T + b`` with its fake-quantized weights as a float constant."""

    input_quantizer: Any = None  # as in Int4Weights

    def __init__(self, layer: Any) -> None:
        quantizer = layer.weight_fake_quant
        weight = quantizer(layer.weight).detach()
        self.weight = weight if quantizer.channel_axis == 0 else weight.t()  # (N, K)
        bias = getattr(layer, "bias", None)  # an embedding has none
        self.bias = bias.detach() if bias is not None else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = x.matmul(self.weight.t().to(x.dtype))
        return out if self.bias is None else out + self.bias.to(x.dtype)


def _static_input_quantizer(layer: Any) -> Any:
    """``layer``'s activation quantizer put in export mode when it has static (observed, per-tensor) ranges: its
    Q/DQ then comes before the matmul, as in the fake-quant model. Per-token ranges have no static form: ``None``
    (the activations stay float; ``accuracy_level=4`` lets onnxruntime quantize them itself)."""
    from .fake_quant import FakeQuantizer

    quantizer = getattr(layer, "input_fake_quant", None)
    if not isinstance(quantizer, FakeQuantizer) or not quantizer.fake_quant_enabled or quantizer.per_token:
        return None
    quantizer.begin_export()
    return quantizer


@contextmanager
def int4_export_mode(model: nn.Module, accuracy_level: int = 0) -> Iterator[dict[str, Int4Weights]]:
    """Every 4-bit group-quantized layer computes through ``MatMulNBits``; activations are not fake-quantized
    (``accuracy_level=4`` lets onnxruntime quantize them to int8 itself). Other group-quantized layers compute
    with their fake-quantized weights as float constants (with a warning); the rest export as int8 Q/DQ.
    Restores everything after."""
    from .qat import qat_modules

    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    swapped: dict[str, Int4Weights] = {}
    packed_by_quantizer: dict[int, Int4Weights] = {}  # layers tied to one weight share its quantizer: packed once
    dequantized: list[str] = []
    layers: list[tuple[str, Any]] = list(qat_modules(model))
    try:
        model.eval()
        model.requires_grad_(False)
        with torch.no_grad():
            for name, layer in layers:
                # an embedding reads its rows from the packed codes (GatherBlockQuantized) unless its lookup
                # renormalizes them (`max_norm`)
                lookup = isinstance(layer, nn.Embedding) and layer.max_norm is not None
                packed = None if lookup else packed_by_quantizer.get(id(layer.weight_fake_quant))
                if packed is not None:  # the codes and scales of a tied layer, with this layer's bias
                    bias = getattr(layer, "bias", None)
                    packed = dataclasses.replace(packed, bias=None if bias is None else bias.detach().float())
                elif not lookup:
                    packed = int4_weights(layer, accuracy_level)
                    if packed is not None:
                        packed_by_quantizer[id(layer.weight_fake_quant)] = packed
                weights: Int4Weights | DequantizedWeights
                if packed is not None:
                    swapped[name] = weights = packed
                elif layer.weight_fake_quant.groups and layer.weight_fake_quant.fake_quant_enabled:
                    dequantized.append(name)
                    weights = DequantizedWeights(layer)
                else:
                    layer.begin_export()
                    continue
                weights.input_quantizer = _static_input_quantizer(layer)
                layer.begin_int4(weights)
        if dequantized:
            warnings.warn(
                f"export_onnx: {dequantized} keep float weights (their fake-quantized values): MatMulNBits and "
                "GatherBlockQuantized take 4-bit groups of a power of two >= 16 input weights (and an embedding "
                "without `max_norm`).",
                UserWarning,
                stacklevel=3,
            )
        yield swapped
    finally:
        for _, layer in layers:  # both are no-ops on a layer that did not start them
            layer.end_int4()
            layer.end_export()
        restore_training(training)
        for param, flag in grads:
            param.requires_grad_(flag)
