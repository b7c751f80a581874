"""Mixtures of experts: the experts stored one tensor per projection, their count, and the routers beside them.

``transformers`` stores most experts as one ``(experts, out, in)`` Parameter per projection (Mixtral's
``gate_up_proj``, JetMoE's ``JetMoeParallelExperts.weight``), some as ``(experts, in, out)``, which its experts
decorator marks ``is_transposed`` (gpt-oss, Aria: :func:`expert_input_axis`); older code and Switch Transformers keep a
``ModuleList``/``ModuleDict`` of expert MLPs. A router scores the experts for each token: a Linear layer in some
models (JetMoE's ``router.layer``, DBRX, PhiMoE, Switch Transformers, Llama 4), as is Qwen2-MoE's one-output
``shared_expert_gate``. The default selection leaves routers out (:func:`router_layers`): a few weights that decide
which experts run, where pruning them reroutes tokens (a trial: JetMoE's routers 86-92% zero at 0.9).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from .layers import linear_like_types

__all__ = ["expert_count", "expert_input_axis", "expert_tensors", "is_experts", "router_layers"]

_ROUTER_WORDS = ("router", "gate")  # a path component so named or ending "_router" / "_gate" (not "gate_proj")
_ROUTER_CLASS_WORDS = ("router", "gating", "gate")


def expert_tensors(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights of a mixture of experts stored one tensor per projection, ``(experts, out, in)``, as
    ``transformers`` stores Mixtral's and Qwen2-MoE's ``gate_up_proj`` and ``down_proj``: a module's own
    Parameters of 3 or more dimensions sharing a first (expert) dimension above 1. Not a Linear/Conv/Embedding."""
    if isinstance(module, (*linear_like_types(), nn.Embedding, ParametrizationList)):
        return []  # (a parametrization's `original` is the stored weight of the layer it computes: trial GI)
    # more than one value per expert: a (out, 1, 1) bias or (heads, 1, 1) scale is none (trial GK: an exact name of
    # FNO's SpectralConv pruned its bias as experts; trial DY: Swinv2's `logit_scale`), a KAN layer's (in, 1, basis)
    # spline coefficients are (trial GN: refused where its output width was 1)
    found = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 3 and p[0].numel() > 1]
    if not found or len({p.shape[0] for _, p in found}) != 1 or found[0][1].shape[0] < 2:
        return []
    return found


def expert_input_axis(module: nn.Module, tensor: Tensor) -> int:
    """The input axis of one of ``module``'s expert tensors: the last for ``(experts, out, in)``; the one before it
    where ``transformers`` marks the experts ``is_transposed`` (``(experts, in, out)``, multiplied as ``x @ W``:
    gpt-oss's ``gate_up_proj`` and ``down_proj``; a trial's 2:4 blocks ran along their outputs)."""
    return tensor.dim() - 2 if getattr(module, "is_transposed", False) is True else tensor.dim() - 1


def is_experts(module: nn.Module) -> bool:
    """What the default and wildcards pick as experts: a module class named for them holding expert tensors."""
    return "expert" in type(module).__name__.lower() and bool(expert_tensors(module))


def expert_count(name: str, module: nn.Module) -> int:
    """How many experts ``module`` (a child named ``name``) holds: the first dimension of its expert tensors, or the
    length of a ``ModuleList``/``ModuleDict`` of two or more whose name or class names experts; 0 otherwise."""
    if is_experts(module):
        return int(expert_tensors(module)[0][1].shape[0])
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return 0
    count = len(list(module.children()))
    named = "expert" in name.lower() or "expert" in type(module).__name__.lower()
    return count if named and count >= 2 else 0


def _named_as_router(path: list[str], classes: list[str]) -> bool:
    words = [c.lower() for c in path]
    return any(w in _ROUTER_WORDS or w.endswith(tuple(f"_{r}" for r in _ROUTER_WORDS)) for w in words) or any(
        r in c.lower() for c in classes for r in _ROUTER_CLASS_WORDS
    )


def router_layers(model: nn.Module) -> dict[int, str]:
    """The Linear layers that route tokens to experts (id -> qualified name): in a module with experts as children,
    outside them, named or typed as a router or gate on the way from that module (``router.layer``,
    ``shared_expert_gate``, a class named ``...Router``), with one output per expert or a single one."""
    found: dict[int, str] = {}
    for block_name, block in model.named_modules():
        experts = {name: n for name, child in block.named_children() if (n := expert_count(name, child))}
        if not experts:
            continue
        outputs = {1, *experts.values()}
        stack: list[tuple[list[str], list[str], nn.Module]] = [
            ([name], [type(child).__name__], child) for name, child in block.named_children() if name not in experts
        ]
        while stack:
            path, classes, module = stack.pop()
            if isinstance(module, nn.Linear) and module.out_features in outputs and _named_as_router(path, classes):
                found[id(module)] = ".".join([block_name, *path] if block_name else path)
            stack.extend(([*path, n], [*classes, type(c).__name__], c) for n, c in module.named_children())
    return found
