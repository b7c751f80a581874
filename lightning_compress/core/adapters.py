"""Adapters of parameter-efficient fine-tuning (``peft``'s LoRA and the other tuners), found by their structure.

``peft`` wraps a layer in a tuner layer that keeps the original as ``base_layer`` and its adapters in the
submodules its ``adapter_layer_names`` names (LoRA's ``lora_A``/``lora_B``), and wraps a layer trained whole (a
classifier head in ``modules_to_save``) in a wrapper that keeps the untouched ``original_module`` beside the trained
copy. The default selection compresses the model's layers: the base layers and the trained copies. It leaves out
the adapters (a few low-rank matrices whose product is added to a base weight: pruning them spends the budget on
a rank-8 path, and LoRA's B starts at zero, so it went first: a trial's were 81-95% zero), the original copies,
which no forward runs while an adapter is active, and the copies of inactive adapters.

torchtune's LoRA layers (``LoRALinear``, ``DoRALinear``: its ``AdapterModule`` protocol, an ``adapter_params()``
method naming the adapter's parameters) hold the base weight themselves, as ``weight``, beside their adapters
``lora_a``/``lora_b``: the default selection takes that base weight as a layer's and leaves the adapters out. Nothing
here imports ``peft`` or torchtune; ``litgpt``'s LoRA layers are read by their structure too (for the note on merging).
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "adapter_modules",
    "adds_to_weight",
    "copies_beside",
    "declared_lora_base",
    "forwards_base_weight",
    "lora_note",
]


def _tuner_adapters(module: nn.Module) -> list[nn.Module]:
    """A tuner layer's adapter submodules (none for another module)."""
    names = getattr(type(module), "adapter_layer_names", None)
    if not isinstance(getattr(module, "base_layer", None), nn.Module) or not isinstance(names, tuple):
        return []
    found = [getattr(module, name, None) for name in names if isinstance(name, str)]
    return [child for child in found if isinstance(child, nn.Module)]


def _declared_adapters(module: nn.Module) -> list[nn.Module]:
    """The submodules holding the parameters a module's ``adapter_params()`` names (torchtune's ``AdapterModule``
    protocol: ``['lora_a.weight', 'lora_b.weight']``, DoRA's ``'magnitude'`` too, which is the module's own); none
    for a module without that method (trial GB: torchtune's adapters were pruned to 98% and fake-quantized, their
    base weights left dense and float, unsaid)."""
    declared = getattr(module, "adapter_params", None)
    if not callable(declared):
        return []
    try:
        names = declared()
    except Exception:  # another library's method of that name
        return []
    if not isinstance(names, (list, tuple)):
        return []
    found = []
    for name in names:
        path = name.rpartition(".")[0] if isinstance(name, str) else ""
        if not path:
            continue  # a parameter of the module itself (DoRA's magnitude)
        try:
            found.append(module.get_submodule(path))
        except AttributeError:
            continue
    return found


def declared_lora_base(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer of torchtune's kind, holding its base weight itself: adapters declared by
    ``adapter_params()`` and a 2-d ``weight`` Parameter of its own, which its forward multiplies as ``nn.Linear``
    does (``F.linear``; an NF4-quantized base, QLoRA's, is left out by the selection as any weight stored
    quantized)."""
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    return weight is not None and weight.ndim == 2 and bool(_declared_adapters(module))


def _unused_copies(module: nn.Module) -> list[nn.Module]:
    """What a ``modules_to_save`` wrapper keeps but does not run: its ``original_module`` and the copies of the
    adapters that are not active (trial EM: a second adapter's head was pruned by a fit that trained the first)."""
    original = getattr(module, "original_module", None)
    copies = getattr(module, "modules_to_save", None)
    if not isinstance(original, nn.Module) or not isinstance(copies, nn.ModuleDict):
        return []
    active = getattr(module, "active_adapters", None)
    active = [active] if isinstance(active, str) else active
    inactive = [copy for key, copy in copies.items() if isinstance(active, list) and key not in active]
    return [original, *inactive]


def copies_beside(modules: dict[str, nn.Module], name: str) -> list[nn.Module]:
    """The modules a ``modules_to_save`` wrapper keeps beside the one named ``name`` inside its active copy
    (``<wrapper>.modules_to_save.<adapter>[.<path>]``): the same path in its ``original_module`` and in the inactive
    adapters' copies, which run in its place with the adapter off (peft's ``disable_adapter``) or another one active,
    so they must keep its shapes (trial FP: `compact()` cut the active copy of a classifier and left the original, and
    the model failed with its adapter off)."""
    parts = name.split(".")
    if "modules_to_save" not in parts[:-1]:
        return []
    at = len(parts) - 1 - parts[::-1].index("modules_to_save")  # the innermost wrapper
    wrapper = modules.get(".".join(parts[:at]))
    if wrapper is None or at + 1 >= len(parts):
        return []
    path = ".".join(parts[at + 2 :])
    found = []
    for copy in _unused_copies(wrapper):
        try:
            found.append(copy.get_submodule(path) if path else copy)
        except AttributeError:  # a copy of another structure
            continue
    return found


def adapter_modules(model: nn.Module) -> dict[int, str]:
    """``{id(module): why}`` for every module inside a tuner's adapters, or a ``modules_to_save`` wrapper's original
    or inactive copies: what the default selection and wildcards leave out (an exact name still picks one)."""
    found: dict[int, str] = {}
    for module in model.modules():
        for adapter in _tuner_adapters(module):
            found.update((id(m), f"an adapter of {type(module).__name__} (peft)") for m in adapter.modules())
        for adapter in _declared_adapters(module):
            if adapter is not module:
                found.update((id(m), f"an adapter of {type(module).__name__} (torchtune)") for m in adapter.modules())
        for copy in _unused_copies(module):
            why = "a copy peft keeps beside the one `modules_to_save` trains for the active adapter (not run)"
            found.update((id(m), why) for m in copy.modules())
    return found


def adds_to_weight(module: nn.Module) -> bool:
    """Whether a tuner layer's merge adds a dense update to its base weight (LoRA, DoRA, AdaLoRA, LoHa, LoKr, ...),
    which fills pruned positions; IA3 (``ia3_*`` adapters) only rescales it, which keeps its zeros (trial EM)."""
    names = getattr(type(module), "adapter_layer_names", ())
    return bool(_tuner_adapters(module)) and not all(str(n).startswith("ia3_") for n in names)


def _uses_dora(module: nn.Module) -> bool:
    """A LoRA layer with DoRA's magnitude (``use_dora=True``), which reads its base weight directly for a norm."""
    magnitude = getattr(module, "lora_magnitude_vector", None)
    return isinstance(magnitude, nn.ModuleDict) and len(magnitude) > 0


def forwards_base_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is a weight of a layer the module wraps, read through a property: ``peft``'s tuner
    layers (their ``base_layer``'s) and ``modules_to_save`` wrappers (the active copy's). The wrapper computes with it
    by calling that layer, so it is no second user of the weight (no tie)."""
    wrapped = isinstance(getattr(module, "base_layer", None), nn.Module) or bool(_unused_copies(module))
    if not wrapped or any(name == "weight" for name, _ in module.named_parameters(recurse=False)):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and any(weight is p for p in module.parameters())


def _litgpt_lora(module: nn.Module) -> bool:
    """A LoRA layer of ``litgpt`` (``LoRALinear``, ``LoRAQKVLinear``): its base layer is ``linear``, its adapters the
    Parameters ``lora_A`` and ``lora_B``, which ``merge_lora_weights`` adds to the base weight (trial FH: a 0.90
    sparse model was 0.16 sparse once merged, and merged QAT logits moved by 0.45, unsaid)."""
    return (
        isinstance(getattr(module, "linear", None), nn.Module)
        and isinstance(getattr(module, "lora_A", None), nn.Parameter)
        and isinstance(getattr(module, "lora_B", None), nn.Parameter)
    )


def lora_note(model: nn.Module, layers: list[str], what: str) -> str | None:
    """What a callback says when ``layers`` (qualified names it compresses) hold the base layers of tuners whose merge
    adds a dense update (:func:`adds_to_weight`): the adapters stay dense and float beside them, and
    ``merge_and_unload()`` adds their product to the compressed weights (a trial: 0.50 sparse became 0.30 once
    merged, the 2:4 pattern 0.42 -> 0.09, and merged logits moved by up to 0.30 from the quantized model trained).
    ``what``: ``"prunes"`` or ``"fake-quantizes"``. ``None`` without such layers."""
    tuners = {
        id(module.base_layer): (name, module)
        for name, module in model.named_modules()
        if adds_to_weight(module) and isinstance(module.base_layer, nn.Module)
    }
    tuners.update({id(module.linear): (name, module) for name, module in model.named_modules() if _litgpt_lora(module)})
    tuners.update({id(module): (name, module) for name, module in model.named_modules() if declared_lora_base(module)})
    by_name = dict(model.named_modules())
    held = [tuners[id(by_name[n])] for n in layers if n in by_name and id(by_name[n]) in tuners]
    if not held:
        return None
    names = [name for name, _ in held]
    if any(_litgpt_lora(module) for _, module in held):
        library, merge = "litgpt", "`merge_lora_weights(model)`"
    elif any(declared_lora_base(module) for _, module in held):
        library, merge = "torchtune", "`get_merged_lora_ckpt`"
    else:
        library, merge = "peft", "`merge_and_unload()`"
    shown = f"{names[:3]}{' ...' if len(names) > 3 else ''}"
    if what == "prunes":
        effect = (
            f"their pruned positions are zero in the base weights, but {merge} adds the adapters' dense "
            "update (LoRA's B @ A) to every position and the merged model is no longer sparse. Keep the adapters "
            "unmerged (the sparse base weights and the adapters are what the validations scored, and what "
            "`save_compressed` stores), or merge them first and prune the merged model"
        )
    else:
        effect = (
            f"{merge} adds the adapters' update to the float weights under the quantizers, which then quantize the "
            "merged weight: the merged model (still quantization-aware) is not the one trained and validated (trials: "
            "logits moved by 0.30 and 0.53). Keep the adapters unmerged (`save_compressed` and the ONNX export take "
            "the model so), or merge them first and train the merged model with quantization"
        )
        dora = [name for name, module in held if _uses_dora(module)]
        if dora:  # trial EM: reloaded logits 0.0088 off the trained model's, the ONNX's 3.6e-7
            effect += (
                f". DoRA layers ({dora[:3]}{' ...' if len(dora) > 3 else ''}) read their base weight directly for "
                "a norm: training reads the float weight there, a compressed file stores the quantized one, so the "
                "reloaded model's outputs differ from the trained model's (the ONNX export keeps the float read)"
            )
    return (
        f"lightning-compress {what} the base weights of {len(held)} adapter layer(s) ({library}: {shown}) and leaves "
        f"their adapters out (float, dense): {effect}."
    )
