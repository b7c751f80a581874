"""Which parameters a compression method touches.

Pure torch. Patterns are ``fnmatch`` globs over qualified module names (``"encoder.*"``,
``"features.0"``). The rule fits in one sentence: **wildcard patterns pick Linear and Conv
layers** (``transformers``' Conv1D included) **; an exact module name picks that module's**
``weight`` **whatever its type** (an embedding or a norm). Biases are never selected. A layer whose weight is also an
``nn.Embedding``'s (an output head tied to the token embedding, as in GPT-2) is left out by
wildcards and the default, with a warning: pruning or quantizing it would change the embedding.
An exact name in ``include`` opts it in. For pruning (``module_tensors=True``) the weight matrices a module
multiplies in its own forward count as layers too: the experts of a mixture of experts stored as 3-d tensors, and
the matrices of recurrent layers and ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized

from .adapters import adapter_modules, declared_lora_base, forwards_base_weight
from .checks import caller_level, check_module
from .experts import expert_input_axis, expert_tensors, is_experts, router_layers
from .layers import class_label, linear_like_types, parametrization_kinds, weight_axes
from .sharding import flat_offset, local
from .wrappers import inner_module, is_compiled

__all__ = [
    "UNSELECTED_SHARE",
    "Target",
    "default_layer_types",
    "expert_tensors",
    "experts_picked",
    "is_experts",
    "matrix_tensors",
    "module_tensor_holders",
    "normalize_patterns",
    "select_targets",
    "unselected_weights",
]

_WILDCARDS = set("*?[")
_MATRIX_HOLDERS = (nn.RNNBase, nn.MultiheadAttention)  # weight matrices under names of their own (matrix_tensors)


def _stored_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` holds its values in a tensor type of its own (torchao's NF4Tensor, which torchtune's QLoRA
    stores its base weights in), not a plain tensor (nor FSDP2's sharded DTensor)."""
    return type(weight.data) is not Tensor and type(weight.data).__name__ != "DTensor"


def _scripted_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear or Conv layer compiled by ``torch.jit.script`` (its original class's name)."""
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _LAYER_NAMES


_LAYER_NAMES = {"Linear", "Conv1d", "Conv2d", "Conv3d"}


def default_layer_types() -> tuple[type[nn.Module], ...]:
    """Module types whose ``weight`` is selected by default: Linear, every Conv, ``transformers``' Conv1D, PyTorch
    Geometric's Linear."""
    return linear_like_types()


@dataclass(frozen=True)
class Target:
    """One selected weight.

    Attributes:
        name: qualified module name (``"features.0"``), the key used for masks and logs.
        module: the module that owns the weight.
        param: the Parameter itself.
        attr: its attribute name on ``module`` (``"weight"``; channel pruning also masks ``"bias"``
            and BatchNorm parameters).
    """

    name: str
    module: nn.Module
    param: Tensor
    attr: str = "weight"
    own_name: bool = False  # a weight under a name of its own (experts' 3-d tensors, recurrent or attention matrices)

    @property
    def is_weight(self) -> bool:
        """A weight as selected (a layer's ``weight`` or a module's own matrix), not a bias or norm channel pruning
        adds."""
        return self.attr == "weight" or self.own_name

    @property
    def param_name(self) -> str:
        """Qualified parameter name as in ``model.state_dict()``."""
        return f"{self.name}.{self.attr}" if self.name else self.attr

    @property
    def key(self) -> str:
        """Name given to importances: the module name for a weight, the parameter name otherwise."""
        return self.name if self.attr == "weight" else self.param_name

    @property
    def numel(self) -> int:
        """Elements of the whole weight (all shards together under FSDP2)."""
        return self.param.numel()

    @property
    def local(self) -> Tensor:
        """The weight as this process holds it: its shard under FSDP2, else the weight itself."""
        return local(self.param)

    @property
    def offset(self) -> int:
        """Flat index, in the whole weight, of :attr:`local`'s first element (0 unless sharded)."""
        return flat_offset(self.param)

    @property
    def in_axis(self) -> int:
        """The weight's input axis: 1, or 0 for a ``transformers`` Conv1D (weight stored as (in, out)); the last
        for a module's own matrices (``(out, in)``) and experts stored as ``(experts, out, in)``, the middle one for
        experts ``transformers`` marks transposed (:func:`~.experts.expert_input_axis`)."""
        if self.own_name and is_experts(self.module):
            return expert_input_axis(self.module, self.param)
        if self.own_name or self.attr != "weight":
            return self.param.dim() - 1
        return weight_axes(self.module)[1]


def normalize_patterns(value: object, argument: str) -> tuple[str, ...] | None:
    """Validate ``include``/``exclude``: ``None``, one string or a sequence of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        if len(value) == 0:
            raise ValueError(f"`{argument}` is an empty sequence; pass None to use the default selection.")
        return tuple(value)
    raise TypeError(f"`{argument}` must be None, a glob string or a sequence of glob strings, got {value!r}.")


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def matrix_tensors(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices of a recurrent layer (``weight_ih_l0``, ``weight_hh_l0``, ..., ``(out, in)``) or of an
    ``nn.MultiheadAttention`` (its packed ``in_proj_weight``, or ``q/k/v_proj_weight``; its ``out_proj`` is a Linear
    of its own): Parameters its own forward multiplies, which no Linear holds."""
    if not isinstance(module, _MATRIX_HOLDERS):
        return []
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 2 and "weight" in n and p.numel()]


def module_tensor_holders(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> list[str]:
    """Names of the modules whose own weight tensors ``select_targets(..., module_tensors=True)`` selects by the
    default or a wildcard of ``include`` (experts: :func:`experts_picked`; recurrent layers and
    ``nn.MultiheadAttention``: :func:`matrix_tensors`), and ``exclude`` does not remove."""
    include = normalize_patterns(include, "include")
    exclude = normalize_patterns(exclude, "exclude")
    experts = set(experts_picked(model, include, exclude))
    return [
        name
        for name, module in model.named_modules()
        if name in experts
        or (
            matrix_tensors(module)
            and (include is None or any(_WILDCARDS & set(p) and _matches(name, p) for p in include))
            and not (exclude is not None and any(_matches(name, p) for p in exclude))
        )
    ]


def experts_picked(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> list[str]:
    """Names of the mixture-of-experts modules (:func:`is_experts`) that the default selection (``include=None``)
    or a wildcard pattern of ``include`` picks, and ``exclude`` does not remove."""
    include = normalize_patterns(include, "include")
    exclude = normalize_patterns(exclude, "exclude")
    return [
        name
        for name, module in model.named_modules()
        if is_experts(module)
        and (include is None or any(_WILDCARDS & set(p) and _matches(name, p) for p in include))
        and not (exclude is not None and any(_matches(name, p) for p in exclude))
    ]


def stored_weight(module: nn.Module) -> Any:
    """``module.weight`` without computing it: a parametrized weight's stored original (``original``, or
    ``original0`` of a parametrization that stores several, as ``weight_norm``), since reading ``weight`` runs the
    parametrization, and spectral_norm's power iteration then updates its buffers in training mode (trial DD: a refused
    fit changed the model). ``None`` when the module has no weight, or forwards another's: peft's tuner layer (its
    ``base_layer``'s) and an activation checkpointing wrapper (trial GB: a wrapped head was said to be a tied layer
    left float); a module compiled by itself is said as such where it is selected."""
    if forwards_base_weight(module) or (inner_module(module) is not None and not is_compiled(module)):
        return None
    if is_parametrized(module, "weight"):
        stored = cast(Any, module).parametrizations["weight"]
        return getattr(stored, "original", getattr(stored, "original0", None))
    return getattr(module, "weight", None)


UNSELECTED_SHARE = 0.25  # unselected matrices worth a word: a quarter of the selected weights (a ViT's position
# embeddings, a Mamba's A_log are a few percent)
_REFUSED_SHARE = 9  # ... and a default selection refused: at most a tenth of the weight matrices selected


def _unselected_matrices(
    named: list[tuple[str, nn.Module]], selected: list[Target], excluded: Any
) -> list[tuple[str, int, tuple[int, ...]]]:
    """The Parameters of two or more dimensions (or a 1-d ``weight`` of a module that is not a norm: weights stored
    flat) that modules other than layers, embeddings, experts, recurrent layers
    and ``nn.MultiheadAttention`` hold and the selection leaves out (not those of excluded modules): name, size,
    shape. A layer's parametrization (``weight_norm``'s ``original0``/``original1``) is no such Parameter: the layer
    left out for it is named on its own (trial EW: EnCodec's were listed here too, as einsum operands)."""
    chosen = {id(t.param) for t in selected}
    layer_types = default_layer_types()
    chosen.update(
        id(p)
        for _, m in named
        if isinstance(m, layer_types) and is_parametrized(m)
        for p in cast(nn.Module, m.parametrizations).parameters()
    )
    found: list[tuple[str, int, tuple[int, ...]]] = []
    for name, module in named:
        if isinstance(module, (*layer_types, nn.Embedding, nn.EmbeddingBag)) or excluded(name, module):
            continue
        if _scripted_layer(module):  # named on its own
            continue
        if is_experts(module) or matrix_tensors(module):  # kinds it selects, which `include` left out
            continue
        for attr, param in module.named_parameters(recurse=False):
            # biases are never pruned (an ensemble's are 2-d: trial FI's TabM counted them among the weights left dense)
            matrix = param.dim() >= 2 or (attr == "weight" and param.dim() == 1 and not _scales_channels(module))
            quantized = _stored_quantized(param)  # (said on their own: no `include` selects them)
            # trained and not all zero (trial GN: pykan's frozen grid and mask, and its unused symbolic branch, all
            # zero, were counted as weights left dense, and the branch offered to `include`)
            candidate = matrix and param.numel() and id(param) not in chosen and "bias" not in attr and not quantized
            if candidate and param.requires_grad and bool(param.detach().any()):  # (read last: one pass over it)
                chosen.add(id(param))
                found.append((f"{name}.{attr}" if name else attr, param.numel(), tuple(param.shape)))
    return found


_CHANNEL_SCALES = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.PReLU, nn.LocalResponseNorm,
)  # fmt: skip


def _scales_channels(module: nn.Module) -> bool:
    """A module whose 1-d ``weight`` is one scale per channel (a norm, ``transformers``' ``LlamaRMSNorm`` and its kind,
    a PReLU), not a layer's weights stored flat (trial FN: e3nn's ``o3.Linear`` and ``FullyConnectedTensorProduct``
    keep theirs 1-d, 12 times the weights selected, and were left dense without a word)."""
    return isinstance(module, _CHANNEL_SCALES) or "norm" in type(module).__name__.lower()


def unselected_weights(
    model: nn.Module, selected: list[Target], exclude: Sequence[str] | str | None = None
) -> tuple[str, int]:
    """The Parameters ``model``'s modules multiply in their own forward that ``selected`` leaves out (as the pruning
    warning lists them: the largest, with their count, ``"a (4, 4, 6) ... (96 weights in 1 tensor(s)"``), and how many
    weights they hold; ``("", 0)`` for none. Quantization-aware training says so too (trial GK: FNO's complex spectral
    weights, 92% of the model, stayed float without a word)."""
    patterns: Sequence[str] = normalize_patterns(exclude, "exclude") or []
    named = list(model.named_modules())
    found = _unselected_matrices(named, selected, lambda name, _: any(_matches(name, p) for p in patterns))
    total = sum(n for _, n, _ in found)
    return (_listed(found, total), total) if found else ("", 0)


def _listed(found: list[tuple[str, int, tuple[int, ...]]], total: int) -> str:
    shown = ", ".join(f"{name} {shape}" for name, _, shape in _largest(found, 3))
    return f"{shown}{' ...' * (len(found) > 3)} ({total:,} weights in {len(found)} tensor(s)"


_TABLE_WORDS = ("embed", "position", "pos_", "token", "latent")


def _added_table(name: str) -> bool:
    """A table added to activations rather than multiplied, named so (a ViT's ``position_embeddings`` and
    ``cls_token``, a Perceiver's ``latents``): listed among the weights left dense, but no reason to refuse the
    default selection, as an ``nn.Embedding`` is none (trial GM: a 512-pixel ViT's position table, 36 times its
    layers, refused it)."""
    return any(word in name.lower() for word in _TABLE_WORDS)


def _opt_in_note(named: list[tuple[str, nn.Module]], unselected: list[tuple[str, int, tuple[int, ...]]]) -> str:
    """How to prune the listed tensors an exact module name in ``include`` selects (their module's ``weight``, or the
    tensors of 3 or more dimensions an exact name takes as experts' ones) (trial FI: TabM's ensemble layers prune so,
    but the warning named no module to pass; trial GK: FNO's complex spectral weights, the ``tensor`` of a tensorly
    module, were not offered)."""
    by_name = dict(named)
    modules = []
    for name, _, _ in unselected:
        owner, _, attr = name.rpartition(".")
        module = by_name.get(owner) if owner else None
        if module is not None and (attr == "weight" or attr in {n for n, _ in expert_tensors(module)}):
            modules.append(owner)
    if not modules:
        return ""
    return (
        f" To prune them, name their modules exactly in `include` (with the layers it selects "
        f"now, e.g. `include=['*', {modules[0]!r}]`): {modules[:5]}{' ...' if len(modules) > 5 else ''}."
    )


def _note_larger_embeddings(named: list[tuple[str, nn.Module]], selected: list[Target], excluded: Any) -> None:
    """Warn where the embedding tables the default leaves out hold more weights than it selects (trial ET: a
    recommender's tables, 99% of its weights: `sparsity` read 0.90 with 0.8% of the parameters zero, said nowhere).
    A language model's token embedding, smaller than its layers, is left out without a word, as documented."""
    chosen = {id(t.param) for t in selected}
    tables: list[tuple[str, int]] = []
    for name, module in named:  # a table shared by several modules (T5's `shared`) counts once (trial EU)
        weight = module.weight if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else None
        if weight is not None and not excluded(name, module) and id(weight) not in chosen:
            chosen.add(id(weight))
            tables.append((name, weight.numel()))
    total, pruned = sum(n for _, n in tables), sum(t.numel for t in selected)
    if total > pruned:
        names = [name for name, _ in sorted(tables, key=lambda item: -item[1])[:3]]
        warnings.warn(
            f"lightning-compress does not prune the embedding tables {names}{' ...' * (len(tables) > 3)} ({total:,} "
            f"weights in {len(tables)} table(s), {total / max(1, pruned):.1f}x the {pruned:,} it prunes): the default "
            "selects Linear and Conv layers, and `sparsity` counts those. Name each table exactly in `include`, "
            "with '*' for the layers (e.g. include=['emb', '*']), to prune it; quantization-aware training takes "
            "an nn.Embedding (not an EmbeddingBag) named exactly too.",
            UserWarning,
            stacklevel=caller_level(),
        )


def _largest(found: list[tuple[str, int, tuple[int, ...]]], k: int) -> list[tuple[str, int, tuple[int, ...]]]:
    return sorted(found, key=lambda item: -item[1])[:k]


def select_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    module_tensors: bool = False,
    note_left_out: bool = True,
) -> list[Target]:
    """Return the weights selected by ``include``/``exclude``, in module order.

    Args:
        model: the model to search.
        include: glob patterns over qualified module names; ``None`` selects every Linear and
            Conv layer. A pattern with a wildcard picks only Linear/Conv layers; an exact name
            picks that module's ``weight`` whatever its type.
        exclude: glob patterns over qualified module names removed from the selection.
        module_tensors: also select the weight matrices a module holds under names of its own and uses in its own
            forward, as Linear layers are (pruning: masks apply to any tensor; quantization-aware training swaps
            Linear modules and cannot): mixture-of-experts weights stored as 3-d tensors (:func:`expert_tensors`;
            by the default and wildcards in modules whose class is named for experts, by an exact name in any
            module), and the matrices of recurrent layers and ``nn.MultiheadAttention`` (:func:`matrix_tensors`;
            by the default, wildcards and exact names).
        note_left_out: warn about the layers the patterns would pick but the selection leaves out (tied to an
            embedding, a parametrized, pruned or hooked weight); off for what only reads the model (``sparsity``,
            the size summary), which would otherwise repeat the warning the pruning gave at every call (trial CS).

    Raises:
        ValueError: a pattern matches no module, or nothing is left to select.
    """
    check_module(model)
    include = normalize_patterns(include, "include")
    exclude = normalize_patterns(exclude, "exclude")
    layer_types = default_layer_types()
    named = [(n, m) for n, m in model.named_modules()]
    aliases: dict[int, list[str]] = {}  # a module registered under several names answers to each (trial DK:
    for n, m in model.named_modules(remove_duplicate=False):  # `self.classifier = self.head`, excluded as
        aliases.setdefault(id(m), []).append(n)  # 'classifier', matched no module)
    names = {n for every in aliases.values() for n in every}

    def matches(name: str, module: nn.Module, pattern: str) -> bool:
        return any(_matches(n, pattern) for n in aliases.get(id(module), [name]))

    def named_in(name: str, module: nn.Module, patterns: Sequence[str] | None) -> bool:
        return patterns is not None and any(n in patterns for n in aliases.get(id(module), [name]))

    def excluded_by(name: str, module: nn.Module) -> bool:
        return exclude is not None and any(matches(name, module, p) for p in exclude)

    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(n, pattern) for n in names if n):
                raise ValueError(
                    f"`{argument}` pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like {_examples(named)}."
                )

    selected: list[Target] = []
    seen: set[int] = set()
    embeddings = {id(stored_weight(m)) for _, m in named if isinstance(m, nn.Embedding)}
    routers = router_layers(model)
    adapters = adapter_modules(model)  # peft's adapters and unused originals: by an exact name only
    tied: list[str] = []
    parametrized: list[str] = []
    named_parametrized: list[str] = []  # exact names in `include` whose weight a parametrization computes
    torch_pruned: list[str] = []  # torch.nn.utils.prune: `weight_orig` and a mask multiplied in a pre-hook
    scripted: list[str] = []  # Linear/Conv layers compiled by `torch.jit.script`: no longer their classes
    stored_quantized: list[str] = []  # weights held in a quantized tensor type (torchtune's QLoRA: NF4Tensor)
    hooked: dict[str, list[str]] = {"weight_norm": [], "spectral_norm": [], "hook": []}  # computed before forward
    kept_out: dict[int, str] = {}  # weights of excluded modules: a module tied to one is left out too (trial DD)
    later_names: dict[int, list[str]] = {}  # the other modules of a tied weight, selected under its first name
    for name, module in named:
        computed = is_parametrized(module, "weight")  # reading it would run the parametrization: spectral_norm's
        # power iteration updates its buffers in training mode (trial DD: a refused fit changed the model)
        weight = stored_weight(module)
        excluded = excluded_by(name, module)
        if excluded and isinstance(weight, nn.Parameter) and not computed:
            kept_out.setdefault(id(weight), name)
        # experts kept as a module's `weight` (JetMoE's `JetMoeParallelExperts`, (experts, out, in)) are experts too
        experts_weight = not isinstance(module, layer_types) and is_experts(module)
        if module_tensors and not computed and (not isinstance(weight, Tensor) or experts_weight) and not excluded:
            exact = named_in(name, module, include)
            wildcard = include is None or any(matches(name, module, p) for p in include)
            held = matrix_tensors(module) if exact or wildcard else []
            if not held and (exact or (wildcard and is_experts(module))):
                held = expert_tensors(module)
            for attr, tensor in held:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    selected.append(Target(name=name, module=module, param=tensor, attr=attr, own_name=True))
            continue
        if computed or (isinstance(weight, Tensor) and not isinstance(weight, nn.Parameter)):
            wanted = isinstance(module, layer_types) and (
                include is None or any(matches(name, module, p) for p in include)
            )
            if computed and named_in(name, module, include) and not excluded:
                named_parametrized.append(name)  # trial GI: dropped with the default's warning, as if not named
            elif computed and wanted and not excluded:
                parametrized.append(name)
            elif isinstance(getattr(module, "weight_orig", None), nn.Parameter) and wanted and not excluded:
                (torch_pruned if hasattr(module, "weight_mask") else hooked["spectral_norm"]).append(name)
            elif wanted and not excluded:  # trial BX: the old torch.nn.utils.weight_norm was left out in silence
                hooked["weight_norm" if hasattr(module, "weight_g") else "hook"].append(name)
            continue
        if not isinstance(weight, nn.Parameter) or weight.numel() == 0:
            continue
        layer = isinstance(module, layer_types) or declared_lora_base(module)  # torchtune's LoRA: its base weight
        layer = layer and id(module) not in routers and id(module) not in adapters
        if _stored_quantized(weight):  # trial GD: QLoRA's NF4 weights were selected, and the fit failed in a count
            if layer and not excluded and (include is None or any(matches(name, module, q) for q in include)):
                stored_quantized.append(name)
            continue
        if include is None and not excluded and _scripted_layer(module):
            scripted.append(name)  # trial FB: a `torch.jit.script`ed block's convolutions were left dense unsaid
        if include is None:
            chosen = layer
        else:
            chosen = any(matches(name, module, p) and (layer or not (_WILDCARDS & set(p))) for p in include)
        if not chosen or excluded:
            continue
        if id(weight) in seen:  # tied weights: one mask, under the first name (the embedding's, when it is selected)
            later_names.setdefault(id(weight), []).append(name)
            continue
        if id(weight) in embeddings and not isinstance(module, nn.Embedding) and not named_in(name, module, include):
            tied.append(name)
            continue
        seen.add(id(weight))
        selected.append(Target(name=name, module=module, param=weight))
    shares_excluded = {  # every module of the tied weight named (trial DF: the third was left out unsaid)
        name: kept_out[id(t.param)]
        for t in selected
        if id(t.param) in kept_out
        for name in [t.name, *later_names.get(id(t.param), [])]
    }
    selected = [t for t in selected if id(t.param) not in kept_out]
    picked = {t.name for t in selected}
    ignored = [
        n
        for n, m in named
        if named_in(n, m, include)
        and n not in picked
        and not isinstance(stored_weight(m), Tensor)
        and not excluded_by(n, m)
    ]
    if selected and ignored:  # the other patterns select something: the name alone would be dropped silently
        raise ValueError(
            f"`include` names {ignored}, which have no `weight`{_held_note(named, ignored, module_tensors)}"
            f"{_wrapper_note(named, ignored)}{_inner_holders_note(named, ignored, module_tensors)}: an exact "
            f"name picks that module's `weight`. Name the layers inside a container (e.g. '{ignored[0]}.*'), or "
            "leave the name out."
        )
    if named_parametrized:  # an explicit request that cannot be honoured: refused, not dropped
        raise ValueError(
            f"`include` names {named_parametrized}, whose weight is computed by a parametrization "
            f"({_parametrizations(named, named_parametrized)}) from what it stores, so a mask or a quantizer on it "
            "would not be the weight the forward uses. Remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')), or leave the name out."
        )
    if note_left_out and tied:
        warnings.warn(
            f"lightning-compress leaves {tied} out: their weight is also an nn.Embedding's (a tied output "
            f"head), so compressing them would change the embedding. Name them exactly in `include` to opt in.",
            stacklevel=caller_level(),
        )
    if note_left_out and shares_excluded:
        warnings.warn(
            f"lightning-compress leaves {sorted(shares_excluded)} out: their weight is also the weight of "
            f"{sorted(set(shares_excluded.values()))}, which `exclude` leaves out, so compressing them would change "
            "the excluded layers. Untie the weights, or drop the layers from `exclude`, to compress them.",
            stacklevel=caller_level(),
        )
    if note_left_out and parametrized:
        warnings.warn(
            f"lightning-compress leaves {parametrized} out: their weight is computed by a parametrization "
            f"({_parametrizations(named, parametrized)}), not stored. Remove it "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')) to compress them.",
            stacklevel=caller_level(),
        )
    if note_left_out and stored_quantized:
        kinds = sorted({type(stored_weight(m).data).__name__ for n, m in named if n in stored_quantized})
        warnings.warn(
            f"lightning-compress leaves {stored_quantized[:5]}{' ...' if len(stored_quantized) > 5 else ''} out: "
            f"their weights are tensors of a type of their own ({kinds}; torchtune's QLoRA stores its base weights "
            "quantized in NF4Tensor), which neither pruning nor quantization-aware training changes.",
            stacklevel=caller_level(),
        )
    if note_left_out and scripted:
        warnings.warn(
            f"lightning-compress leaves {scripted[:5]}{' ...' if len(scripted) > 5 else ''} out: they are layers "
            "compiled by `torch.jit.script` (no longer nn.Linear/nn.Conv instances). Name them exactly in `include` "
            "to prune them; quantization-aware training cannot convert them: script the model after converting, or "
            "leave the submodule unscripted.",
            stacklevel=caller_level(),
        )
    if note_left_out and torch_pruned:
        warnings.warn(
            f"lightning-compress leaves {torch_pruned} out: torch.nn.utils.prune computes their weight from "
            "`weight_orig` and a mask. Make it permanent first (torch.nn.utils.prune.remove(module, 'weight')) to "
            "compress them.",
            stacklevel=caller_level(),
        )
    for kind, hooked_names in hooked.items():
        if hooked_names and note_left_out:
            warnings.warn(f"lightning-compress leaves {hooked_names} out: {_HOOKED[kind]}", stacklevel=caller_level())
    if module_tensors and note_left_out and selected:
        unselected = _unselected_matrices(named, selected, excluded_by)
        total, pruned = sum(n for _, n, _ in unselected), sum(t.numel for t in selected)
        listed = _listed(unselected, total)
        multiplied = sum(n for name, n, _ in unselected if not _added_table(name))
        if include is None and multiplied >= _REFUSED_SHARE * pruned:  # trial GH: AGCRN's head pruned to 2 of 48
            layers = [t.name for t in selected]
            raise ValueError(
                f"The default selection prunes {pruned:,} weights ({layers[:3]}{' ...' * (len(layers) > 3)}), "
                f"{pruned / (pruned + total):.1%} of the model's weight matrices: the others, {listed}), are "
                "Parameters a module uses in its own forward, which it does not select, so `target_sparsity` would "
                "be reached on those few layers alone, leaving the rest of the model as it is. Say what to prune in "
                "`include`: `include=['*']` prunes the layers it selects now."
                + (_opt_in_note(named, unselected) or " No module name selects them (not their module's `weight`).")
            )
        if total >= UNSELECTED_SHARE * pruned:  # trial DX: XLNet's attention, 52% of its matrices, left dense unsaid
            warnings.warn(
                f"lightning-compress does not prune {listed}, {total / max(1, pruned):.1f}x the {pruned:,} it "
                "prunes): "
                "Parameters a module uses in its own forward (multiplied through einsum or matmul, as XLNet's "
                "attention does, or added, as position embeddings are), which are not layers it selects (Linear, "
                "Conv, experts, recurrent layers, nn.MultiheadAttention). They stay dense, and `sparsity` does not "
                "count them." + _opt_in_note(named, unselected),
                stacklevel=caller_level(),
            )
    if module_tensors and note_left_out and selected and include is None:
        _note_larger_embeddings(named, selected, excluded_by)
    if not selected:
        needs = (
            "a Linear or Conv layer, or an exact module name in `include`"
            if module_tensors
            else "a Linear or Conv layer (quantization-aware training converts those, and an nn.Embedding named "
            "exactly in `include`)"  # trial GJ: the exact name it suggested was then refused
        )
        raise ValueError(
            f"`include`={include!r} and `exclude`={exclude!r} select no weight of "
            f"{type(model).__name__}: it needs {needs}"
            + (f" (left out as tied to an embedding: {tied})" if tied else "")
            + (
                f" (left out as sharing an excluded layer's weight: {sorted(shares_excluded)})"
                if shares_excluded
                else ""
            )
            + (f" (left out, computed by a parametrization: {parametrized})" if parametrized else "")
            + (f" (left out, pruned by torch.nn.utils.prune: {torch_pruned})" if torch_pruned else "")
            + "".join(f" (left out, a weight computed before each forward: {n})" for n in hooked.values() if n)
            + (
                f" ({ignored} have no `weight`{_held_note(named, ignored, module_tensors)}"
                f"{_wrapper_note(named, ignored)})"
                if ignored
                else ""
            )
            + ("" if module_tensors else _wildcard_held_note(model, include, exclude))
            + (_weight_holders_note(named, module_tensors) if include is None else "")
            + "."
        )
    return selected


_HOOKED = {
    "weight_norm": "torch.nn.utils.weight_norm computes their weight from `weight_g` and `weight_v` before each "
    "forward, so a mask or a quantizer on it would be overwritten. Remove it (torch.nn.utils.remove_weight_norm("
    "module)) to compress them.",
    "spectral_norm": "torch.nn.utils.spectral_norm computes their weight from `weight_orig` before each forward, so a "
    "mask or a quantizer on it would be overwritten. Remove it (torch.nn.utils.remove_spectral_norm(module)) to "
    "compress them.",
    "hook": "their `weight` is not a Parameter but a tensor computed outside the optimizer (e.g. by a forward "
    "pre-hook), so a mask or a quantizer on it would be overwritten.",
}


def _parametrizations(named: list[tuple[str, nn.Module]], names: list[str]) -> str:
    """The classes of the parametrizations computing the weights of the modules ``names``."""
    modules = dict(named)
    return ", ".join(sorted({parametrization_kinds(modules[n], "weight") for n in names}))


def _held_note(named: list[tuple[str, nn.Module]], names: list[str], module_tensors: bool) -> str:
    modules = dict(named)
    holding = [n for n in names if matrix_tensors(modules[n]) or expert_tensors(modules[n])]
    if not holding or module_tensors:
        return ""
    return f"; {holding} {_HELD}"


def _inner_holders_note(named: list[tuple[str, nn.Module]], names: list[str], module_tensors: bool) -> str:
    """The submodules of the modules ``names`` that an exact name selects a tensor of (their ``weight``, or tensors of
    3 or more dimensions, as a tensorly module inside neuraloperator's ``SpectralConv``: trial GK, where the advice,
    ``'fno_blocks.convs.0.*'``, picked nothing)."""
    if not module_tensors:
        return ""
    inner = [
        name
        for name, module in named
        if any(name.startswith(f"{n}.") for n in names)
        and (isinstance(stored_weight(module), nn.Parameter) or expert_tensors(module))
        and not isinstance(module, default_layer_types())  # those a wildcard picks, as the advice says
        and not _scales_channels(module)  # (a norm's scale: trial GM, XLNet's attention was pointed at its LayerNorm)
    ]
    if not inner:
        return ""
    return f"; an exact name of their submodules {inner[:3]}{' ...' * (len(inner) > 3)} selects the weights they hold"


def _wrapper_note(named: list[tuple[str, nn.Module]], names: list[str]) -> str:
    """For peft's wrappers among ``names``: the name of the layer they run (a tuner layer's ``base_layer``, the copy a
    ``modules_to_save`` wrapper trains for its active adapter)."""
    modules = dict(named)
    wrappers = [n for n in names if forwards_base_weight(modules[n])]
    if not wrappers:
        return ""
    first = modules[wrappers[0]]
    inner = "base_layer"
    if not isinstance(getattr(first, "base_layer", None), nn.Module):
        active = getattr(first, "active_adapters", None) or ["default"]
        inner = f"modules_to_save.{active[0] if isinstance(active, list) else active}"
    return f"; {wrappers} are peft wrappers, whose weight is a layer's inside (name '{wrappers[0]}.{inner}')"


def _weight_holders_note(named: list[tuple[str, nn.Module]], module_tensors: bool) -> str:
    """Where the weights of a model the default selects nothing of are (trial GJ: nequip's ``ScalarLinearLayer`` and
    e3nn's ``Linear``, which pruning takes by an exact name, were named nowhere)."""
    holders = [
        f"{name} ({class_label(module)})"
        for name, module in named
        if name
        and isinstance(stored_weight(module), nn.Parameter)
        and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        and not _scales_channels(module)
    ]
    if not holders:
        return ""
    listed = f"{holders[:5]}{f' and {len(holders) - 5} more' if len(holders) > 5 else ''}"
    if module_tensors:
        return f"; modules holding a `weight` of their own, which an exact name prunes: {listed}"
    return f"; its weights are held by modules quantization-aware training cannot convert: {listed}"


def _wildcard_held_note(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> str:
    picked = module_tensor_holders(model, include, exclude) if include is not None else []
    if not picked:
        return ""
    return f"; the patterns match {picked[:3]}{' ...' if len(picked) > 3 else ''}, which {_HELD}"


_HELD = (
    "multiply their weights inside their own forward (mixture-of-experts 3-d tensors, recurrent layers, "
    "nn.MultiheadAttention, or a module's own tensors of 3 or more dimensions named exactly, as a KAN layer's spline "
    "coefficients): pruning selects them, quantization-aware training cannot (no Linear forward to swap), and they "
    "stay float"
)


def _examples(named: list[tuple[str, nn.Module]]) -> str:
    sample = [n for n, _ in named if n][:4]
    return ", ".join(repr(s) for s in sample) if sample else "(the model has no submodules)"
