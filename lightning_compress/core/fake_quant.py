"""What to quantize (:class:`QuantConfig`) and the module that observes and fake-quantizes one tensor
(:class:`FakeQuantizer`). Pure torch; the arithmetic is in :mod:`.quant`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checks import is_integer, is_real
from .quant import (
    affine_qparams,
    fake_quantize,
    fake_quantize_dynamic,
    int_range,
    lsq_fake_quantize,
    power_of_two_scale,
    scale_floor,
    scale_per_element,
    symmetric_scale,
    symmetric_scale_fp16,
)

__all__ = ["SCALE_MODES", "FakeQuantizer", "QuantConfig"]

_MIN_LEARNED_SCALE = 1e-8
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")

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
        group_size: ``None``: per-output-channel weight scales. An int: symmetric scales per group of
            that many consecutive input weights of each output row (the LLM recipe: int4, groups of
            32-128). It must divide a layer's input size; other layers (and convolutions) stay per
            channel, with a one-time message. ``"minmax"`` scales only.
        activation_granularity: ``"per_tensor"``: one observed (EMA min/max) scale per layer input.
            ``"per_token"``: a dynamic asymmetric scale per token (a row of a Linear's input; a sample's
            position, over its channels, in a convolution's), computed from each batch, no observers (int8
            dynamic activations of the LLM recipe). ``"minmax"`` scales only.
        quantize_bias: put each layer's bias on the grid of its accumulator, ``s_w * s_x`` (the product of
            the weight's and the input's scales), as the int32 bias of an integer kernel: the bias is then
            fake-quantized like the weight (straight-through gradient) and a compressed file stores int32
            codes instead of floats. Needs per-tensor activations and per-channel (or per-tensor) weights.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    scale: str = "minmax"
    averaging_constant: float = 0.01
    group_size: int | None = None
    activation_granularity: str = "per_tensor"
    quantize_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if value is None and name == "activation_bits":
                continue
            if not is_integer(value):
                raise TypeError(f"`{name}` must be an int in 2..8, got {value!r}.")
            value = int(value)
            object.__setattr__(self, name, value)  # frozen: a numpy integer is stored as an int
            if not 2 <= value <= 8:
                raise ValueError(f"`{name}`={value} is outside the supported range 2..8.")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"`scale`={self.scale!r} is not one of {SCALE_MODES}.")
        if not is_real(self.averaging_constant):
            raise TypeError(f"`averaging_constant` must be a float in (0, 1], got {self.averaging_constant!r}.")
        try:
            constant = float(self.averaging_constant)
        except OverflowError:  # an int beyond a float's range
            raise ValueError(f"`averaging_constant`={self.averaging_constant} must be in (0, 1].") from None
        object.__setattr__(self, "averaging_constant", constant)
        if not 0.0 < constant <= 1.0:
            raise ValueError(f"`averaging_constant`={constant} must be in (0, 1].")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise TypeError(f"`group_size` must be an int or None, got {self.group_size!r}.")
            if self.group_size < 2:
                raise ValueError(f"`group_size`={self.group_size} must be >= 2.")
            if self.scale != "minmax":
                raise ValueError(
                    f"`group_size`={self.group_size} needs scale='minmax', got `scale`={self.scale!r}: learned and "
                    "power-of-two scales are per output channel (or per tensor)."
                )
        if self.activation_granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"`activation_granularity`={self.activation_granularity!r} is not one of {ACTIVATION_GRANULARITIES}."
            )
        if self.activation_granularity == "per_token" and (self.activation_bits is None or self.scale != "minmax"):
            raise ValueError(
                "`activation_granularity`='per_token' quantizes activations with dynamic min/max scales: it needs "
                f"`activation_bits` and scale='minmax', got `activation_bits`={self.activation_bits}, "
                f"`scale`={self.scale!r}."
            )
        if not isinstance(self.quantize_bias, bool):
            raise TypeError(f"`quantize_bias` must be a bool, got {self.quantize_bias!r}.")
        if self.quantize_bias and (
            self.activation_bits is None or self.activation_granularity != "per_tensor" or self.group_size is not None
        ):
            raise ValueError(
                "`quantize_bias`=True puts a bias on its accumulator's grid, the weight scale times the input scale: "
                "it needs quantized per-tensor activations and per-channel weight scales, got "
                f"`activation_bits`={self.activation_bits}, `activation_granularity`={self.activation_granularity!r}, "
                f"`group_size`={self.group_size}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields, for checkpoints and state keys; ``quantize_bias`` only when set, so the state key of a
        callback configured as before it existed (and the checkpoints saved under it) stays the same."""
        out = asdict(self)
        if not self.quantize_bias:
            del out["quantize_bias"]
        return out


class FakeQuantizer(nn.Module):
    """Observes a tensor and, once enabled, fake-quantizes it.

    Its state is in buffers (saved in ``state_dict``): ``scale``, ``zero_point`` (activations),
    ``shift`` (power of two), ``min_val``/``max_val`` (activations: the EMA range) and ``state``, the flags
    :attr:`observer_enabled`, :attr:`fake_quant_enabled`, :attr:`frozen_shift` packed in one int.
    With ``"learned"``, ``scale`` is a Parameter from the start (so optimizers built after the
    conversion hold it): the observers set it while calibrating, and it trains (``requires_grad``)
    from the moment fake quantization is enabled (LSQ).

    Args:
        role: ``"weight"`` (observed from the tensor itself each training forward) or
            ``"activation"`` (EMA of batch min/max).
        bits: integer width.
        mode: one of :data:`SCALE_MODES`.
        channels: output channels for per-channel weight scales (0 = per tensor).
        averaging_constant: EMA weight of a new batch.
        channel_axis: the weight's output-channel axis (1 for a ``transformers`` Conv1D).
        groups: weights: scale groups per output channel (the input axis of a 2-d weight split into
            that many consecutive groups); ``0``: one scale per channel.
        granularity: activations: ``"per_tensor"`` (observed) or ``"per_token"`` (dynamic, per row).
        feature_axis: per-token activations: the input's feature axis; a token is every other position (``-1``
            for a Linear's input; ``-3`` for a Conv2d's ``(N, C, H, W)``: one scale per sample and pixel).
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
    feature_axis = -1  # a quantizer pickled before the argument existed: a Linear's
    KNOWN_FLAGS = 31  # every bit of :attr:`state` a quantizer sets

    def __init__(
        self,
        role: str,
        bits: int,
        mode: str,
        channels: int = 0,
        averaging_constant: float = 0.01,
        channel_axis: int = 0,
        groups: int = 0,
        granularity: str = "per_tensor",
        feature_axis: int = -1,
    ) -> None:
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"`role`={role!r} is not one of ('weight', 'activation').")
        self.role = role
        self.bits = bits
        self.mode = mode
        self.averaging_constant = averaging_constant
        self.per_channel = role == "weight" and mode != "power_of_two" and channels > 0
        self.channel_axis = channel_axis
        self.groups = groups if self.per_channel else 0
        self.per_token = role == "activation" and granularity == "per_token"
        self.feature_axis = feature_axis
        if self.groups:  # group scales are float16 values, as deployment formats store them
            scale = torch.ones((channels, self.groups), dtype=torch.float16)
        else:
            scale = torch.ones((channels,) if self.per_channel else ())
        if mode == "learned":
            self.scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.register_buffer("scale", scale)
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
        self.exporting = False  # between begin_export/end_export: emit ops that ONNX exporters turn into Q/DQ nodes
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
        if self.mode == "learned":
            self.scale.requires_grad_(on)  # LSQ: the step size trains while quantization is on

    @classmethod
    def quantizes(cls, flags: int) -> bool:
        """Whether a quantizer whose :attr:`state` is ``flags`` quantizes its output."""
        return bool(flags & cls._FAKE_QUANT)

    @property
    def frozen_shift(self) -> bool:
        """Whether the power-of-two shift was fixed (by :meth:`set_shift`)."""
        return self._flag(self._FROZEN_SHIFT)

    @property
    def initialized(self) -> bool:
        return self._flag(self._INITIALIZED)

    @property
    def has_range(self) -> bool:
        """Whether the scale describes data: a weight's always (it takes its range from the weight when it
        first quantizes it); an activation's once it observed a batch or had its shift fixed. An activation
        quantizer without a range (its layer never ran while observers were on, e.g. a model fit in eval mode
        or fake quantization switched on without calibration) passes its input through in float until a
        training forward gives it one: its default scale of 1 would round most activations to zero. A per-token
        quantizer takes its ranges from each batch: it always has them."""
        return self.role == "weight" or self.per_token or self.initialized or self.frozen_shift

    @property
    def signed(self) -> bool:
        return self._flag(self._SIGNED)

    def set_signed(self, on: bool) -> None:
        """Whether the integer grid of a power-of-two activation has negative values."""
        self._set_flag(self._SIGNED, on)

    # ------------------------------------------------------------------ integer range
    @property
    def axis(self) -> int | None:
        """The channel axis of per-channel scales (``None``: per tensor, per group or per token)."""
        return self.channel_axis if self.per_channel and not self.groups else None

    def expanded_scale(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The scale of every element of a weight of ``shape`` (per tensor, channel or group), detached."""
        axis = self.channel_axis if self.per_channel else None
        return scale_per_element(self.effective_scale().detach(), shape, axis)

    @property
    def qrange(self) -> tuple[int, int]:
        return self.qrange_of(self._flags)

    def qrange_of(self, flags: int) -> tuple[int, int]:
        """The integer range this quantizer has with the ``state`` flags ``flags`` (a state being loaded)."""
        if self.role == "weight":
            return int_range(self.bits, True)
        if self.mode == "power_of_two":
            return int_range(self.bits, bool(flags & self._SIGNED))
        return int_range(self.bits, False)  # asymmetric with a zero point

    def effective_scale(self) -> Tensor:
        """The step size in use: a learned scale is used as ``|scale|`` (at least ``1e-8``), since an
        optimizer may push the Parameter through zero; the other modes' scale as it is. Never below the smallest
        scale the scale's dtype holds: a model calibrated in float32 and cast to float16 afterwards (``.half()``, a
        ``16-true`` validation of its checkpoint) rounds float32's floor, an all-zero row's scale, to 0 (trial EF:
        every output NaN)."""
        floor = scale_floor(self.scale.dtype)
        if self.mode == "learned":
            return self.scale.abs().clamp_min(max(_MIN_LEARNED_SCALE, floor))
        return self.scale.clamp_min(floor)

    @property
    def is_learned(self) -> bool:
        """Whether the scale is being trained (``"learned"`` once fake quantization is on), not observed."""
        return self.mode == "learned" and self.fake_quant_enabled

    # ------------------------------------------------------------------ observing
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # what the float layer would have been given: it fails on it too
            raise TypeError(f"a {self.role} quantizer takes a tensor, got {type(x).__name__} ({x!r:.60}).")
        if self.exporting:
            return self._export_forward(x)
        if not x.numel():  # nothing to observe or round: a layer given no rows (trial FM: X-MOD runs each language's
            return x  # adapter on the batch's rows of that language, none for one absent; aminmax failed on them)
        if self.per_token:
            return self._per_token(x) if self.fake_quant_enabled else x
        # a weight quantizer switched on before it ever saw its weight takes its range from it now
        first = self.role == "weight" and self.fake_quant_enabled and not self.initialized  # LSQ too (trial DH)
        observed = (self.training and self.observer_enabled) or first
        if observed:
            self.observe(x)
        if not self.fake_quant_enabled or not self.has_range:
            return x
        qmin, qmax = self.qrange
        if self.groups:
            grouped = self._grouped(x)
            # a min/max scale computed from this very weight cannot clip it
            out = fake_quantize(
                grouped, self.effective_scale().unsqueeze(-1), self.zero_point, qmin, qmax, None, not observed
            )
            return self._ungrouped(out, x)
        if self.is_learned:
            return lsq_fake_quantize(x, self.effective_scale(), self.zero_point, qmin, qmax, self.axis)
        # a min/max weight scale computed from this very tensor cannot clip it
        may_clip = not (observed and self.role == "weight" and self.mode == "minmax")
        return fake_quantize(x, self.effective_scale(), self.zero_point, qmin, qmax, self.axis, may_clip)

    def _grouped(self, w: Tensor) -> Tensor:
        """A 2-d weight as ``(out, groups, group_size)``."""
        rows = w if self.channel_axis == 0 else w.t()
        return rows.reshape(rows.shape[0], self.groups, -1)

    def _ungrouped(self, grouped: Tensor, like: Tensor) -> Tensor:
        rows = grouped.reshape(grouped.shape[0], -1)
        return rows if self.channel_axis == 0 else rows.t()

    def _per_token(self, x: Tensor) -> Tensor:
        """Dynamic asymmetric fake quantization, one scale per token: per position along every axis but
        :attr:`feature_axis`, over the features there (straight-through)."""
        qmin, qmax = int_range(self.bits, True)
        tokens = x if self.feature_axis in (-1, x.dim() - 1) else x.movedim(self.feature_axis, -1)
        rows = tokens.reshape(-1, tokens.shape[-1]).float()
        lo = rows.amin(dim=-1, keepdim=True)  # amin + amax: several times faster than aminmax on short rows
        hi = rows.amax(dim=-1, keepdim=True)
        scale, zero_point = affine_qparams(lo.detach(), hi.detach(), qmin, qmax)
        out = fake_quantize_dynamic(rows, scale, zero_point, qmin, qmax).reshape(tokens.shape)
        return (out if tokens is x else out.movedim(-1, self.feature_axis)).to(x.dtype)

    def begin_export(self, channels: int = 0) -> None:
        """Emit ``torch.fake_quantize_*`` ops with constant scales (ONNX Q/DQ) until :meth:`end_export`.

        ``channels``: output channels of the weight this quantizer quantizes (weights only).
        """
        if self.role == "weight" and not self.groups:
            scale = self.effective_scale().detach().float().expand(channels).contiguous()
            # An all-zero row (a pruned output channel) has its scale at the float32 floor; its codes are 0 under
            # any scale. onnxruntime's fused int8 kernels put the bias on the weight scale x input scale grid,
            # where the floor underflows and the bias is dropped: such rows take the layer's largest scale (1 if
            # every row is zero, the input grid `quantize_bias` keeps their biases on)
            floor = scale <= 2 * scale_floor(self.scale.dtype)
            if bool(floor.any()):
                fill = scale[~floor].max() if bool((~floor).any()) else torch.ones((), device=scale.device)
                scale = torch.where(floor, fill, scale)
            # persistent: exporters lift state_dict entries to initializers; anything else is a constant
            self.register_buffer("_export_scale", scale)
            self.register_buffer("_export_zero_point", torch.zeros(scale.shape, dtype=torch.int32, device=scale.device))
        self.exporting = True

    def end_export(self) -> None:
        self.exporting = False
        for name in ("_export_scale", "_export_zero_point"):
            if hasattr(self, name):
                delattr(self, name)

    def _export_forward(self, x: Tensor) -> Tensor:
        if self.per_token:  # dynamic per-token ranges have no static Q/DQ form: the ONNX activations stay float
            return x
        if self.fake_quant_enabled and self.groups:
            raise ValueError(
                "group-wise weight scales export through `export_onnx`'s MatMulNBits path, which this layer did not "
                "take (it is not a Linear or transformers Conv1D)."
            )
        return self._export_per_channel(x)

    def _export_per_channel(self, x: Tensor) -> Tensor:
        """Same values as :meth:`forward` in eval mode, with ``torch.fake_quantize_*`` ops (8-bit containers).

        The exporters map these ops to QuantizeLinear/DequantizeLinear; ranges narrower than the
        8-bit container are enforced by a clamp first, so the values stay those of the narrow grid.
        """
        if not self.fake_quant_enabled or not self.has_range:
            return x
        qmin, qmax = self.qrange
        if self.role == "weight":  # x is the layer's already-quantized weight: re-quantizing it is exact
            # per channel, with scales in (temporary) buffers: exporters fold a Q/DQ pair whose inputs are
            # all constants back into a float weight, and the int8 weights would be lost
            return torch.fake_quantize_per_channel_affine(
                x, self._export_scale, self._export_zero_point, self.channel_axis, -128, 127
            )
        cmin, cmax = (-128, 127) if qmin < 0 else (0, 255)
        scale, zero_point = float(self.effective_scale()), int(self.zero_point)
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

    def discard_pending(self) -> None:
        """Forget the range observed since the last EMA update (a batch that was refused)."""
        self._batch_min = self._batch_max = None

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
            self._store_scale(torch.pow(2.0, -self.shift.float()))
        elif self.groups:
            grouped = self._grouped(w)
            amax = torch.maximum(grouped.amax(dim=-1), -grouped.amin(dim=-1))
            self._store_scale(symmetric_scale_fp16(amax, qmax))
        elif not self.is_learned or not self.initialized:  # a learned scale starts at the weight's range: switched on
            # without `calibrate`, it stayed 1.0 and rounded every weight to zero (trial DH)
            if self.per_channel:
                moved = w.movedim(self.channel_axis, 0)
                flat = moved.reshape(moved.shape[0], -1)
            else:
                flat = w.reshape(1, -1)
            amax = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))  # max |w| without a |w| copy
            amax = amax if self.per_channel else amax[0]
            with torch.no_grad():  # a learned scale is a Parameter
                self._store_scale(symmetric_scale(amax, qmax))
        self._set_flag(self._INITIALIZED, True)

    def _set_activation_qparams(self) -> None:
        if self.mode == "power_of_two":
            self._set_flag(self._SIGNED, bool(self.min_val < 0))
            _, qmax = self.qrange
            if not self.frozen_shift:
                amax = torch.maximum(self.min_val.abs(), self.max_val.abs())
                shift, _ = power_of_two_scale(amax, qmax)
                self.shift.copy_(shift)
            self._store_scale(torch.pow(2.0, -self.shift.float()))
            self.zero_point.zero_()
            return
        qmin, qmax = self.qrange
        scale, zero_point = affine_qparams(self.min_val, self.max_val, qmin, qmax)
        self._store_scale(scale)
        self.zero_point.copy_(zero_point)

    def _store_scale(self, value: Tensor) -> None:
        """Write ``value`` (float32) into the scale, never below the smallest scale its dtype holds (float16 in a
        ``precision="16-true"`` model, where float32's floor rounded to 0)."""
        self.scale.copy_(value.clamp_min(scale_floor(self.scale.dtype)))

    # ------------------------------------------------------------------ control
    def set_shift(self, shift: int) -> None:
        """Fix the power-of-two shift (``p`` fractional bits) and stop the observer from moving it."""
        self.shift.fill_(shift)
        with torch.no_grad():
            self._store_scale(torch.full_like(self.scale, 2.0**-shift, dtype=torch.float32))
        self._set_flag(self._FROZEN_SHIFT, True)

    def extra_repr(self) -> str:
        on = "on" if self.fake_quant_enabled else "off"
        kind = (
            "per_token"
            if self.per_token
            else f"groups={self.groups}"
            if self.groups
            else f"per_channel={self.per_channel}"
        )
        return f"role={self.role}, bits={self.bits}, mode={self.mode}, {kind}, fake_quant={on}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if not any(key.startswith(prefix) for key in state_dict):
            return  # a float checkpoint (saved before quantization was added): keep the fresh quantizer state
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._flags = int(self.state)
        if self.mode == "learned":
            self.scale.requires_grad_(self.fake_quant_enabled)
