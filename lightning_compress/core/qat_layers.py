"""The fake-quantized layers. Pure torch.

Each class (:class:`QATLinear`, :class:`QATConv2d`, ...) subclasses its float layer and **shares the same Parameter
objects** (``from_float`` / ``to_float`` build the other layer on the meta device and hand it the Parameters), so
optimizers keep working and ``weight``/``bias`` keep their ``state_dict`` keys; the quantizers add their own keys
(``<layer>.weight_fake_quant.scale``, ...). Until a quantizer is enabled its layer computes exactly what the float
layer computes. :mod:`.qat` swaps them in and out of a model.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fake_quant import FakeQuantizer, QuantConfig
from .layers import foreign_linear_types, transformers_conv1d, weight_axes
from .quant import BIAS_RANGE, accumulator_scale, fake_quantize

__all__ = [
    "QAT_CLASSES",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATEmbedding",
    "QATLayer",
    "QATLinear",
    "check_shared_quantizer",
    "group_count",
    "qat_class",
    "qat_class_of",
    "qat_modules",
    "quantizable",
    "settings_differ",
]


_HOOKS = (  # every hook table of an nn.Module (torch 2.x)
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give the layer that takes ``old``'s place ``old``'s hook tables themselves (trial BA: the swap dropped a
    layer's forward hooks; trial BB: re-registered, they no longer answered their handles' ``remove()``): every
    hook runs on ``new`` as it ran on ``old``, and the handles the user holds still remove it. ``old`` is left
    without hooks. The no-op hook the swap adds for PyTorch's fused encoder (:func:`keep_unfused`) does not go back
    to a float layer."""
    for name in _HOOKS:
        if name in vars(old):
            setattr(new, name, vars(old)[name])
            setattr(old, name, type(vars(old)[name])())
    table: dict[int, Any] = new._load_state_dict_pre_hooks  # torch wraps these with a reference to their module
    for key, hook in list(table.items()):  # (trial BD: a moved one was called with the old layer, then failed)
        if getattr(hook, "with_module", False) and hook.module() is old:
            table[key] = type(hook)(hook.hook, new)
    if not isinstance(new, QATLayer):
        for key in [k for k, hook in new._forward_pre_hooks.items() if hook is keep_unfused]:
            del new._forward_pre_hooks[key]


def keep_unfused(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: PyTorch's fused ``TransformerEncoderLayer`` path reads weights directly, skipping
    the fake-quant forward, and is disabled while a submodule has a forward hook."""
    return None


class QATLayer:
    """What every fake-quantized layer adds to its float layer: the quantizers, the quantized weight and bias, and
    the export modes (test ``isinstance(module, QATLayer)``)."""

    weight: Tensor
    training: bool
    weight_fake_quant: FakeQuantizer
    input_fake_quant: nn.Module
    float_class: ClassVar[type[nn.Module]]
    _export_weight: Tensor | None = None
    _export_bias: Tensor | None = None
    _quantizer_before: dict[str, Tensor] | None = None  # an idle weight quantizer's state, put back after export
    _int4: Any = None  # an Int4Weights while `int4_export_mode` is on
    quantize_bias: bool = False  # the bias on the accumulator's grid (QuantConfig.quantize_bias)

    def _adopt(
        self,
        module: Any,
        config: QuantConfig,
        quantize_input: bool = True,
        weight_quantizer: FakeQuantizer | None = None,
    ) -> None:
        """Take ``module``'s Parameters (the same objects) and add the quantizers on their device; with
        ``weight_quantizer``, that quantizer (one module shared with the layers tied to the same weight) instead of
        a new one."""
        layer = cast(Any, self)
        layer.weight = module.weight
        if hasattr(module, "bias"):
            layer.bias = module.bias
        weight: Tensor = module.weight
        device = weight.device
        out_axis, in_axis = weight_axes(module)
        layer.weight_fake_quant = weight_quantizer or FakeQuantizer(
            "weight", config.weight_bits, config.scale, channels=weight.shape[out_axis],
            averaging_constant=config.averaging_constant, channel_axis=out_axis,
            groups=group_count(weight, in_axis, config.group_size) or 0,
        ).to(device)  # fmt: skip
        layer.input_fake_quant = (
            nn.Identity()
            if config.activation_bits is None or not quantize_input
            else FakeQuantizer(
                "activation",
                config.activation_bits,
                config.scale,
                averaging_constant=config.averaging_constant,
                granularity=config.activation_granularity,
                # a convolution's channels are ahead of its spatial axes, batched or not
                feature_axis=-(weight.dim() - 1) if isinstance(module, nn.modules.conv._ConvNd) else -1,
            ).to(device)
        )
        has_bias = getattr(module, "bias", None) is not None
        layer.quantize_bias = bool(config.quantize_bias and quantize_input and has_bias)
        layer.train(module.training)  # a model in eval mode must not start observing
        move_hooks(module, layer)

    def _share_into(self, new: Any) -> nn.Module:
        layer = cast(Any, self)
        new.weight = layer.weight
        if hasattr(layer, "bias"):
            new.bias = layer.bias
        move_hooks(layer, new)
        return cast(nn.Module, new.train(layer.training))

    def quantized_weight(self) -> Tensor:
        if self._export_weight is not None and self.weight_fake_quant.exporting:
            return self.weight_fake_quant(self._export_weight)
        return self.weight_fake_quant(self.weight)

    def bias_grid(self) -> Tensor | None:
        """The grid of the bias, ``s_w * s_x`` per output channel, while ``quantize_bias`` is set and both
        quantizers fake-quantize; ``None`` otherwise (the bias is then used as it is)."""
        weight_q, input_q = self.weight_fake_quant, self.input_fake_quant
        bias = getattr(self, "bias", None)  # an embedding has none
        if not self.quantize_bias or bias is None or not isinstance(input_q, FakeQuantizer):
            return None
        if not (weight_q.fake_quant_enabled and input_q.fake_quant_enabled and input_q.has_range):
            return None  # an input without a range stays float (FakeQuantizer.has_range), so does its bias
        return accumulator_scale(weight_q.effective_scale(), input_q.effective_scale(), bias.numel())

    def quantized_bias(self) -> Tensor | None:
        """The bias the layer adds: on its accumulator's grid (int32 codes times ``s_w * s_x``, straight-through
        gradient) when :meth:`bias_grid` has one, else the bias itself. Call after both quantizers ran in this
        forward, so the grid is the one this batch uses."""
        bias = cast(Any, self).bias
        if self._export_bias is not None and self.weight_fake_quant.exporting:
            return self._export_bias
        grid = self.bias_grid()
        if grid is None:
            return cast("Tensor | None", bias)
        zero = torch.zeros((), dtype=torch.int32, device=grid.device)
        return fake_quantize(bias, grid, zero, *BIAS_RANGE, axis=0)

    def begin_export(self) -> None:
        """Carry the quantized weight as a constant and emit Q/DQ-able ops until :meth:`end_export`. A weight
        quantizer that never ran gets its scale from the weight for the graph, and its state back at
        :meth:`end_export`: exporting leaves the model as it was (a trial: an idle layer, whose weight the model reads
        directly, was then stored in 8 bits by the next ``save_compressed``)."""
        quantizer = self.weight_fake_quant
        idle = not (quantizer.initialized or quantizer.is_learned)
        self._quantizer_before = {k: v.clone() for k, v in quantizer.state_dict().items()} if idle else None
        with torch.no_grad():
            self._export_weight = self.weight_fake_quant(self.weight).detach().clone()
            bias = self.quantized_bias() if self.quantize_bias else None
            self._export_bias = None if bias is None else bias.detach().clone()
        self.weight_fake_quant.begin_export(self._export_weight.shape[self.weight_fake_quant.channel_axis])
        if isinstance(self.input_fake_quant, FakeQuantizer):
            self.input_fake_quant.begin_export()

    def begin_int4(self, weights: Any) -> None:
        """Compute through ``MatMulNBits`` (see :mod:`.int4`) until :meth:`end_int4`."""
        self._int4 = weights

    def end_int4(self) -> None:
        self._int4 = None

    def end_export(self) -> None:
        self._export_weight = None
        self._export_bias = None
        self.weight_fake_quant.end_export()
        before, self._quantizer_before = self._quantizer_before, None
        if before is not None:
            self.weight_fake_quant.load_state_dict(before)
        if isinstance(self.input_fake_quant, FakeQuantizer):
            self.input_fake_quant.end_export()


class QATLinear(QATLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; same Parameters as the float layer."""

    float_class = nn.Linear

    @classmethod
    def from_float(
        cls, module: nn.Linear, config: QuantConfig, *, weight_quantizer: FakeQuantizer | None = None
    ) -> QATLinear:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them), and
        ``weight_quantizer`` when given (see :func:`check_shared_quantizer`)."""
        out_features, in_features = module.weight.shape  # a foreign Linear (PyG's) names them otherwise
        new = cls(in_features, out_features, module.bias is not None, device="meta")
        new._adopt(module, config, weight_quantizer=check_shared_quantizer(module, weight_quantizer))
        return new

    def to_float(self) -> nn.Linear:
        """The float layer back, with the same Parameters."""
        float_layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        return cast(nn.Linear, self._share_into(float_layer))

    def forward(self, input: Tensor) -> Tensor:
        if self._int4 is not None:
            return cast(Tensor, self._int4(input))
        return F.linear(self.input_fake_quant(input), self.quantized_weight(), self.quantized_bias())


def _conv_arguments(module: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
        "device": "meta",
    }


class _QATConvMixin(QATLayer):
    @classmethod
    def from_float(
        cls, module: nn.modules.conv._ConvNd, config: QuantConfig, *, weight_quantizer: FakeQuantizer | None = None
    ) -> nn.Module:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them), and
        ``weight_quantizer`` when given (see :func:`check_shared_quantizer`)."""
        new = cls(**_conv_arguments(module))
        new._adopt(module, config, weight_quantizer=check_shared_quantizer(module, weight_quantizer))
        return cast(nn.Module, new)

    def to_float(self) -> nn.Module:
        """The float layer back, with the same Parameters."""
        return self._share_into(self.float_class(**_conv_arguments(cast(Any, self))))

    def forward(self, input: Tensor) -> Tensor:
        conv = cast(Any, self)
        return conv._conv_forward(self.input_fake_quant(input), self.quantized_weight(), self.quantized_bias())


class QATConv1d(_QATConvMixin, nn.Conv1d):
    float_class = nn.Conv1d


class QATConv2d(_QATConvMixin, nn.Conv2d):
    float_class = nn.Conv2d


class QATConv3d(_QATConvMixin, nn.Conv3d):
    float_class = nn.Conv3d


class _QATTransformersConv1DMixin(QATLayer):
    """``transformers``' Conv1D (weight ``(in, out)``) with fake-quantized weight (per output column) and input."""

    nf: int
    nx: int

    @classmethod
    def from_float(
        cls, module: nn.Module, config: QuantConfig, *, weight_quantizer: FakeQuantizer | None = None
    ) -> nn.Module:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them), and
        ``weight_quantizer`` when given (see :func:`check_shared_quantizer`)."""
        with torch.device("meta"):
            new = cls(cast(Any, module).nf, cast(Any, module).nx)  # type: ignore[call-arg]
        new._adopt(module, config, weight_quantizer=check_shared_quantizer(module, weight_quantizer))
        return cast(nn.Module, new)

    def to_float(self) -> nn.Module:
        """The float layer back, with the same Parameters."""
        with torch.device("meta"):
            float_layer = self.float_class(self.nf, self.nx)
        return self._share_into(float_layer)

    def forward(self, input: Tensor) -> Tensor:
        if self._int4 is not None:
            return cast(Tensor, self._int4(input))
        x = self.input_fake_quant(input)
        flat = x.reshape(-1, x.size(-1))
        weight = self.quantized_weight()
        bias = self.quantized_bias()
        out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
        return out.view(*input.shape[:-1], self.nf)


class QATEmbedding(QATLayer, nn.Embedding):
    """``nn.Embedding`` with fake-quantized rows (one scale per token's vector, or per group of it).

    Opt-in: only an exact module name in ``include`` selects an embedding. Its input is indices,
    never quantized.
    """

    float_class = nn.Embedding

    @classmethod
    def from_float(
        cls, module: nn.Embedding, config: QuantConfig, *, weight_quantizer: FakeQuantizer | None = None
    ) -> QATEmbedding:
        """A fake-quant embedding sharing ``module``'s Parameters, and ``weight_quantizer`` when given (see
        :func:`check_shared_quantizer`)."""
        new = cls(**_embedding_arguments(module))
        shared = check_shared_quantizer(module, weight_quantizer)
        new._adopt(module, config, quantize_input=False, weight_quantizer=shared)  # its input is indices
        return new

    def to_float(self) -> nn.Embedding:
        return cast(nn.Embedding, self._share_into(nn.Embedding(**_embedding_arguments(self))))

    def forward(self, input: Tensor) -> Tensor:
        gather = getattr(self._int4, "gather", None)  # int4 export: rows read from the packed codes
        if gather is not None:
            return cast(Tensor, gather(input))
        table = self._int4.weight if self._int4 is not None else self.quantized_weight()  # int4 export: a constant
        return F.embedding(
            input, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip


def check_shared_quantizer(module: nn.Module, quantizer: FakeQuantizer | None) -> FakeQuantizer | None:
    """``quantizer`` if it can quantize ``module``'s weight as it quantizes the weight it was made for: a weight
    quantizer whose channels lie along the weight's output axis, as many as it has. Layers tied to one weight (an
    output head and its token embedding) share one, so both compute with the same integer weight.

    Raises:
        TypeError: ``quantizer`` is not a weight :class:`FakeQuantizer`.
        ValueError: its channels do not fit ``module``'s weight.
    """
    if quantizer is None:
        return None
    if not isinstance(quantizer, FakeQuantizer) or quantizer.role != "weight":
        raise TypeError(f"`weight_quantizer` must be a weight FakeQuantizer, got {quantizer!r}.")
    weight: Tensor = cast(Any, module).weight
    out_axis, _ = weight_axes(module)
    channels = weight.shape[out_axis]
    if quantizer.per_channel and (quantizer.channel_axis != out_axis or quantizer.scale.shape[0] != channels):
        raise ValueError(
            f"`weight_quantizer` scales {quantizer.scale.shape[0]} channels along axis {quantizer.channel_axis}, "
            f"but {type(module).__name__}'s weight {tuple(weight.shape)} has {channels} output channels along axis "
            f"{out_axis}."
        )
    return quantizer


def _embedding_arguments(module: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": module.num_embeddings,
        "embedding_dim": module.embedding_dim,
        "padding_idx": module.padding_idx,
        "max_norm": module.max_norm,
        "norm_type": module.norm_type,
        "scale_grad_by_freq": module.scale_grad_by_freq,
        "sparse": module.sparse,
        "device": "meta",
    }


QAT_CLASSES: dict[type[nn.Module], Any] = {
    nn.Linear: QATLinear,
    nn.Embedding: QATEmbedding,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
}
_TRANSFORMERS_CONV1D_QAT = "QATTransformersConv1D"


def qat_class(kind: type[nn.Module]) -> Any:
    """The fake-quant class of a float layer type (``None``: not quantizable)."""
    if kind in QAT_CLASSES:
        return QAT_CLASSES[kind]
    conv1d = transformers_conv1d()
    if conv1d is None or kind is not conv1d:
        return None
    made = type(
        _TRANSFORMERS_CONV1D_QAT,
        (_QATTransformersConv1DMixin, conv1d),
        {"float_class": conv1d, "__module__": __name__, "__qualname__": _TRANSFORMERS_CONV1D_QAT},
    )
    QAT_CLASSES[conv1d] = made
    globals()[_TRANSFORMERS_CONV1D_QAT] = made  # pickle finds it by name
    return made


def __getattr__(name: str) -> Any:
    """``QATTransformersConv1D`` is made on first use (it subclasses ``transformers``' Conv1D); unpickling asks here."""
    if name == _TRANSFORMERS_CONV1D_QAT:
        import transformers.pytorch_utils

        made = qat_class(transformers.pytorch_utils.Conv1D)
        if made is not None:
            return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def group_count(weight: Tensor, in_axis: int, group_size: int | None) -> int | None:
    """Scale groups per output channel for ``group_size`` (``None``: the layer stays per channel)."""
    if group_size is None or weight.dim() != 2 or weight.shape[in_axis] % group_size:
        return None
    return weight.shape[in_axis] // group_size


def qat_class_of(module: nn.Module) -> Any:
    """The fake-quant class for ``module`` (``None``: not quantizable): its type's; its base's for a subclass that
    keeps its base's computation (only its ``__init__`` is its own: transformers' ``EfficientNetDepthwiseConv2d``; a
    trial found them left in float); or nn.Linear's for a subclass whose own forward computes what nn.Linear's does
    (transformers' ``FalconLinear``: ``x @ W.T + b``), or a layer of another library that does
    (:func:`~.layers.foreign_linear_types`, PyTorch Geometric's Linear), checked on a random input. A subclass that
    computes anything else stays float. A subclass converted back to float is its base class; a foreign Linear is an
    ``nn.Linear``."""
    made = qat_class(type(module))
    if made is not None:
        return made
    base = _computing_base(module)
    if base is not None:
        return QAT_CLASSES[base]
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward and _computes_linear(module):
        return QAT_CLASSES[nn.Linear]
    if isinstance(module, foreign_linear_types()) and _computes_linear(module):  # PyG's Linear (trial FD)
        return QAT_CLASSES[nn.Linear]
    return None


_CLASS_METADATA = frozenset(
    ["__module__", "__qualname__", "__doc__", "__init__", "__firstlineno__", "__static_attributes__",
     "__annotations__", "__dict__", "__weakref__", "__orig_bases__", "__parameters__"]
)  # fmt: skip


def _computing_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported layer class that ``module`` subclasses with nothing of its own but an ``__init__``: no method,
    no class attribute, no buffer, submodule or instance attribute (a private one too) its base lacks (the
    fake-quant layer that takes its place has exactly its base's). ``None`` for any other module."""
    kind = type(module)
    base = next((b for b in QAT_CLASSES if b is not kind and isinstance(module, b)), None)
    if base is None:
        return None
    own = [cls for cls in kind.__mro__ if cls not in base.__mro__]  # mixins after the base too (trial BA)
    if any(set(vars(cls)) - _CLASS_METADATA for cls in own):
        return None
    own_attributes = set(vars(module)) - _base_attributes(base) - _BOOKKEEPING
    if module._buffers or module._modules or own_attributes:
        return None
    return base


_BASE_ATTRIBUTES: dict[type[nn.Module], frozenset[str]] = {}
# transformers marks every module it initialized, plain ones too; `compact` every module it compacted (a trial:
# EfficientNet's depthwise Conv2d subclasses stayed float after `compact`; `compact.COMPACTED_FLAG`)
_BOOKKEEPING = frozenset(["_is_hf_initialized", "_lightning_compress_compacted"])


def _base_attributes(base: type[nn.Module]) -> frozenset[str]:
    """The instance attributes of a ``base`` layer (built once, on the meta device)."""
    if base not in _BASE_ATTRIBUTES:
        made = base(1, 1, device="meta") if base in (nn.Linear, nn.Embedding) else base(1, 1, 1, device="meta")
        _BASE_ATTRIBUTES[base] = frozenset(vars(made))
    return _BASE_ATTRIBUTES[base]


def _computes_linear(module: nn.Module) -> bool:
    weight, bias = module.weight, getattr(module, "bias", None)
    if not isinstance(weight, nn.Parameter) or type(weight) is not nn.Parameter or weight.dim() != 2:
        return False  # a distributed tensor, or a lazy one not yet given its size (PyG's `in_channels=-1`)
    if weight.is_meta or not weight.dtype.is_floating_point:
        return False  # nothing to run it on
    x = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            out = module(x)
            torch.testing.assert_close(out, F.linear(x, weight, bias))
    except Exception:  # another shape, another result, or it cannot run alone: not nn.Linear's computation
        return False
    return True


def quantizable(module: nn.Module) -> bool:
    """Whether ``module`` has a fake-quant layer (Linear, Conv1d/2d/3d, ``transformers`` Conv1D) or is one."""
    return isinstance(module, QATLayer) or qat_class_of(module) is not None


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fake-quantized layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATLayer)]  # type: ignore[misc]


def settings_differ(layer: nn.Module, config: QuantConfig) -> list[str]:
    """The settings of ``config`` that a fake-quant ``layer`` was converted with otherwise, as ``"name=had (asked)"``
    (``[]``: the same; the observers' averaging constant may differ)."""
    quantizer = cast(Any, layer).weight_fake_quant
    weight = cast(Any, layer).weight
    _, in_axis = weight_axes(layer)
    groups = (group_count(weight, in_axis, config.group_size) or 0) if config.group_size is not None else 0
    inputs = getattr(layer, "input_fake_quant", None)
    inputs = inputs if isinstance(inputs, FakeQuantizer) else None
    had = {
        "weight_bits": quantizer.bits,
        "scale": quantizer.mode,
        "groups": quantizer.groups,
        "activation_bits": None if inputs is None else inputs.bits,
        "activation_granularity": None if inputs is None else ("per_token" if inputs.per_token else "per_tensor"),
        "quantize_bias": bool(getattr(layer, "quantize_bias", False)),
    }
    embedding = isinstance(layer, nn.Embedding)  # its input is indices: never quantized
    has_bias = getattr(layer, "bias", None) is not None
    asked = {
        "weight_bits": config.weight_bits,
        "scale": config.scale,
        "groups": groups,
        "activation_bits": None if embedding else config.activation_bits,
        "activation_granularity": None
        if embedding or config.activation_bits is None
        else config.activation_granularity,
        "quantize_bias": bool(config.quantize_bias and not embedding and has_bias),
    }
    return [f"{k}={had[k]!r} ({asked[k]!r} asked)" for k in had if had[k] != asked[k]]
