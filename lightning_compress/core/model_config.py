"""A compacted ``transformers`` model's config: describe the new sizes, or record what it cannot.

After :func:`~.compact.compact`, ``save_pretrained`` writes the smaller tensors with the model's
config. Where the config can describe the new sizes (every attention block keeps the same number
of heads, every MLP the same number of neurons, and the config has the fields that set them, e.g.
Llama's ``num_attention_heads``/``num_key_value_heads``/``head_dim``/``intermediate_size``), those
fields are rewritten: ``type(model).from_pretrained`` then rebuilds the compacted model. That is
checked, not assumed: the class is built from the rewritten config on the meta device and every
tensor's shape must match. Otherwise (BERT and GPT-2 derive the head size from ``hidden_size /
num_attention_heads``; global scope leaves layers of different sizes) the config keeps its fields
and gains a ``lightning_compress`` entry, which :func:`lightning_compress.from_pretrained` reads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .groups import ChannelGroup
from .heads import head_record
from .layers import is_pretrained_model
from .shrink import sized_tensor

__all__ = ["CONFIG_KEY", "describe_in_config", "record_sizes", "unchanged_configs"]

CONFIG_KEY = "lightning_compress"
_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")
_MLP_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config if callable(getattr(config, "to_dict", None)) else None


def describe_in_config(
    model: nn.Module, groups: Sequence[ChannelGroup], kept: dict[str, tuple[int, int]]
) -> bool | None:
    """Update the config of every ``transformers`` model in ``model`` (itself, or e.g. a LightningModule's
    ``self.net``) after compaction of ``groups`` (``kept``: per group, channels before and after).

    Returns whether the standard fields now describe the compacted sizes (``from_pretrained`` of the
    class reloads it); if not, the config records the head counts and the resized layers' weight
    shapes under ``lightning_compress``. ``None``, and nothing done, without such a config.
    """
    results = [
        _describe(sub, prefix, groups, kept)
        for prefix, sub in _outermost(model)
        # a model no group is in (a teacher beside the student) keeps its config (trial DJ: it was marked compacted)
        if any(all(name.startswith(f"{prefix}." if prefix else "") for name in g.modules()) for g in groups)
    ]
    return all(results) if results else None


def unchanged_configs(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """The modules of ``model`` (outermost) holding a ``config`` that :func:`describe_in_config` does not rewrite (not
    a ``transformers`` model's), around a compacted group: it still gives the dense sizes (trial FH: litgpt's GPT
    kept ``intermediate_size=128`` beside (64, 64) weights, and ``GPT(model.config)`` could not load its state)."""
    cut = {module for group in groups for module in group.modules()}
    outermost = _outermost(model)
    rewritten = {id(_config_of(sub)) for _, sub in outermost}
    found: list[str] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or isinstance(config, str | int | float | bool) or id(config) in rewritten:
            continue
        # a copy of its config inside a `transformers` model, whose own config is rewritten (trial FM: CANINE deep-
        # copies its config for its one-layer character encoders, and they were named as configs not rewritten)
        if any(name.startswith(f"{outer}.") or not outer for outer, _ in outermost):
            continue
        if is_pretrained_model(module) or any(name.startswith(f"{outer}.") or not outer for outer in found):
            continue
        start = f"{name}." if name else ""
        if any(member.startswith(start) for member in cut):
            found.append(name)
    return found


def record_sizes(model: nn.Module, resized: Sequence[str]) -> None:
    """After ``load_compressed`` cut the modules ``resized`` of ``model`` to a compacted file's sizes: each
    ``transformers`` model's config records the head counts and those layers' weight shapes under
    ``lightning_compress``, as :func:`describe_in_config` does when the standard fields cannot say them, so
    ``save_pretrained`` then :func:`lightning_compress.from_pretrained` rebuilds it (trial DG: the fresh model kept
    the dense sizes, and its saved directory reloaded into neither)."""
    for prefix, sub in _outermost(model):
        start = f"{prefix}." if prefix else ""
        mine = [name[len(start) :] for name in resized if name.startswith(start)]
        if mine:  # a model the file left at its sizes (a teacher beside the student) keeps its config (trial DH)
            _record(sub, mine)


def _outermost(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``transformers`` models in ``model`` (itself, or e.g. a LightningModule's ``self.net``), outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") or not outer for outer, _ in found)
        # a LightningModule keeping `self.config = cfg` (and a `save_pretrained` of its own) is not one (trials DH,
        # DI: its record was written on the wrapper, under the wrong names, and spread to a teacher)
        if _config_of(module) is not None and is_pretrained_model(module) and not inside:
            found.append((name, module))
    return found


def _replace_config(sub: nn.Module, new: Any) -> None:
    """``new`` as the config of ``sub`` and of its modules that share its config (trial DG: the attention layers kept
    the old object, so `config._attn_implementation` no longer reached them)."""
    old = _config_of(sub)
    for module in sub.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _record(sub: nn.Module, names: Sequence[str]) -> None:
    """A copy of ``sub``'s config, set on it, that records its head counts and the weight shapes of ``names`` (with
    those an earlier record holds) under ``lightning_compress``: the config object the user built ``sub`` from, maybe
    shared with other models, is left alone (trial DG: a dense model built from it read as compacted)."""
    config = copy.deepcopy(_config_of(sub))
    previous = getattr(config, CONFIG_KEY, None)
    shapes = dict(previous.get("shapes", {})) if isinstance(previous, dict) else {}
    modules = dict(sub.named_modules())
    for name in names:
        attr, weight = sized_tensor(modules[name])
        if weight is not None:
            shapes[f"{name}.{attr}"] = list(weight.shape)
    setattr(config, CONFIG_KEY, {"compacted": True, "heads": head_record(sub), "shapes": shapes})
    _replace_config(sub, config)


def _describe(sub: nn.Module, prefix: str, groups: Sequence[ChannelGroup], kept: dict[str, tuple[int, int]]) -> bool:
    """:func:`describe_in_config` for one ``transformers`` model ``sub`` at ``prefix`` (``""``: the model)."""
    start = f"{prefix}." if prefix else ""
    mine = [g for g in groups if all(name.startswith(start) for name in g.modules())]
    config = _config_of(sub)
    candidate = _rewritten(config, mine, kept)
    if candidate is not None and _builds_same_shapes(sub, candidate):
        if hasattr(candidate, CONFIG_KEY):
            delattr(candidate, CONFIG_KEY)
        _replace_config(sub, candidate)
        return True
    _record(sub, [name[len(start) :] for group in mine for name in group.modules()])
    return False


def _rewritten(config: Any, groups: Sequence[ChannelGroup], kept: dict[str, tuple[int, int]]) -> Any | None:
    candidate = copy.deepcopy(config)
    blocks = [g for g in groups if g.attention is not None]
    mlps = [g for g in groups if g.attention is None]
    if blocks:
        counts = {(kept[g.name][1], g.attention.group_size, g.attention.head_dim) for g in blocks if g.attention}
        if len(counts) != 1:
            return None
        ((kv_heads, group_size, head_dim),) = counts
        values = {"num_attention_heads": kv_heads * group_size, "num_key_value_heads": kv_heads, "head_dim": head_dim}
        for name in _HEAD_FIELDS:
            if hasattr(candidate, name) and not _set(candidate, name, values[name]):
                return None
        if not hasattr(candidate, "head_dim") and hasattr(candidate, "num_attention_heads"):
            # a config that derives the head size (Qwen2: hidden_size // heads) may still read a `head_dim` field;
            # the model built from it decides (a trial: Qwen2's compacted config was left old) below
            _set(candidate, "head_dim", head_dim)
    if mlps:
        sizes = {kept[g.name][1] for g in mlps}
        if len(sizes) != 1:
            return None
        for name in _MLP_FIELDS:
            if hasattr(candidate, name) and not _set(candidate, name, next(iter(sizes))):
                return None
    return candidate


def _set(config: Any, name: str, value: int) -> bool:
    """Set a config field; ``False`` when it is derived and read-only (Falcon's ``head_dim`` is
    ``hidden_size // num_attention_heads``), or refuses the value (huggingface_hub's strict dataclass
    validation raises its own error type), and differs from ``value``."""
    try:
        setattr(config, name, value)
    except Exception:  # read-only, or refused by the config's own validation (a per-stage list field: SegFormer)
        return bool(getattr(config, name) == value)
    return True


def _builds_same_shapes(model: nn.Module, config: Any) -> bool:
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # a class that cannot be built from its config alone: not describable
        return False
    # a quantization-aware model's fake quantizers are not the config's business (a trial: with QAT on, a compacted
    # Llama kept its old config and the class's own from_pretrained refused the weights)
    want = {k: tuple(getattr(v, "shape", ())) for k, v in model.state_dict().items() if "_fake_quant." not in k}
    have = {k: tuple(getattr(v, "shape", ())) for k, v in fresh.state_dict().items()}
    return want == have
