"""Quantization arithmetic: the one place that defines rounding and clamping.

Every quantized value in this package, fake-quantized during training, stored in a compressed
file or written to ONNX, is ``q = clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)``
with the reciprocal taken in float32, and is dequantized as ``(q - zero_point) * scale``. This is
exactly what ``torch.fake_quantize_per_{tensor,channel}_affine`` compute (the tests check it bit
for bit); :func:`fake_quantize` computes it faster, with a straight-through gradient, and
:func:`quantize` / :func:`dequantize` spell out the same formula for export. Zero always maps to
an exact integer (``zero_point``), so a pruned weight stays exactly zero through quantization.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BIAS_RANGE",
    "accumulator_scale",
    "affine_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_dynamic",
    "int_range",
    "lsq_fake_quantize",
    "power_of_two_scale",
    "quantize",
    "scale_floor",
    "scale_per_element",
    "symmetric_scale",
    "symmetric_scale_fp16",
]

_EPS = torch.finfo(torch.float32).tiny
_FP16_TINY = 2.0**-24  # the smallest positive float16


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale a quantizer stores in ``dtype``: float32's smallest normal number, or float16's smallest
    positive value, 2^-24, where that would round to 0 (a model trained in ``precision="16-true"`` holds its
    quantizers' scales in float16: an all-zero row, a pruned neuron, got scale 0, and 0/0 made its outputs NaN)."""
    info = torch.finfo(dtype)
    return max(_EPS, info.smallest_normal * info.eps)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-wide integer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8.")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _shape_for(param: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """Integer codes of ``x`` (as int32): ``clamp(round(x * (1/scale)) + zp, qmin, qmax)``."""
    inv = _shape_for(1.0 / scale.float(), x, axis)
    zp = _shape_for(zero_point.float(), x, axis)
    return torch.clamp(torch.round(x.float() * inv) + zp, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """``(q - zero_point) * scale`` in float32."""
    zp = _shape_for(zero_point.to(torch.int32), q, axis)
    return (q.to(torch.int32) - zp).float() * _shape_for(scale.float(), q, axis)


# int32 codes of a bias on its accumulator's grid, bounded by the largest float32 below 2**31 so that a code
# computed in float32 always converts to int32 and back exactly
BIAS_RANGE = (-(1 << 31) + 128, (1 << 31) - 128)


def accumulator_scale(weight_scale: Tensor, input_scale: Tensor, channels: int) -> Tensor:
    """The step of a layer's accumulator, ``s_w * s_x`` per output channel (float32, ``(channels,)``): the grid
    of an int32 bias. ``weight_scale`` per channel or per tensor; ``input_scale`` per tensor.

    A channel whose weights are all zero (pruned) has the smallest weight scale there is, and ``s_w * s_x`` would
    underflow (its reciprocal is infinite, the bias NaN); its accumulator is zero whatever the grid, so its bias
    takes the input's step ``s_x`` instead."""
    weight = weight_scale.detach().float().reshape(-1)
    source = input_scale.detach().float().reshape(-1)
    product = weight * source
    product = torch.where(weight > _EPS, product, source.expand_as(product)).clamp_min(_EPS)
    return product.expand(channels) if product.numel() == 1 else product


class _FakeQuantize(torch.autograd.Function):
    """``dequantize(quantize(x))`` with the straight-through estimator (gradient 1 inside the range).

    Same arithmetic as ``torch.fake_quantize_per_{tensor,channel}_affine`` (bit for bit), several
    times faster on CPU. No data-dependent branch (no host synchronization, nothing for
    ``torch.compile`` to guard on): the range mask, when clipping is possible at all, is recomputed
    in the backward pass from the saved input.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None, may_clip: bool
    ) -> Tensor:
        s = _shape_for(scale, x, axis)
        zp = _shape_for(zero_point.to(x.dtype), x, axis)
        u = x * (1.0 / s)
        u.round_()
        if may_clip:
            u.add_(zp).clamp_(qmin, qmax).sub_(zp)
            # copies: an observer rewrites these buffers in place when a shared layer runs again in the same forward
            ctx.save_for_backward(x, scale.clone(), zero_point.clone())
            ctx.qrange = (qmin, qmax)
            ctx.axis = axis
        ctx.may_clip = may_clip
        return u.mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.may_clip:
            return grad, None, None, None, None, None, None
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = torch.round(x * (1.0 / _shape_for(scale, x, ctx.axis))) + _shape_for(zero_point.to(x.dtype), x, ctx.axis)
        return grad * ((v >= qmin) & (v <= qmax)), None, None, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    may_clip: bool = True,
) -> Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient for ``x`` (not for the scale).

    ``may_clip=False`` promises that no value falls outside the range (a symmetric scale just
    derived from ``x``'s own maximum), which skips the range check.
    """
    out = _FakeQuantize.apply(x.float(), scale.detach().float(), zero_point.detach(), qmin, qmax, axis, may_clip)
    return out.to(x.dtype)


class _DynamicFakeQuantize(torch.autograd.Function):
    """Fake quantization with a range taken from the data itself: the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        zp = zero_point.to(x.dtype)
        u = x * (1.0 / scale)
        return u.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return grad, None, None, None, None


def fake_quantize_dynamic(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """:func:`fake_quantize` for scales just computed from ``x`` (per token): clamps, straight-through gradient.

    ``scale``/``zero_point`` broadcast against ``x`` (e.g. one per row, shaped ``(rows, 1)``).
    """
    return _DynamicFakeQuantize.apply(x.float(), scale.detach().float(), zero_point.detach(), qmin, qmax)


class _LSQ(torch.autograd.Function):
    """Learned step size (Esser et al. 2020): STE for x, scaled gradient for the step size."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        axis: int | None,
        grad_scale: float,
    ) -> Tensor:
        s = _shape_for(scale, x, axis)
        zp = _shape_for(zero_point.float(), x, axis)
        u = x * (1.0 / s)
        v = u + zp  # unclipped code, for the range test
        q = torch.clamp(torch.round(u) + zp, qmin, qmax)
        ctx.save_for_backward(u, v, q)
        ctx.qrange = (qmin, qmax)
        ctx.axis = axis
        ctx.grad_scale = grad_scale
        ctx.scale_shape = scale.shape
        ctx.zp = zp
        return (q - zp) * s

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, v, q = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad * inside
        # d out / d s: round(u) - u inside the range, q - zp at the clip points
        zp = ctx.zp
        local = torch.where(inside, torch.round(u) - u, q - zp)
        grad_s = grad * local * ctx.grad_scale
        axis = ctx.axis
        if axis is None:
            grad_s = grad_s.sum().reshape(ctx.scale_shape)
        else:
            dims = [d for d in range(grad_s.dim()) if d != axis]
            grad_s = grad_s.sum(dim=dims).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None


def lsq_fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Fake-quantize with a trainable ``scale`` (LSQ); the forward equals :func:`fake_quantize`."""
    per_scale = x.numel() / max(1, scale.numel())
    grad_scale = 1.0 / math.sqrt(per_scale * max(abs(qmin), qmax))
    # float32 like `quantize`: a bf16 scale inverted in bf16 moved codes by one step from what the file stores
    out = _LSQ.apply(x.float(), scale.float(), zero_point, qmin, qmax, axis, grad_scale)
    return out.to(x.dtype)


def scale_per_element(scale: Tensor, shape: torch.Size | tuple[int, ...], axis: int | None) -> Tensor:
    """The scale of every element of a tensor of ``shape`` (an expanded view where possible).

    ``scale`` is a scalar (per tensor), one value per channel along ``axis``, or ``(channels, groups)``:
    groups of consecutive elements along the other axis of a 2-d tensor.
    """
    scale = scale.float()
    if scale.dim() == 2 and axis is not None:
        rows = scale.unsqueeze(-1).expand(*scale.shape, shape[1 - axis] // scale.shape[1]).reshape(scale.shape[0], -1)
        return rows if axis == 0 else rows.t()
    if axis is not None and scale.dim() == 1:
        view = [1] * len(shape)
        view[axis] = -1
        return scale.reshape(view).expand(shape)
    return scale.expand(shape)


def symmetric_scale_fp16(amax: Tensor, qmax: int) -> Tensor:
    """:func:`symmetric_scale` rounded up to the next float16 value (as float16): still no clipping,
    and the scale a deployment format stores (fp16) is exactly the one trained with."""
    scale = torch.clamp(amax.float() / qmax, min=_FP16_TINY)
    half = scale.half()
    return torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, math.inf)), half)


def symmetric_scale(amax: Tensor, qmax: int) -> Tensor:
    """Scale mapping ``[-amax, amax]`` onto ``[-qmax, qmax]`` (never zero)."""
    return torch.clamp(amax.float() / qmax, min=_EPS)


def affine_qparams(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for ``[min, max]`` (widened to include 0, so 0 is exact)."""
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def power_of_two_scale(amax: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Shift ``p`` (fractional bits) and scale ``2**-p``: the largest ``p`` with ``amax * 2^p <= qmax``."""
    amax = torch.clamp(amax.float(), min=_EPS)
    shift = torch.floor(torch.log2(qmax / amax)).clamp(-126, 126)
    return shift.to(torch.int32), torch.pow(2.0, -shift)
