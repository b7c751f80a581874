"""The conversions to and from fake-quantized layers, calibration and the switch. Pure torch.

:func:`convert_to_qat` swaps each selected ``nn.Linear``/``nn.ConvNd`` for a subclass
(:class:`~.qat_layers.QATLinear`, :class:`~.qat_layers.QATConv2d`, ...; :mod:`.qat_layers`) that **shares the same
Parameter objects**, so optimizers keep working and ``weight``/``bias`` keep their ``state_dict`` keys. The model's
``forward`` is never touched: any signature works. :func:`convert_to_float` undoes it. The layer classes and
:func:`~.shift_search.search_power_of_two_shifts` are importable from here too.
"""

from __future__ import annotations

import fnmatch
import glob
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import qat_layers
from .adapters import declared_lora_base
from .checks import check_bool, check_module
from .fake_quant import SCALE_MODES, FakeQuantizer, QuantConfig
from .layers import class_label, registered_names, restore_training
from .qat_held import replace_held, warn_held_by_objects
from .qat_layers import (
    QAT_CLASSES,
    QATConv1d,
    QATConv2d,
    QATConv3d,
    QATEmbedding,
    QATLayer,
    QATLinear,
    group_count,
    keep_unfused,
    qat_class_of,
    qat_modules,
    quantizable,
    settings_differ,
)
from .qat_ties import say_unshared_partners, shared_partners
from .quant import BIAS_RANGE
from .quantizer_state import check_quantizer_state, check_saved_scales
from .selection import (
    UNSELECTED_SHARE,
    Target,
    module_tensor_holders,
    normalize_patterns,
    select_targets,
    unselected_weights,
)
from .sharding import full, is_sharded
from .shift_search import search_power_of_two_shifts
from .wrappers import is_compiled, plain_name

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
    "check_quantizer_state",
    "check_saved_scales",
    "convert_listed",
    "convert_to_float",
    "convert_to_qat",
    "enable_fake_quant",
    "export_mode",
    "qat_modules",
    "quantizable",
    "quantizable_layers",
    "quantizers",
    "read_weight_ranges",
    "search_power_of_two_shifts",
    "settings_differ",
]


def __getattr__(name: str) -> Any:
    """Pickles of models converted before the layer classes moved to :mod:`.qat_layers` name this module."""
    if name == "QATTransformersConv1D":
        return getattr(qat_layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _class_cache() -> Callable[[nn.Module], Any]:
    """``qat_class_of`` asked once per layer in one conversion: for an ``nn.Linear`` subclass it runs the layer."""
    known: dict[int, Any] = {}

    def class_of(module: nn.Module) -> Any:
        if id(module) not in known:
            known[id(module)] = qat_class_of(module)
        return known[id(module)]

    return class_of


def _quantizable_targets(
    model: nn.Module,
    include: Sequence[str] | str | None,
    exclude: Sequence[str] | str | None,
    class_of: Callable[[nn.Module], Any] | None = None,
) -> list[Target]:
    class_of = class_of or _class_cache()
    owned_by_mha = {id(m.out_proj): n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    excluded = normalize_patterns(exclude, "exclude") or ()
    held = module_tensor_holders(model, include, exclude)  # said below, with their out_proj
    # a layer torch.compile'd by itself: its compiled forward is bound to the float layer, which a swap would not
    # reach (a trial: trained in float while its ONNX export quantized it)
    compiled_alone = {id(m._orig_mod) for m in model.modules() if is_compiled(m)}
    targets = []
    subclasses: set[str] = set()
    skipped: list[str] = []  # picked by the default or a wildcard, with no fake-quantized form: said once
    lora_bases = 0  # among them, torchtune's LoRA layers (their base weights)
    compiled: list[str] = []
    for target in select_targets(model, include, exclude):
        module = target.module
        if isinstance(module, QATLayer):
            targets.append(target)
            continue
        if id(module) in compiled_alone or is_compiled(module):
            if include is not None and target.name in include:  # the layer's name, or its `._orig_mod`
                raise ValueError(
                    f"`include` selects {target.name!r}, a layer compiled by itself (`torch.compile(layer)`): its "
                    "compiled forward keeps the float layer. Convert before compiling, or compile a module around it."
                )
            compiled.append(target.name.removesuffix("._orig_mod"))
            continue
        if class_of(module) is None or id(module) in owned_by_mha:
            subclass = (
                "its nn.MultiheadAttention multiplies its weight in its own forward without calling the layer"
                if id(module) in owned_by_mha
                else _subclass_note(module)
            )
            if subclass and id(module) not in owned_by_mha:
                subclasses.add(type(module).__name__)
            if include is not None and target.name in include:  # named exactly: refused
                raise ValueError(
                    f"`include` selects {target.name!r} ({class_label(module)}); quantization-aware training "
                    "supports nn.Linear, nn.Conv1d/2d/3d, transformers' Conv1D and PyTorch Geometric's Linear called "
                    "through their forward, and an nn.Embedding named exactly"  # trial CS: the embedding was left out
                    + (f"; {subclass}" if subclass else "")
                    + "."
                )
            if id(module) not in owned_by_mha:
                skipped.append(f"{target.name} ({class_label(module)})")
                lora_bases += declared_lora_base(module)
            else:  # said with its attention below, or not at all when the attention is excluded (trial DD: `attn.*`)
                owner = owned_by_mha[id(module)]
                if owner not in held and not any(fnmatch.fnmatchcase(owner, p) for p in excluded):
                    skipped.append(f"{target.name} (its nn.MultiheadAttention calls it without its forward)")
            continue
        targets.append(target)
    if skipped and targets:
        warnings.warn(
            f"quantization-aware training leaves {len(skipped)} of the {len(skipped) + len(targets)} layers it selects "
            f"in float, {skipped[:3]}{' ...' if len(skipped) > 3 else ''}: it fake-quantizes nn.Linear, "
            "nn.Conv1d/2d/3d and transformers' Conv1D called through their own forward, not transposed convolutions, "
            "nor subclasses with more of their own than an __init__ (a method, a buffer or an attribute, or a forward "
            "that computes something other than their base's on a random input, as an activation applied after it)."
            + (
                f" {lora_bases} are torchtune LoRA layers, which multiply their base weight in their own forward: "
                "their base weights stay float and their adapters too (torchtune's `QATLoRALinear` fake-quantizes "
                "the base weight itself; peft's LoRA layers keep a base `nn.Linear`, which is quantized)."
                if lora_bases
                else ""
            ),
            UserWarning,
            stacklevel=3,
        )
    if compiled:
        warnings.warn(
            f"quantization-aware training leaves {compiled[:3]}{' ...' if len(compiled) > 3 else ''} in float: each is "
            "compiled by itself (`torch.compile(layer)`), and its compiled forward keeps the float layer. Convert "
            "before compiling, or compile a module around the layer.",
            UserWarning,
            stacklevel=3,
        )
    if held:
        warnings.warn(
            f"quantization-aware training leaves the weights of {held[:3]}{' ...' if len(held) > 3 else ''} in "
            "float: their module multiplies them in its own forward (mixture-of-experts 3-d tensors, recurrent "
            "layers, nn.MultiheadAttention, whose out_proj it calls without its forward), which a fake-quantized "
            "Linear cannot take over (pruning selects them).",
            UserWarning,
            stacklevel=3,
        )
    if targets and include is None:
        listed, total = unselected_weights(model, targets, exclude)
        quantized = sum(t.numel for t in targets)
        if total >= UNSELECTED_SHARE * quantized:  # as pruning says it
            warnings.warn(
                f"quantization-aware training leaves {listed}, {total / quantized:.1f}x the {quantized:,} weights it "
                "quantizes) in float: Parameters a module multiplies in its own forward (through einsum or matmul, "
                "as a Fourier layer's spectral weights or XLNet's attention), which no fake-quantized Linear or Conv "
                "takes over. The compressed file stores them as they are.",
                UserWarning,
                stacklevel=3,
            )
    if not targets:
        why = (
            f": its layers ({', '.join(sorted(subclasses))}) subclass nn.Linear/nn.Conv with more of their own "
            "than an __init__ (a forward, a method, a buffer or an attribute), which a fake-quantized layer cannot "
            "take over"
            if subclasses
            else f": the layers selected have no fake-quantized form ({skipped[:3]}{' ...' * (len(skipped) > 3)})"
            if skipped  # trial DF: `include=["attn.*"]` picked only an attention's out_proj, refused with no reason
            else f": {held[:3]}{' ...' * (len(held) > 3)} multiply their weights in their own forward (said above)"
            if held  # trial DH: `include=["attn*"]` picked the attention and its out_proj
            else ""
        )
        raise ValueError(f"no nn.Linear or nn.Conv layer of {type(model).__name__} can be quantized{why}.")
    return targets


_NON_FINITE_SCALES = (
    "(a NaN or infinite weight, or one too large for the scale's dtype: float16 group scales end at 65504 times the "
    "largest code)"
)


def _subclass_note(module: nn.Module) -> str:
    """Why a subclass of a supported layer is left out ("" for other modules)."""
    base = next((kind for kind in QAT_CLASSES if isinstance(module, kind) and kind is not type(module)), None)
    if base is None:
        return ""
    return (
        f"{type(module).__name__} subclasses {base.__name__} with more of its own than an __init__ (a forward, a "
        "method, a buffer or an attribute), which a fake-quantized layer cannot take over"
    )


def quantizable_layers(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> list[str]:
    """Names of the layers :func:`convert_to_qat` would fake-quantize, without changing anything (or warning: the
    conversion says what it leaves out). Raises as the conversion would for a selection it refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        class_of = _class_cache()
        targets = _quantizable_targets(model, include, exclude, class_of)
        shared = shared_partners(model, targets, class_of)
        return _in_module_order(model, [n for t in targets for n in [t.name, *(n for n, _ in shared.get(t.name, []))]])


def convert_to_qat(
    model: nn.Module,
    config: QuantConfig,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Swap the selected layers for fake-quant layers (disabled until enabled). Returns their names.

    Layers that already are QAT layers are kept. All checks happen before any change.

    Args:
        model: the model, changed in place (the new layers share the old layers' Parameters).
        config: bits, scale kind and grouping (:class:`QuantConfig`).
        include: glob patterns over module names (default: every Linear, Conv1d/2d/3d and ``transformers``'
            Conv1D; an exact name picks an ``nn.Embedding`` too), as for pruning.
        exclude: glob patterns over module names to leave float.
    """
    check_module(model)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig instance, e.g. QuantConfig(weight_bits=8), got {config!r}.")
    class_of = _class_cache()
    targets = _quantizable_targets(model, include, exclude, class_of)
    shared = shared_partners(model, targets, class_of)
    say_unshared_partners(model, targets, include, class_of, shared)
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
        and not isinstance(t.module, QATLayer)
        and group_count(t.param, t.in_axis, config.group_size) is None
    ]
    if per_channel:
        warnings.warn(
            f"lightning-compress: {per_channel} keep per-channel weight scales: `group_size`={config.group_size} "
            "needs a 2-d weight whose input size it divides.",
            UserWarning,
            stacklevel=2,
        )
    kept = [t.name for t in targets if isinstance(t.module, QATLayer) and settings_differ(t.module, config)]
    if kept:
        warnings.warn(
            f"lightning-compress: {kept} are already fake-quantized with other settings and keep them; "
            "`convert_to_float` first to convert them again.",
            UserWarning,
            stacklevel=2,
        )
    registered = registered_names(model)
    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}

    def swap(module: nn.Module, quantizer: FakeQuantizer | None) -> FakeQuantizer:
        if isinstance(module, QATLayer):
            return module.weight_fake_quant
        new = class_of(module).from_float(module, config, weight_quantizer=quantizer)
        if id(module) in in_fused_block:
            # PyTorch's fused TransformerEncoderLayer fast path reads weights directly (skipping our forward);
            # it is disabled whenever a submodule has a forward hook, so register a no-op one
            new.register_forward_pre_hook(keep_unfused)
        for name in registered[id(module)]:  # a layer registered under two names stays one layer
            _replace(model, name, new)
        swapped[id(module)] = (module, new)
        return cast(FakeQuantizer, new.weight_fake_quant)

    for target in targets:
        names.append(target.name)
        quantizer = swap(target.module, None)
        for name, partner in shared.get(target.name, []):  # tied to the same weight: one quantizer (.qat_ties)
            names.append(name)
            swap(partner, quantizer)
    replace_held(model, swapped)
    warn_held_by_objects(model, swapped)
    return _in_module_order(model, names)


def convert_listed(
    model: nn.Module, config: QuantConfig, layers: Sequence[str], recorded: Iterable[str] | None = None
) -> list[str]:
    """Convert exactly the layers named in ``layers`` (a record of a conversion: a checkpoint's, a file's), as they
    were: a layer tied to one of them stays float unless ``recorded`` (every layer the record quantizes, with other
    settings too; default ``layers``) names it (recorded before tied layers shared a quantizer, a tied head stayed
    float). Returns the names converted."""
    converted = convert_to_qat(model, config, include=[glob.escape(name) for name in layers])
    listed = set(layers if recorded is None else recorded)
    untied = [name for name in converted if name not in listed]
    if untied:
        convert_to_float(model, untied)
    return [name for name in converted if name in listed]


def _in_module_order(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` in the order of ``model.named_modules()`` (a tied layer selected under a later layer's name)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda name: order.get(name, len(order)))


def convert_to_float(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Replace every fake-quant layer (or those named in ``layers``) by its float layer (same Parameters).
    Returns their names.

    Args:
        model: the model, changed in place.
        layers: names of the fake-quant layers to convert back (``None``: all of them).
    """
    check_module(model)
    if isinstance(layers, str):
        raise TypeError(f"`layers` must be a list of layer names or None, got the string {layers!r}.")
    wanted = None if layers is None else set(layers)
    names = []
    registered = registered_names(model)
    present = qat_modules(model)
    aliases = {id(m): {a for name in registered[id(m)] for a in (name, plain_name(name))} for _, m in present}
    known = {alias for _, module in present for alias in aliases[id(module)]}
    unknown = sorted(wanted - known) if wanted is not None else []
    if unknown:
        raise ValueError(
            f"`layers` names {unknown[:5]}, which are not fake-quant layers of the model; its fake-quant layers: "
            f"{sorted(known)[:5]}{' ...' if len(known) > 5 else ''}."
        )
    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}
    for name, module in present:
        if wanted is None or wanted & aliases[id(module)]:
            float_layer = cast(Any, module).to_float()
            for alias in registered[id(module)]:
                _replace(model, alias, float_layer)
            swapped[id(module)] = (module, float_layer)
            names.append(name)
    replace_held(model, swapped)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a single layer; wrap it in a container to quantize it.")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
        restore_training(training)
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
                    if "quantizer takes a tensor" in str(err):
                        raise TypeError(
                            f"`batches` yields {type(batch).__name__}s that reach a quantized layer as something "
                            f"other than a tensor ({err}). Pass what the model's forward takes. The ranges were "
                            "not changed."
                        ) from err
                    if not (isinstance(batch, (tuple, list)) and "positional argument" in str(err)):
                        raise
                    raise TypeError(
                        f"`batches` yields {type(batch).__name__}s of {len(batch)}, which calibrate passes to the "
                        f"model as {len(batch)} positional inputs ({err}). Pass the inputs only: from an (x, y) "
                        "loader, `(x for x, _ in loader)`. The ranges were not changed."
                    ) from err
                count += 1
        broken = [name for name, q in found if not all(bool(t.isfinite().all()) for t in q.state_dict().values())]
        weights = [name.removesuffix(".weight_fake_quant") for name in broken if dict(found)[name].role == "weight"]
        if weights:  # trial DE: a float16 group scale that overflows is the weight's, not the batches'
            raise ValueError(
                f"the weights of {weights[:3]}{' ...' if len(weights) > 3 else ''} give NaN or infinite scales "
                f"{_NON_FINITE_SCALES}. The ranges were not changed."
            )
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
        restore_training(training)
    if count == 0:
        raise ValueError("`batches` was empty: calibration needs at least one batch.")
    return count


def read_weight_ranges(layers: Sequence[tuple[str, nn.Module]], unread: bool = False) -> None:
    """Read each weight quantizer's range from its layer's weight as it is now (not from the last forward, one
    optimizer step before), but learned (LSQ) scales, fixed shifts and quantizers that never read their weight
    (``unread=True``: those too, for quantizers switched on with no calibration before).
    FSDP2 shards are gathered as a forward reads them: every rank calls this."""
    for _, layer in layers:
        q = cast(Any, layer).weight_fake_quant
        if (q.initialized or unread) and q.mode != "learned" and not q.frozen_shift:
            with torch.no_grad():
                q.observe(full(cast(Any, layer).weight))


def enable_fake_quant(
    model: nn.Module, enabled: bool = True, *, observe: bool | None = None, layers: Iterable[str] | None = None
) -> int:
    """Switch fake quantization on (or off) in every quantizer of ``model`` (or of its fake-quant ``layers``, by
    name); returns how many.

    ``observe``: switch every observer on or off too. ``None`` (default): weight observers follow
    ``enabled`` (a weight's scale is read from the weight when it is switched on, then follows it as it
    trains), activation observers are left as they are (as :func:`calibrate`
    left them). Learned (LSQ) scales start training when quantization is on. Export a model with
    fake quantization on to get int8 (or int4 groups).
    """
    check_module(model)
    check_bool(enabled, "enabled")
    check_bool(observe, "observe", optional=True)
    if isinstance(layers, str) or not (layers is None or isinstance(layers, Iterable)):
        raise TypeError(f"`layers` must be None or an iterable of layer names (a list), got {layers!r}.")
    chosen = None if layers is None else set(layers)
    if chosen is not None and not all(isinstance(name, str) for name in chosen):
        raise TypeError(f"`layers` must hold layer names (strings), got {sorted(map(repr, chosen))[:5]}.")
    if chosen is not None and not chosen:
        raise ValueError("`layers` is empty: name at least one fake-quant layer, or pass None for all of them.")
    every = qat_modules(model)
    # a layer answers to its plain name too (named before activation checkpointing wrapped its block: trial GD)
    unknown = sorted(chosen - {a for n, _ in every for a in (n, plain_name(n))}) if chosen is not None else []
    if unknown:  # a typo or a module that is not a fake-quant layer would be left float without a word
        raise ValueError(
            f"`layers` names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, which are not fake-quant layers of "
            f"the model (they are {[n for n, _ in every][:5]}{' ...' if len(every) > 5 else ''})."
        )
    modules = [(n, m) for n, m in every if chosen is None or n in chosen or plain_name(n) in chosen]
    found = (
        quantizers(model)
        if chosen is None
        else [(f"{n}.{q}", quantizer) for n, m in modules for q, quantizer in quantizers(m)]
    )
    if not found:
        raise ValueError("`model` has no fake-quant layer: call `convert_to_qat(model, config)` first.")
    if enabled and observe is not False:  # a weight's scale is read from the weight as it is now (trial DE: a fit's
        # last switch-on quantized the final weights with the scales of the batch before the last step: perplexity
        # 55.48 against 54.73); a learned (LSQ) scale keeps what it trained, also when switched off and on again
        # (trial DI: it was reset), and one that never read its weight (a layer whose forward never ran) keeps
        # saying so: it reads it at its first forward
        read_weight_ranges(modules)
    for _, q in found:
        q.fake_quant_enabled = enabled
        if observe is not None:
            q.observer_enabled = observe
        elif q.role == "weight":
            q.observer_enabled = enabled
    if enabled:
        overflowing = [n for n, layer in modules if not bool(cast(Any, layer).weight_fake_quant.scale.isfinite().all())]
        if overflowing:  # trial DF: the callback trained to NaN from here on, in silence
            warnings.warn(
                f"enable_fake_quant: the weights of {overflowing[:3]}{' ...' * (len(overflowing) > 3)} give NaN or "
                f"infinite scales {_NON_FINITE_SCALES}, so their outputs will be NaN.",
                UserWarning,
                stacklevel=2,
            )
    saturated = [
        name
        for name, layer in modules
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
