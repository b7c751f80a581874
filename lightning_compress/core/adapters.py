"""Adapters of parameter-efficient fine-tuning (``peft``'s LoRA and the other tuners), found by their structure.

``peft`` wraps a layer in a tuner layer that keeps the original as ``base_layer`` and its adapters in the
submodules its ``adapter_layer_names`` names (LoRA's ``lora_A``/``lora_B``), and wraps a layer trained whole (a
classifier head in ``modules_to_save``) in a wrapper that keeps the untouched ``original_module`` beside the trained
copy. The default selection compresses the model's layers: the base layers and the trained copies. It leaves out
the adapters (a few low-rank matrices whose product is added to a base weight: pruning them spends the budget on
a rank-8 path, and LoRA's B starts at zero, so it went first: a trial's were 81-95% zero) and the original copies,
which no forward runs while an adapter is active. Nothing here imports ``peft``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["adapter_modules", "forwards_base_weight", "lora_base_layers", "lora_note"]


def _tuner_adapters(module: nn.Module) -> list[nn.Module]:
    """A tuner layer's adapter submodules (none for another module)."""
    names = getattr(type(module), "adapter_layer_names", None)
    if not isinstance(getattr(module, "base_layer", None), nn.Module) or not isinstance(names, tuple):
        return []
    found = [getattr(module, name, None) for name in names if isinstance(name, str)]
    return [child for child in found if isinstance(child, nn.Module)]


def _unused_original(module: nn.Module) -> nn.Module | None:
    """The original a ``modules_to_save`` wrapper keeps beside the copy it trains."""
    original = getattr(module, "original_module", None)
    trained = getattr(module, "modules_to_save", None)
    return original if isinstance(original, nn.Module) and isinstance(trained, nn.ModuleDict) else None


def adapter_modules(model: nn.Module) -> dict[int, str]:
    """``{id(module): why}`` for every module inside a tuner's adapters or a ``modules_to_save`` wrapper's unused
    original: what the default selection and wildcards leave out (an exact name still picks one)."""
    found: dict[int, str] = {}
    for module in model.modules():
        for adapter in _tuner_adapters(module):
            found.update((id(m), f"an adapter of {type(module).__name__} (peft)") for m in adapter.modules())
        original = _unused_original(module)
        if original is not None:
            why = (
                "the original peft keeps beside the copy `modules_to_save` trains (not run while an adapter is active)"
            )
            found.update((id(m), why) for m in original.modules())
    return found


def lora_base_layers(model: nn.Module) -> dict[int, str]:
    """``{id(base layer): tuner layer's name}``: the layers a tuner layer adds adapters to."""
    return {
        id(module.base_layer): name
        for name, module in model.named_modules()
        if _tuner_adapters(module) and isinstance(module.base_layer, nn.Module)
    }


def forwards_base_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is a weight of a layer the module wraps, read through a property: ``peft``'s tuner
    layers (their ``base_layer``'s) and ``modules_to_save`` wrappers (the active copy's). The wrapper computes with it
    by calling that layer, so it is no second user of the weight (no tie)."""
    wrapped = isinstance(getattr(module, "base_layer", None), nn.Module) or _unused_original(module) is not None
    if not wrapped or any(name == "weight" for name, _ in module.named_parameters(recurse=False)):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and any(weight is p for p in module.parameters())


def lora_note(model: nn.Module, layers: list[str], what: str) -> str | None:
    """What a callback says when ``layers`` (qualified names it compresses) hold LoRA base layers: the adapters stay
    dense and float beside them, and ``merge_and_unload()`` adds their product to the compressed weights (a trial:
    0.50 sparse became 0.30 once merged, the 2:4 pattern 0.42 -> 0.09, and merged logits moved by up to 0.30 from
    the quantized model trained). ``what``: ``"prunes"`` or ``"fake-quantizes"``. ``None`` without such layers."""
    bases = lora_base_layers(model)
    by_name = dict(model.named_modules())
    held = [bases[id(by_name[n])] for n in layers if n in by_name and id(by_name[n]) in bases]
    if not held:
        return None
    shown = f"{held[:3]}{' ...' if len(held) > 3 else ''}"
    if what == "prunes":
        effect = (
            "their pruned positions are zero in the base weights, but `merge_and_unload()` adds the dense product "
            "B @ A to every position and the merged model is no longer sparse. Keep the adapters unmerged (the sparse "
            "base weights and the adapters are what the validations scored, and what `save_compressed` stores), or "
            "merge them first and prune the merged model"
        )
    else:
        effect = (
            "`merge_and_unload()` adds B @ A to the quantized weights, so the merged model is not the one trained and "
            "validated. Keep the adapters unmerged (`save_compressed` and the ONNX export take the model so), or "
            "merge them first and train the merged model with quantization"
        )
    return (
        f"lightning-compress {what} the base weights of {len(held)} LoRA layer(s) (peft: {shown}) and leaves their "
        f"adapters out (float, dense): {effect}."
    )
