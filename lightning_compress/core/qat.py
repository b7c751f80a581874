"""Fake-quantization modules and the conversions to and from them. Pure torch.

:func:`convert_to_qat` swaps each selected ``nn.Linear``/``nn.ConvNd`` for a subclass
(:class:`QATLinear`, :class:`QATConv2d`, ...) that **shares the same Parameter objects**, so
optimizers keep working and ``weight``/``bias`` keep their ``state_dict`` keys; the quantizers add
their own keys (``<layer>.weight_fake_quant.scale``, ...). The model's ``forward`` is never
touched: any signature works. :func:`convert_to_float` undoes it. Until a quantizer is enabled its
module computes exactly what the float module computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_bool, check_module
from .collectives import Collectives, TorchDistributed
from .fake_quant import SCALE_MODES, FakeQuantizer, QuantConfig
from .layers import registered_names, transformers_conv1d, weight_axes
from .quant import BIAS_RANGE, accumulator_scale, fake_quantize, int_range, power_of_two_scale
from .selection import Target, experts_picked, select_targets
from .sharding import full, is_sharded

__all__ = [
    "SCALE_MODES",
    "FakeQuantizer",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATEmbedding",
    "QATLinear",
    "QuantConfig",
    "calibrate",
    "convert_to_float",
    "convert_to_qat",
    "enable_fake_quant",
    "export_mode",
    "qat_modules",
    "quantizable",
    "quantizable_layers",
    "quantizers",
    "search_power_of_two_shifts",
]


class _QATMixin:
    """Forward of a float layer with fake-quantized weight and input."""

    weight: Tensor
    training: bool
    weight_fake_quant: FakeQuantizer
    input_fake_quant: nn.Module
    float_class: ClassVar[type[nn.Module]]
    _export_weight: Tensor | None = None
    _export_bias: Tensor | None = None
    _int4: Any = None  # an Int4Weights while `int4_export_mode` is on
    quantize_bias: bool = False  # the bias on the accumulator's grid (QuantConfig.quantize_bias)

    def _adopt(self, module: Any, config: QuantConfig, quantize_input: bool = True) -> None:
        """Take ``module``'s Parameters (the same objects) and add the quantizers on their device."""
        layer = cast(Any, self)
        layer.weight = module.weight
        if hasattr(module, "bias"):
            layer.bias = module.bias
        weight: Tensor = module.weight
        device = weight.device
        out_axis, in_axis = weight_axes(module)
        layer.weight_fake_quant = FakeQuantizer(
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
            ).to(device)
        )
        has_bias = getattr(module, "bias", None) is not None
        layer.quantize_bias = bool(config.quantize_bias and quantize_input and has_bias)
        layer.train(module.training)  # a model in eval mode must not start observing

    def _share_into(self, new: Any) -> nn.Module:
        layer = cast(Any, self)
        new.weight = layer.weight
        if hasattr(layer, "bias"):
            new.bias = layer.bias
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
        """Carry the quantized weight as a constant and emit Q/DQ-able ops until :meth:`end_export`."""
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
        if isinstance(self.input_fake_quant, FakeQuantizer):
            self.input_fake_quant.end_export()


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; same Parameters as the float layer."""

    float_class = nn.Linear

    @classmethod
    def from_float(cls, module: nn.Linear, config: QuantConfig) -> QATLinear:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them)."""
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta")
        new._adopt(module, config)
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


class _QATConvMixin(_QATMixin):
    @classmethod
    def from_float(cls, module: nn.modules.conv._ConvNd, config: QuantConfig) -> nn.Module:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them)."""
        new = cls(**_conv_arguments(module))
        new._adopt(module, config)
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


class _QATTransformersConv1DMixin(_QATMixin):
    """``transformers``' Conv1D (weight ``(in, out)``) with fake-quantized weight (per output column) and input."""

    nf: int
    nx: int

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig) -> nn.Module:
        """A fake-quant layer sharing ``module``'s Parameters (built on the meta device, then given them)."""
        with torch.device("meta"):
            new = cls(cast(Any, module).nf, cast(Any, module).nx)  # type: ignore[call-arg]
        new._adopt(module, config)
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


class QATEmbedding(_QATMixin, nn.Embedding):
    """``nn.Embedding`` with fake-quantized rows (one scale per token's vector, or per group of it).

    Opt-in: only an exact module name in ``include`` selects an embedding. Its input is indices,
    never quantized.
    """

    float_class = nn.Embedding

    @classmethod
    def from_float(cls, module: nn.Embedding, config: QuantConfig) -> QATEmbedding:
        new = cls(**_embedding_arguments(module))
        new._adopt(module, config, quantize_input=False)  # its input is indices
        return new

    def to_float(self) -> nn.Embedding:
        return cast(nn.Embedding, self._share_into(nn.Embedding(**_embedding_arguments(self))))

    def forward(self, input: Tensor) -> Tensor:
        table = self._int4.weight if self._int4 is not None else self.quantized_weight()  # int4 export: a constant
        return F.embedding(
            input, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip


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


_QAT_CLASS: dict[type[nn.Module], Any] = {
    nn.Linear: QATLinear,
    nn.Embedding: QATEmbedding,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
}
_TRANSFORMERS_CONV1D_QAT = "QATTransformersConv1D"


def _qat_class(kind: type[nn.Module]) -> Any:
    """The fake-quant class of a float layer type (``None``: not quantizable)."""
    if kind in _QAT_CLASS:
        return _QAT_CLASS[kind]
    conv1d = transformers_conv1d()
    if conv1d is None or kind is not conv1d:
        return None
    made = type(
        _TRANSFORMERS_CONV1D_QAT,
        (_QATTransformersConv1DMixin, conv1d),
        {"float_class": conv1d, "__module__": __name__, "__qualname__": _TRANSFORMERS_CONV1D_QAT},
    )
    _QAT_CLASS[conv1d] = made
    globals()[_TRANSFORMERS_CONV1D_QAT] = made  # pickle finds it by name
    return made


def __getattr__(name: str) -> Any:
    """``QATTransformersConv1D`` is made on first use (it subclasses ``transformers``' Conv1D); unpickling asks here."""
    if name == _TRANSFORMERS_CONV1D_QAT:
        import transformers.pytorch_utils

        made = _qat_class(transformers.pytorch_utils.Conv1D)
        if made is not None:
            return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def group_count(weight: Tensor, in_axis: int, group_size: int | None) -> int | None:
    """Scale groups per output channel for ``group_size`` (``None``: the layer stays per channel)."""
    if group_size is None or weight.dim() != 2 or weight.shape[in_axis] % group_size:
        return None
    return weight.shape[in_axis] // group_size


def quantizable(module: nn.Module) -> bool:
    """Whether ``module`` has a fake-quant layer (Linear, Conv1d/2d/3d, ``transformers`` Conv1D) or is one."""
    return isinstance(module, _QATMixin) or _qat_class(type(module)) is not None


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fake-quantized layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QATMixin)]  # type: ignore[misc]


def _quantizable_targets(
    model: nn.Module, include: Sequence[str] | str | None, exclude: Sequence[str] | str | None
) -> list[Target]:
    owned_by_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = []
    subclasses: set[str] = set()
    for target in select_targets(model, include, exclude):
        module = target.module
        if isinstance(module, _QATMixin):
            targets.append(target)
            continue
        if _qat_class(type(module)) is None or id(module) in owned_by_mha:
            subclass = _subclass_note(module)
            if subclass:
                subclasses.add(type(module).__name__)
            if include is None:
                continue  # default selection: silently leave e.g. MultiheadAttention's projection alone
            raise ValueError(
                f"`include` selects {target.name!r} ({type(module).__name__}); quantization-aware training "
                "supports nn.Linear, nn.Conv1d/2d/3d and transformers' Conv1D called through their forward"
                + (f"; {subclass}" if subclass else "")
                + "."
            )
        targets.append(target)
    experts = experts_picked(model, include, exclude)
    if experts:
        warnings.warn(
            f"quantization-aware training leaves the mixture-of-experts weights of {experts[:3]}"
            f"{' ...' if len(experts) > 3 else ''} in float: they are 3-d tensors, not Linear layers whose forward "
            "a fake-quantized layer can take over (pruning selects them).",
            UserWarning,
            stacklevel=3,
        )
    if not targets:
        why = (
            f": its layers ({', '.join(sorted(subclasses))}) subclass nn.Linear/nn.Conv with a forward of their own, "
            "which a fake-quantized layer cannot take over"
            if subclasses
            else ""
        )
        raise ValueError(f"no nn.Linear or nn.Conv layer of {type(model).__name__} can be quantized{why}.")
    _say_tied_partners(model, targets, include)
    return targets


def _say_tied_partners(model: nn.Module, targets: list[Target], include: Sequence[str] | str | None) -> None:
    """Layers that share a selected layer's weight (tied Linear layers) are converted once, under the first name:
    a named one is refused, the others are said."""
    chosen = {id(t.param): t.name for t in targets}
    picked = {t.name for t in targets}
    partners = {
        name: chosen[id(module.weight)]
        for name, module in model.named_modules()
        if name not in picked and id(getattr(module, "weight", None)) in chosen and _qat_class(type(module)) is not None
    }
    if not partners:
        return
    named = [n for n in partners if include is not None and n in include]
    described = ", ".join(f"{n!r} shares {first!r}'s weight" for n, first in list(partners.items())[:3])
    if named:
        raise ValueError(
            f"`include` names {named}, but {described}: quantization-aware training converts one layer per weight "
            "(the first). Leave the tied layer out of `include`, or untie the weights to quantize both."
        )
    warnings.warn(
        f"quantization-aware training converts one layer per weight: {described}, so it computes with the float "
        "weight (and a compressed file stores that weight in float). Untie the weights to quantize both.",
        UserWarning,
        stacklevel=4,
    )


def _subclass_note(module: nn.Module) -> str:
    """Why a subclass of a supported layer is left out ("" for other modules)."""
    base = next((kind for kind in _QAT_CLASS if isinstance(module, kind) and kind is not type(module)), None)
    if base is None or type(module).forward is base.forward:
        return ""
    return (
        f"{type(module).__name__} subclasses {base.__name__} with a forward of its own, which a fake-quantized "
        "layer cannot take over"
    )


def quantizable_layers(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> list[str]:
    """Names of the layers :func:`convert_to_qat` would fake-quantize, without changing anything (or warning: the
    conversion says what it leaves out). Raises as the conversion would for a selection it refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [t.name for t in _quantizable_targets(model, include, exclude)]


def convert_to_qat(
    model: nn.Module,
    config: QuantConfig,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Swap the selected layers for fake-quant layers (disabled until enabled). Returns their names.

    Layers that already are QAT layers are kept. All checks happen before any change.
    """
    check_module(model)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig instance, e.g. QuantConfig(weight_bits=8), got {config!r}.")
    targets = _quantizable_targets(model, include, exclude)
    in_fused_block = {
        id(m)
        for block in model.modules()
        if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        for m in block.modules()
    }
    names = []
    per_channel = [
        t.name
        for t in targets
        if config.group_size is not None
        and not isinstance(t.module, _QATMixin)
        and group_count(t.param, t.in_axis, config.group_size) is None
    ]
    if per_channel:
        warnings.warn(
            f"lightning-compress: {per_channel} keep per-channel weight scales: `group_size`={config.group_size} "
            "needs a 2-d weight whose input size it divides.",
            UserWarning,
            stacklevel=2,
        )
    kept = [
        t.name
        for t in targets
        if isinstance(t.module, _QATMixin)
        and (t.module.weight_fake_quant.bits, t.module.weight_fake_quant.mode) != (config.weight_bits, config.scale)
    ]
    if kept:
        warnings.warn(
            f"lightning-compress: {kept} are already fake-quantized with other settings and keep them; "
            "`convert_to_float` first to convert them again.",
            UserWarning,
            stacklevel=2,
        )
    registered = registered_names(model)
    for target in targets:
        module = target.module
        names.append(target.name)
        if isinstance(module, _QATMixin):
            continue
        new = _qat_class(type(module)).from_float(module, config)
        if id(module) in in_fused_block:
            # PyTorch's fused TransformerEncoderLayer fast path reads weights directly (skipping our forward);
            # it is disabled whenever a submodule has a forward hook, so register a no-op one
            new.register_forward_pre_hook(_keep_unfused)
        for name in registered[id(module)]:  # a layer registered under two names stays one layer
            _replace(model, name, new)
    return names


def _keep_unfused(module: nn.Module, args: Any) -> None:
    return None


def convert_to_float(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Replace every fake-quant layer (or those named in ``layers``) by its float layer (same Parameters).
    Returns their names."""
    check_module(model)
    if isinstance(layers, str):
        raise TypeError(f"`layers` must be a list of layer names or None, got the string {layers!r}.")
    wanted = None if layers is None else set(layers)
    names = []
    registered = registered_names(model)
    for name, module in qat_modules(model):
        if wanted is None or name in wanted:
            float_layer = cast(Any, module).to_float()
            for alias in registered[id(module)]:
                _replace(model, alias, float_layer)
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
    module: nn.Module,
    inputs: Sequence[Tensor],
    span: Sequence[int] = (-1, 0, 1, 2),
    collectives: Collectives | None = None,
) -> tuple[int, int | None, float]:
    """Choose the weight and input shifts of one power-of-two QAT layer on real inputs.

    Candidates are the no-clipping shift ``p0`` (from the current ranges) plus ``span``; the pair
    with the smallest mean squared error of the layer output against the float output wins and
    is fixed (:meth:`FakeQuantizer.set_shift`). Returns ``(weight shift, input shift, error)``.

    ``collectives``: with several processes (DDP, FSDP2), each passes its own inputs; the input range and
    every candidate's error are reduced over all of them (one collective each), so every process
    fixes the same shifts, those the union of the inputs would choose (each uses as many batches as the
    process with the fewest). ``None``: ``torch.distributed`` when initialized. Under FSDP2 run it inside
    :func:`~.sharding.unsharded` when the layer is not its own ``fully_shard`` unit.
    """
    group = collectives or TorchDistributed()
    if not isinstance(module, _QATMixin):
        raise TypeError(f"expected a QAT layer, got {type(module).__name__}")
    wq = module.weight_fake_quant
    aq = module.input_fake_quant if isinstance(module.input_fake_quant, FakeQuantizer) else None
    if not inputs:
        raise ValueError("shift search needs at least one captured input batch.")
    if group.world_size > 1:  # every process runs as many forwards (FSDP2 may all-gather in each)
        inputs = inputs[: int(group.all_reduce(torch.tensor([len(inputs)]), "min").item())]
    states = [(q, q.fake_quant_enabled, q.observer_enabled) for q in (wq, aq) if q is not None]
    for q, _, _ in states:
        q.fake_quant_enabled = False
        q.observer_enabled = False
    reference = [module(x) for x in inputs]
    _, w_qmax = int_range(wq.bits, True)
    w0 = int(power_of_two_scale(full(cast(Tensor, module.weight)).abs().max(), w_qmax)[0])
    a0 = None
    if aq is not None:
        lo = -float(group.all_reduce(torch.tensor([-min(float(x.min()) for x in inputs)]), "max").item())
        hi = float(group.all_reduce(torch.tensor([max(float(x.max()) for x in inputs)]), "max").item())
        aq.set_signed(lo < 0)
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
            local = sum(float(((module(x) - ref) ** 2).mean()) for x, ref in zip(inputs, reference, strict=True))
            error = float(group.all_reduce(torch.tensor([local], dtype=torch.float64), "sum").item())
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
        for layer in layers:
            layer.begin_export()
        yield model
    finally:
        for layer in layers:
            layer.end_export()
        for module, mode in training:
            module.training = mode
        for param, flag in grads:
            param.requires_grad_(flag)


def quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """All :class:`FakeQuantizer` modules with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]


def learned_scales(model: nn.Module) -> set[nn.Parameter]:
    """The learned step sizes (``scale="learned"``, LSQ) of ``model``'s quantizers; empty for other scales.

    Under FSDP2 pass them to ``fully_shard(..., ignored_params=learned_scales(self))`` in ``configure_model``:
    ``fully_shard`` cannot shard a per-tensor (0-dim) scale, and left whole on every process they are
    updated identically, since the ``QuantizationAwareTraining`` callback averages their gradients
    across processes before every optimizer step.
    """
    return {q.scale for _, q in quantizers(model) if isinstance(q.scale, nn.Parameter)}


def calibrate(model: nn.Module, batches: Iterable[Any]) -> int:
    """Observe ranges on ``batches`` (each passed to ``model`` as ``model(*batch)`` for a tuple,
    ``model(**batch)`` for a dict, ``model(batch)`` otherwise) without fake quantization or gradients.

    The model runs in eval mode, as it will be deployed (BatchNorm uses and keeps its running statistics,
    dropout is off); only the quantizers observe. Restores the training mode and quantizer flags after;
    the observed ranges stay. Returns the number of batches seen. The Lightning-free path:
    ``convert_to_qat`` -> ``calibrate`` -> :func:`enable_fake_quant`.

    Raises:
        TypeError: ``batches`` is not an iterable of batches (a single tensor: pass ``[tensor]``).
        ValueError: no batch, or a batch gave NaN or infinite activations. On any error the quantizers are
            left as they were before the call.
    """
    check_module(model)
    if isinstance(batches, (Tensor, str, bytes)) or not isinstance(batches, Iterable):
        hint = " (one tensor: pass `[tensor]`)" if isinstance(batches, Tensor) else ""
        raise TypeError(
            f"`batches` must be an iterable of batches (a DataLoader or a list){hint}, got {type(batches).__name__}."
        )
    found = quantizers(model)
    if not found:
        raise ValueError("`model` has no fake-quant layer: call `convert_to_qat(model, config)` first.")
    flags = [(q, q.observer_enabled, q.fake_quant_enabled) for _, q in found]
    before = {name: {k: v.clone() for k, v in q.state_dict().items()} for name, q in found}
    training = [(m, m.training) for m in model.modules()]
    count = 0
    try:
        model.eval()  # BatchNorm statistics and dropout as deployed, and left as they were
        for q, _, _ in flags:
            q.train()  # observers update in training mode
            q.observer_enabled = True
            q.fake_quant_enabled = False
        from .tracing import call_model  # tracing imports this module

        with torch.no_grad():
            for batch in batches:
                try:
                    call_model(model, batch)
                except TypeError as err:
                    if not (isinstance(batch, (tuple, list)) and "positional argument" in str(err)):
                        raise
                    raise TypeError(
                        f"`batches` yields {type(batch).__name__}s of {len(batch)}, which calibrate passes to the "
                        f"model as {len(batch)} positional inputs ({err}). Pass the inputs only: from an (x, y) "
                        "loader, `(x for x, _ in loader)`. The ranges were not changed."
                    ) from err
                count += 1
        broken = [name for name, q in found if not all(bool(t.isfinite().all()) for t in q.state_dict().values())]
        if broken:
            raise ValueError(
                f"`batches` gave NaN or infinite values to the quantizers {broken[:3]}"
                f"{' ...' if len(broken) > 3 else ''}: calibrate on finite data. The ranges were not changed."
            )
    except BaseException:
        for name, q in found:
            q.load_state_dict(before[name])
            q.discard_pending()
        raise
    finally:
        for q, observing, enabled in flags:
            q.observer_enabled = observing
            q.fake_quant_enabled = enabled
        for module, mode in training:
            module.training = mode
    if count == 0:
        raise ValueError("`batches` was empty: calibration needs at least one batch.")
    return count


def enable_fake_quant(model: nn.Module, enabled: bool = True, *, observe: bool | None = None) -> int:
    """Switch fake quantization on (or off) in every quantizer of ``model``; returns how many.

    ``observe``: switch every observer on or off too. ``None`` (default): weight observers follow
    ``enabled`` (a weight's scale then follows the weight as it trains, and is read from it in
    eval mode the first time), activation observers are left as they are (as :func:`calibrate`
    left them). Learned (LSQ) scales start training when quantization is on. Export a model with
    fake quantization on to get int8 (or int4 groups).
    """
    check_module(model)
    check_bool(enabled, "enabled")
    check_bool(observe, "observe", optional=True)
    found = quantizers(model)
    if not found:
        raise ValueError("`model` has no fake-quant layer: call `convert_to_qat(model, config)` first.")
    for _, q in found:
        q.fake_quant_enabled = enabled
        if observe is not None:
            q.observer_enabled = observe
        elif q.role == "weight":
            q.observer_enabled = enabled
    saturated = [
        name
        for name, layer in qat_modules(model)
        if enabled
        and (grid := cast(Any, layer).bias_grid()) is not None
        and not is_sharded(bias := cast(Any, layer).bias)  # an FSDP2 shard of it is not checked
        and bool((bias.detach().abs() > grid * BIAS_RANGE[1]).any())
    ]
    if saturated:
        warnings.warn(
            f"enable_fake_quant: biases of {saturated[:3]}{' ...' if len(saturated) > 3 else ''} exceed their int32 "
            "grid (|b| > 2^31 x weight scale x input scale): the layer adds the clamped value. Their scales are tiny; "
            "set `quantize_bias=False` to keep those biases in float.",
            UserWarning,
            stacklevel=2,
        )
    unseen = [name for name, q in found if enabled and not q.has_range]
    if unseen:
        warnings.warn(
            f"enable_fake_quant: {unseen[:3]}{' ...' if len(unseen) > 3 else ''} never observed an activation (no "
            "`calibrate(model, batches)` reached them): they pass their inputs through in float until a forward in "
            "training mode with observers on gives them a range.",
            UserWarning,
            stacklevel=2,
        )
    return len(found)
