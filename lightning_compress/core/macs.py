"""Multiply-accumulates of one forward, counted on the model itself (forward hooks on the layers).

Counted: ``nn.Linear`` and ``transformers``' Conv1D (``output elements x input features``), every
``nn.ConvNd`` (``output elements x input channels per group x kernel size``), and the weight matrices that
recurrent layers and ``nn.MultiheadAttention`` multiply in their own forward (each matrix once per token: its
size times the tokens it is applied to; MultiheadAttention's ``out_proj`` included, which it uses without calling).
Attention products, norms and activations are not counted: on the models this package compacts, the weights hold
almost all of the compute, and the count is what channel pruning changes. Nor are the weights of a mixture of
experts stored as 3-d tensors (Mixtral's, Qwen2-MoE's): their module multiplies them for the tokens routed to each
expert; :func:`uncounted_experts` names them, and the reports and the ``measure="macs"`` budget say so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .layers import linear_like_types, weight_axes
from .selection import expert_tensors, is_experts
from .tracing import call_model, eval_mode, forward_state_kept
from .wrappers import modules_by_name

__all__ = ["count_macs", "layer_macs", "uncalled_layers", "uncalled_note", "uncounted_experts", "uncounted_note"]


def uncounted_experts(model: nn.Module) -> list[str]:
    """The modules whose expert weights (3-d tensors, :func:`~.selection.expert_tensors`) :func:`count_macs` leaves
    out (trial DL: a Qwen2-MoE's 50% MACs budget was said met at 49.4% where the experts made it 65%)."""
    return [name for name, module in model.named_modules() if expert_tensors(module)]


def uncounted_note(model: nn.Module, names: list[str]) -> str:
    """What :func:`uncounted_experts`' ``names`` hold, for a message: experts, or (trial DU: Zamba's Mamba mixers, said
    to hold "expert weights") other weights of 3 or more dimensions a module multiplies in its own forward."""
    modules = modules_by_name(model)
    listed = f"{names[:3]}{' ...' * (len(names) > 3)}"
    if all(is_experts(modules[name]) for name in names):
        return (
            f"the expert weights of {listed} (3-d tensors their module multiplies for the tokens routed to each expert)"
        )
    return (  # (trial GK: FNO's 4-d spectral weights were said to be 3-d)
        f"the weights of 3 or more dimensions of {listed} (tensors their module multiplies in its own forward: a "
        "mixture's experts, per-head projections such as a Mamba mixer's, or a Fourier layer's spectral weights)"
    )


def layer_macs(module: nn.Module, output: Any, inputs: Any = (), kwargs: dict[str, Any] | None = None) -> int:
    """MACs ``module`` spent producing ``output`` from ``inputs`` (its positional arguments) and ``kwargs`` (0 for
    a module that is not a linear-like, recurrent or attention layer). A transposed convolution spreads every input
    element over a kernel of every output channel (of its group): counted from its input."""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return _own_matrix_macs(module, tuple(inputs), kwargs or {})
    if not isinstance(output, Tensor):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and inputs and isinstance(inputs[0], Tensor):
        kernel = math.prod(module.kernel_size)
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, linear_like_types()):
        weight: Tensor = module.weight  # type: ignore[assignment]
        return output.numel() * int(weight.shape[weight_axes(module)[1]])
    return 0


def _argument(inputs: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    return inputs[position] if len(inputs) > position else kwargs.get(name)


def _tokens(x: Any, features: int) -> int:
    """Vectors of ``features`` in ``x`` (a tensor or a ``PackedSequence``)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0])
    return x.numel() // features if isinstance(x, Tensor) and features else 0


def _own_matrix_macs(module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """A recurrent layer applies each of its matrices once per token and step; MultiheadAttention its query, key
    and value blocks to the query, key and value tokens, and ``out_proj`` to the query tokens."""
    if isinstance(module, nn.RNNBase):
        steps = _tokens(_argument(inputs, kwargs, 0, "input"), module.input_size)
        return steps * sum(p.numel() for n, p in module.named_parameters(recurse=False) if "weight" in n)
    assert isinstance(module, nn.MultiheadAttention)
    width = module.embed_dim
    query = _tokens(_argument(inputs, kwargs, 0, "query"), width)
    key = _tokens(_argument(inputs, kwargs, 1, "key"), module.kdim)
    value = _tokens(_argument(inputs, kwargs, 2, "value"), module.vdim)
    return query * width * width + key * width * module.kdim + value * width * module.vdim + query * width * width


def uncalled_layers(model: nn.Module, called: set[int]) -> list[str]:
    """The Linear/Conv layers of ``model`` holding weights whose forward did not run (``called``: ids of the modules
    that ran): their MACs are not counted (trial EA: WavLM multiplies its attention projections' weights in
    ``F.multi_head_attention_forward`` without calling them: a 50% budget was said met where 66.5% was left)."""
    # nn.MultiheadAttention's `out_proj`, which it uses without calling, is counted with it
    counted = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, module in model.named_modules():
        if id(module) in counted:
            continue
        weight = getattr(module, "weight", None)
        layer = isinstance(module, linear_like_types()) and isinstance(weight, Tensor) and weight.numel() > 0
        if layer and id(module) not in called:
            found.append(name)
    return found


def uncalled_note(names: list[str]) -> str:
    """:func:`uncalled_layers`' ``names``, for a message."""
    return (
        f"the layers {names[:3]}{' ...' * (len(names) > 3)} ({len(names)}), which the forward did not call (unused, "
        "or their weights multiplied directly, as WavLM's attention does)"
    )


def count_macs(model: nn.Module, example_inputs: Any, uncalled: list[str] | None = None) -> int:
    """MACs of one eval-mode forward of ``model`` on ``example_inputs`` (a tensor, tuple or dict); ``uncalled``, when
    given, receives the names of the Linear/Conv layers the forward did not call (:func:`uncalled_layers`)."""
    total = 0
    called: set[int] = set()

    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        nonlocal total
        called.add(id(module))
        total += layer_macs(module, output, args, kwargs)

    counted = (*linear_like_types(), nn.MultiheadAttention, nn.RNNBase)
    layers = [m for m in model.modules() if isinstance(m, counted)]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        with eval_mode(model), torch.no_grad(), forward_state_kept(model):
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if uncalled is not None:
        uncalled.extend(uncalled_layers(model, called))
    return total
