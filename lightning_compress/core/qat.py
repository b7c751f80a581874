"""Fake-quantization modules and the conversions to and from them. Pure torch.

:func:`convert_to_qat` swaps each selected ``nn.Linear``/``nn.ConvNd`` for a subclass
(:class:`QATLinear`, :class:`QATConv2d`, ...) that **shares the same Parameter objects**, so
optimizers keep working and ``weight``/``bias`` keep their ``state_dict`` keys; the quantizers add
their own keys (``<layer>.weight_fake_quant.scale``, ...). The model's ``forward`` is never
touched: any signature works. :func:`convert_to_float` undoes it. Until a quantizer is enabled its
module computes exactly what the float module computes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import affine_qparams, fake_quantize, int_range, lsq_fake_quantize, power_of_two_scale, symmetric_scale
from .selection import Target, select_targets

__all__ = [
    "SCALE_MODES",
    "FakeQuantizer",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATLinear",
    "QuantConfig",
    "convert_to_float",
    "convert_to_qat",
    "qat_modules",
]

SCALE_MODES = ("minmax", "power_of_two", "learned")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Validates itself.

    Args:
        weight_bits: 2..8; weights are symmetric, per output channel (per tensor for ``power_of_two``).
        activation_bits: 2..8, or ``None`` to quantize weights only. Input activations are
            per tensor, asymmetric (with an integer zero point) for ``minmax`` and ``learned``.
        scale: ``"minmax"`` (ranges from the weights / EMA min-max observers), ``"power_of_two"``
            (scale ``2**-p``: fixed point with ``p`` fractional bits) or ``"learned"`` (LSQ).
        averaging_constant: EMA weight of a new batch in the activation observers.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    scale: str = "minmax"
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if value is None and name == "activation_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int in 2..8, got {value!r}.")
            if not 2 <= value <= 8:
                raise ValueError(f"`{name}`={value} is outside the supported range 2..8.")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"`scale`={self.scale!r} is not one of {SCALE_MODES}.")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"`averaging_constant`={self.averaging_constant} must be in (0, 1].")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FakeQuantizer(nn.Module):
    """Observes a tensor and, once enabled, fake-quantizes it.

    Its state is in buffers (saved in ``state_dict``): ``scale``, ``zero_point`` (activations),
    ``shift`` (power of two), ``min_val``/``max_val`` (activations: the EMA range) and ``state``, the flags
    :attr:`observer_enabled`, :attr:`fake_quant_enabled`, :attr:`frozen_shift` packed in one int.
    With ``"learned"``, :meth:`make_learnable` turns ``scale`` into a Parameter under the same name.

    Args:
        role: ``"weight"`` (observed from the tensor itself each training forward) or
            ``"activation"`` (EMA of batch min/max).
        bits: integer width.
        mode: one of :data:`SCALE_MODES`.
        channels: output channels for per-channel weight scales (0 = per tensor).
        averaging_constant: EMA weight of a new batch.
    """

    scale: Tensor
    zero_point: Tensor
    shift: Tensor
    min_val: Tensor
    max_val: Tensor
    state: Tensor
    _export_scale: Tensor
    _export_zero_point: Tensor

    _OBSERVE, _FAKE_QUANT, _FROZEN_SHIFT, _INITIALIZED, _SIGNED = 1, 2, 4, 8, 16

    def __init__(self, role: str, bits: int, mode: str, channels: int = 0, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"`role`={role!r} is not one of ('weight', 'activation').")
        self.role = role
        self.bits = bits
        self.mode = mode
        self.averaging_constant = averaging_constant
        self.per_channel = role == "weight" and mode != "power_of_two" and channels > 0
        self.register_buffer("scale", torch.ones((channels,) if self.per_channel else ()))
        # weights are symmetric (zero point 0) and only power-of-two scales have a shift: not saved otherwise
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=role == "activation")
        self.register_buffer("shift", torch.zeros((), dtype=torch.int32), persistent=mode == "power_of_two")
        if role == "activation":
            self.register_buffer("min_val", torch.zeros(()))
            self.register_buffer("max_val", torch.zeros(()))
        # weights are signed; activations decide when enabled (signed only if negative values were seen)
        self._flags = self._SIGNED if role == "weight" else 0
        self.register_buffer("state", torch.tensor(self._flags, dtype=torch.int32))
        self.sync_observers = False  # set by the Lightning callback: it updates the EMA itself, across ranks
        self.exporting = False  # set by `export_mode`: emit ops that ONNX exporters turn into Q/DQ nodes
        self._batch_min: Tensor | None = None
        self._batch_max: Tensor | None = None

    # ------------------------------------------------------------------ flags (one int32 buffer)
    # The flags are read in every forward: a Python int mirrors the buffer, so reading them never
    # synchronizes with the device nor makes torch.compile guard on tensor data.
    def _flag(self, bit: int) -> bool:
        return bool(self._flags & bit)

    def _set_flag(self, bit: int, on: bool) -> None:
        self._flags = self._flags | bit if on else self._flags & ~bit
        self.state.fill_(self._flags)

    @property
    def observer_enabled(self) -> bool:
        """Whether training forwards update the range (weights: every forward; activations: EMA)."""
        return self._flag(self._OBSERVE)

    @observer_enabled.setter
    def observer_enabled(self, on: bool) -> None:
        self._set_flag(self._OBSERVE, on)

    @property
    def fake_quant_enabled(self) -> bool:
        """Whether the output is quantized (otherwise the input passes through unchanged)."""
        return self._flag(self._FAKE_QUANT)

    @fake_quant_enabled.setter
    def fake_quant_enabled(self, on: bool) -> None:
        self._set_flag(self._FAKE_QUANT, on)

    @property
    def frozen_shift(self) -> bool:
        """Whether the power-of-two shift was fixed (by :meth:`set_shift`)."""
        return self._flag(self._FROZEN_SHIFT)

    @property
    def initialized(self) -> bool:
        return self._flag(self._INITIALIZED)

    @property
    def signed(self) -> bool:
        return self._flag(self._SIGNED)

    # ------------------------------------------------------------------ integer range
    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    @property
    def qrange(self) -> tuple[int, int]:
        if self.role == "weight":
            return int_range(self.bits, True)
        if self.mode == "power_of_two":
            return int_range(self.bits, self.signed)
        return int_range(self.bits, False)  # asymmetric with a zero point

    @property
    def is_learned(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    # ------------------------------------------------------------------ observing
    def forward(self, x: Tensor) -> Tensor:
        if self.exporting:
            return self._export_forward(x)
        observed = self.training and self.observer_enabled
        if observed:
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        qmin, qmax = self.qrange
        if self.is_learned:
            return lsq_fake_quantize(x, self.scale, self.zero_point, qmin, qmax, self.axis)
        # a min/max weight scale computed from this very tensor cannot clip it
        may_clip = not (observed and self.role == "weight" and self.mode == "minmax")
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax, self.axis, may_clip)

    def _export_forward(self, x: Tensor) -> Tensor:
        """Same values as :meth:`forward` in eval mode, with ``torch.fake_quantize_*`` ops (8-bit containers).

        The exporters map these ops to QuantizeLinear/DequantizeLinear; ranges narrower than the
        8-bit container are enforced by a clamp first, so the values stay those of the narrow grid.
        """
        if not self.fake_quant_enabled:
            return x
        qmin, qmax = self.qrange
        if self.role == "weight":  # x is the layer's already-quantized weight: re-quantizing it is exact
            # per channel, with scales in (temporary) buffers: exporters fold a Q/DQ pair whose inputs are
            # all constants back into a float weight, and the int8 weights would be lost
            return torch.fake_quantize_per_channel_affine(x, self._export_scale, self._export_zero_point, 0, -128, 127)
        cmin, cmax = (-128, 127) if qmin < 0 else (0, 255)
        scale, zero_point = float(self.scale), int(self.zero_point)
        if (qmin, qmax) != (cmin, cmax):
            x = torch.clamp(x, (qmin - zero_point) * scale, (qmax - zero_point) * scale)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, cmin, cmax)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if self.role == "weight":
            self._set_weight_qparams(x)
            return
        lo, hi = torch.aminmax(x.float())
        self._batch_min = lo if self._batch_min is None else torch.minimum(self._batch_min, lo)
        self._batch_max = hi if self._batch_max is None else torch.maximum(self._batch_max, hi)
        if not self.sync_observers:
            self.update_from_batch()

    def pending_batch_stats(self) -> tuple[Tensor, Tensor] | None:
        """Min and max seen since the last EMA update (activations), or ``None``."""
        if self._batch_min is None or self._batch_max is None:
            return None
        return self._batch_min, self._batch_max

    @torch.no_grad()
    def update_from_batch(self, batch_min: Tensor | None = None, batch_max: Tensor | None = None) -> None:
        """Fold the pending (or given, e.g. all-reduced) batch range into the EMA and the qparams."""
        lo = self._batch_min if batch_min is None else batch_min
        hi = self._batch_max if batch_max is None else batch_max
        self._batch_min = self._batch_max = None
        if lo is None or hi is None:
            return
        if not self.initialized:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self._set_flag(self._INITIALIZED, True)
        else:
            c = self.averaging_constant
            self.min_val.mul_(1 - c).add_(lo, alpha=c)
            self.max_val.mul_(1 - c).add_(hi, alpha=c)
        if not self.is_learned:
            self._set_activation_qparams()

    def _set_weight_qparams(self, w: Tensor) -> None:
        _, qmax = int_range(self.bits, True)
        if self.mode == "power_of_two":
            if not self.frozen_shift:
                shift, _ = power_of_two_scale(w.abs().max(), qmax)
                self.shift.copy_(shift)
            self.scale.copy_(torch.pow(2.0, -self.shift.float()))
        elif not self.is_learned:
            flat = w.reshape(w.shape[0], -1) if self.per_channel else w.reshape(1, -1)
            amax = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))  # max |w| without a |w| copy
            amax = amax if self.per_channel else amax[0]
            self.scale.copy_(symmetric_scale(amax, qmax))
        self._set_flag(self._INITIALIZED, True)

    def _set_activation_qparams(self) -> None:
        if self.mode == "power_of_two":
            self._set_flag(self._SIGNED, bool(self.min_val < 0))
            _, qmax = self.qrange
            if not self.frozen_shift:
                amax = torch.maximum(self.min_val.abs(), self.max_val.abs())
                shift, _ = power_of_two_scale(amax, qmax)
                self.shift.copy_(shift)
            self.scale.copy_(torch.pow(2.0, -self.shift.float()))
            self.zero_point.zero_()
            return
        qmin, qmax = self.qrange
        scale, zero_point = affine_qparams(self.min_val, self.max_val, qmin, qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    # ------------------------------------------------------------------ control
    def set_shift(self, shift: int) -> None:
        """Fix the power-of-two shift (``p`` fractional bits) and stop the observer from moving it."""
        self.shift.fill_(shift)
        self.scale.data.copy_(torch.full_like(self.scale, 2.0**-shift))
        self._set_flag(self._FROZEN_SHIFT, True)

    def make_learnable(self) -> nn.Parameter:
        """Turn ``scale`` into a trainable Parameter (LSQ), initialised from the observed range."""
        if self.is_learned:
            return cast(nn.Parameter, self.scale)
        value = self.scale.detach().clone()
        del self._buffers["scale"]
        param = nn.Parameter(value)
        self.scale = param
        return param

    def extra_repr(self) -> str:
        on = "on" if self.fake_quant_enabled else "off"
        return f"role={self.role}, bits={self.bits}, mode={self.mode}, per_channel={self.per_channel}, fake_quant={on}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if not any(key.startswith(prefix) for key in state_dict):
            return  # a float checkpoint (saved before quantization was added): keep the fresh quantizer state
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._flags = int(self.state)


class _QATMixin:
    """Forward of a float layer with fake-quantized weight and input."""

    weight: Tensor
    weight_fake_quant: FakeQuantizer
    input_fake_quant: nn.Module
    _float_class: type[nn.Module]

    def quantized_weight(self) -> Tensor:
        exported = getattr(self, "_export_weight", None)
        if exported is not None and self.weight_fake_quant.exporting:
            return self.weight_fake_quant(exported)
        return self.weight_fake_quant(self.weight)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; same Parameters as the float layer."""

    _float_class = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.input_fake_quant(input), self.quantized_weight(), self.bias)


class _QATConvMixin(_QATMixin):
    def forward(self, input: Tensor) -> Tensor:
        conv = cast(Any, self)
        return conv._conv_forward(self.input_fake_quant(input), self.quantized_weight(), conv.bias)


class QATConv1d(_QATConvMixin, nn.Conv1d):
    _float_class = nn.Conv1d


class QATConv2d(_QATConvMixin, nn.Conv2d):
    _float_class = nn.Conv2d


class QATConv3d(_QATConvMixin, nn.Conv3d):
    _float_class = nn.Conv3d


_QAT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
}


def _swap_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` of class ``cls`` that shares its Parameters and buffers."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new.__class__ = cls
    return new


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fake-quantized layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QATMixin)]  # type: ignore[misc]


def _quantizable_targets(
    model: nn.Module, include: Sequence[str] | str | None, exclude: Sequence[str] | str | None
) -> list[Target]:
    owned_by_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = []
    for target in select_targets(model, include, exclude):
        module = target.module
        if isinstance(module, _QATMixin):
            targets.append(target)
            continue
        if type(module) not in _QAT_CLASS or id(module) in owned_by_mha:
            if include is None:
                continue  # default selection: silently leave e.g. MultiheadAttention's projection alone
            raise ValueError(
                f"`include` selects {target.name!r} ({type(module).__name__}); quantization-aware training "
                "supports nn.Linear and nn.Conv1d/2d/3d called through their forward."
            )
        targets.append(target)
    if not targets:
        raise ValueError(f"no nn.Linear or nn.Conv layer of {type(model).__name__} can be quantized.")
    return targets


def convert_to_qat(
    model: nn.Module,
    config: QuantConfig,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Swap the selected layers for fake-quant layers (disabled until enabled). Returns their names.

    Layers that already are QAT layers are kept. All checks happen before any change.
    """
    targets = _quantizable_targets(model, include, exclude)
    in_fused_block = {
        id(m)
        for block in model.modules()
        if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        for m in block.modules()
    }
    names = []
    for target in targets:
        module = target.module
        names.append(target.name)
        if isinstance(module, _QATMixin):
            continue
        new = _swap_class(module, _QAT_CLASS[type(module)])
        weight = target.param
        new.weight_fake_quant = FakeQuantizer(
            "weight",
            config.weight_bits,
            config.scale,
            channels=weight.shape[0],
            averaging_constant=config.averaging_constant,
        ).to(weight.device)
        new.input_fake_quant = (
            nn.Identity()
            if config.activation_bits is None
            else FakeQuantizer(
                "activation", config.activation_bits, config.scale, averaging_constant=config.averaging_constant
            ).to(weight.device)
        )
        new.weight_fake_quant.train(module.training)  # a model in eval mode must not start observing
        new.input_fake_quant.train(module.training)
        if id(module) in in_fused_block:
            # PyTorch's fused TransformerEncoderLayer fast path reads weights directly (skipping our forward);
            # it is disabled whenever a submodule has a forward hook, so register a no-op one
            new.register_forward_pre_hook(_keep_unfused)
        _replace(model, target.name, new)
    return names


def _keep_unfused(module: nn.Module, args: Any) -> None:
    return None


def convert_to_float(model: nn.Module) -> list[str]:
    """Swap every fake-quant layer back to its float class (same Parameters). Returns their names."""
    names = []
    for name, module in qat_modules(model):
        new = _swap_class(module, cast(Any, module)._float_class)
        new._modules.pop("weight_fake_quant", None)
        new._modules.pop("input_fake_quant", None)
        new._forward_pre_hooks = type(module._forward_pre_hooks)(
            (k, h) for k, h in module._forward_pre_hooks.items() if h is not _keep_unfused
        )
        _replace(model, name, new)
        names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a single layer; wrap it in a container to quantize it.")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def search_power_of_two_shifts(
    module: nn.Module, inputs: Sequence[Tensor], span: Sequence[int] = (-1, 0, 1, 2)
) -> tuple[int, int | None, float]:
    """Choose the weight and input shifts of one power-of-two QAT layer on real inputs.

    Candidates are the no-clipping shift ``p0`` (from the current ranges) plus ``span``; the pair
    with the smallest mean squared error of the layer output against the float output wins and
    is fixed (:meth:`FakeQuantizer.set_shift`). Returns ``(weight shift, input shift, error)``.
    """
    if not isinstance(module, _QATMixin):
        raise TypeError(f"expected a QAT layer, got {type(module).__name__}")
    wq = module.weight_fake_quant
    aq = module.input_fake_quant if isinstance(module.input_fake_quant, FakeQuantizer) else None
    if not inputs:
        raise ValueError("shift search needs at least one captured input batch.")
    states = [(q, q.fake_quant_enabled, q.observer_enabled) for q in (wq, aq) if q is not None]
    for q, _, _ in states:
        q.fake_quant_enabled = False
        q.observer_enabled = False
    reference = [module(x) for x in inputs]
    _, w_qmax = int_range(wq.bits, True)
    w0 = int(power_of_two_scale(module.weight.abs().max(), w_qmax)[0])
    a0 = None
    if aq is not None:
        lo = min(float(x.min()) for x in inputs)
        hi = max(float(x.max()) for x in inputs)
        aq._set_flag(aq._SIGNED, lo < 0)
        _, a_qmax = aq.qrange
        a0 = int(power_of_two_scale(torch.tensor(max(abs(lo), abs(hi))), a_qmax)[0])
    best: tuple[float, int, int | None] | None = None
    for dw in span:
        for da in span if aq is not None else [0]:
            wq.set_shift(w0 + dw)
            wq.fake_quant_enabled = True
            if aq is not None and a0 is not None:
                aq.set_shift(a0 + da)
                aq.fake_quant_enabled = True
            error = sum(float(((module(x) - ref) ** 2).mean()) for x, ref in zip(inputs, reference, strict=True))
            if best is None or error < best[0]:
                best = (error, w0 + dw, None if a0 is None else a0 + da)
    assert best is not None
    error, w_shift, a_shift = best
    wq.set_shift(w_shift)
    if aq is not None and a_shift is not None:
        aq.set_shift(a_shift)
    for q, enabled, observing in states:
        q.fake_quant_enabled = enabled
        q.observer_enabled = observing
    return w_shift, a_shift, error


@contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in a state ONNX exporters translate to int8 Q/DQ graphs; restore everything after.

    Inside: eval mode, no parameter requires grad, each fake-quant layer carries its quantized
    weight as a constant and every quantizer emits ``torch.fake_quantize_*`` ops with constant
    scales. The outputs are those of the eval-mode fake-quant model.
    """
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    layers = [cast(Any, layer) for _, layer in qat_modules(model)]
    try:
        model.eval()
        model.requires_grad_(False)
        with torch.no_grad():
            for layer in layers:
                weight = layer.weight_fake_quant(layer.weight).detach().clone()
                layer._export_weight = weight
                quantizer = layer.weight_fake_quant
                scale = quantizer.scale.detach().float().expand(weight.shape[0]).contiguous()
                # persistent: exporters lift state_dict entries to initializers; anything else is a constant
                quantizer.register_buffer("_export_scale", scale)
                quantizer.register_buffer(
                    "_export_zero_point", torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
                )
        for _, quantizer in quantizers(model):
            quantizer.exporting = True
        yield model
    finally:
        for _, quantizer in quantizers(model):
            quantizer.exporting = False
            quantizer._buffers.pop("_export_scale", None)
            quantizer._buffers.pop("_export_zero_point", None)
        for layer in layers:
            layer.__dict__.pop("_export_weight", None)
        for module, mode in training:
            module.training = mode
        for param, flag in grads:
            param.requires_grad_(flag)


def quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """All :class:`FakeQuantizer` modules with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]
