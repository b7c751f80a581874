"""Confirming which rows of the projections hold each attention head, on the model itself.

Sizes alone cannot tell where a head's rows are: GPT-2 and GPTBigCode both fuse Q, K and V into one
projection three times as wide as the model, GPT-2 as ``[Q | K | V]`` and GPTBigCode head by head
(``[q0 k0 v0 | q1 k1 v1 | ...]``). A mask built on the wrong reading cuts rows of several heads, which
:func:`~.compact.compact` then cannot remove. So every candidate reading is checked with three probes
of one forward each, scaling a head's rows (and biases) by two, which is exact in floating point:

* the value rows of the first key/value head with a tenth of the largest value weights (a pruned or weak head
  proves nothing) must double exactly the output projection's input columns of its query group, visibly, and leave every
  other column as it was;
* the query rows of its first query head, and its key rows, must leave every column outside that head
  (that group) as it was.

The attention module is called alone on the inputs it received in one plain forward (the model as a
whole when that fails), unprobed once for the reference, with the weights restored after each probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .layers import weight_axes
from .tracing import call_model, eval_mode, has_float_tensor, jittered, output_tensors
from .wrappers import modules_by_name

if TYPE_CHECKING:
    from .heads import AttentionBlock

__all__ = ["common_parent", "confirmed_layouts", "unconfirmed_reasons"]


def common_parent(names: Sequence[str]) -> str:
    """The innermost module that holds every module in ``names`` (the parent of a single one)."""
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    if len(prefix) == min(len(p) for p in parts):  # one name, or one that holds the others: its parent
        prefix = prefix[:-1]
    return ".".join(prefix)


def confirmed_layouts(
    model: nn.Module, example_inputs: Any, candidates: Sequence[Sequence[AttentionBlock]]
) -> list[AttentionBlock | None]:
    """Per attention block, the first of its candidate readings the model confirms (``None``: none does).

    ``candidates`` holds, per block, readings of the same projections (module names and head counts).
    Runs in eval mode (dropout off) with caches off; every weight and training flag is restored.
    """
    chosen = _confirmed(model, example_inputs, candidates)
    if None in chosen and has_float_tensor(example_inputs):
        # an all-zero example (audio, images) can leave the attention output zero: nothing to see a probe in (trial
        # BX: HuBERT's heads were never pruned with zeros). Blocks not confirmed are tried on noisy inputs too
        left = [i for i, found in enumerate(chosen) if found is None]
        try:  # a model that turns floats into indices can fail on noise: its blocks stay unconfirmed
            again = _confirmed(model, jittered(example_inputs), [candidates[i] for i in left])
        except Exception:
            again = [None] * len(left)
        for i, found in zip(left, again, strict=True):
            chosen[i] = found
    return chosen


_NOT_CONFIRMED = (
    "doubling one head's rows of its projections changed the other heads' outputs in every layout tried "
    "([Q | K | V], or Q, K and V head by head), so which rows form a head is not known"
)


def unconfirmed_reasons(model: nn.Module, example_inputs: Any, blocks: Sequence[AttentionBlock]) -> list[str]:
    """Why each of ``blocks`` (a reading no probe confirmed) was not confirmed: an attention output too small to
    read on ``example_inputs`` (zero, or subnormal, where doubling is not exact: a trial's random-weight MobileViT
    ends its attention outputs at 1e-41 and 0), or probes that moved other heads' outputs."""
    modules = modules_by_name(model)
    padding_note = _padding_only(model, example_inputs)
    with torch.no_grad(), eval_mode(model):
        calls = _first_calls(model, example_inputs, modules, {_probed(b) for b in blocks})
        reasons = []
        for block in blocks:
            output = _runner(model, example_inputs, modules, block, calls.get(_probed(block)))()
            largest = float(output.detach().float().abs().max()) if output is not None and output.numel() else 0.0
            if output is not None and largest < torch.finfo(output.dtype).tiny:
                reasons.append(
                    f"its attention output on `example_inputs` is {'zero' if largest == 0.0 else 'subnormal'} "
                    f"(largest |value| {largest:.3g}), so no probe can show which rows form a head ("
                    + (padding_note or "a model with random weights? Prune a trained model, or give other example "
                       "inputs")
                    + ")"
                )  # fmt: skip
            else:
                reasons.append(_NOT_CONFIRMED)
    return reasons


def _padding_only(model: nn.Module, example_inputs: Any) -> str:
    """When every integer of ``example_inputs`` (token ids) is the ``padding_idx`` of an embedding of ``model``, whose
    row is zero (trial EJ: all-zero `input_ids` with `pad_token_id=0` left every head of a trained Llama whole, and
    the reason blamed random weights; the retry with noise is for float inputs), what to give instead; else empty."""
    ids = [
        t
        for t in output_tensors(example_inputs)
        if not (t.is_floating_point() or t.is_complex()) and t.dtype != torch.bool and t.numel()
    ]
    for name, module in model.named_modules():
        pad = module.padding_idx if isinstance(module, nn.Embedding) else None
        if pad is not None and ids and all(bool((t == pad).all()) for t in ids):
            return (
                f"every token id of `example_inputs` is {pad}, the `padding_idx` of {name or 'the model'}, whose "
                "embedding row is zero: give other token ids, e.g. `torch.randint(1, vocab_size, (1, 16))`"
            )
    return ""


def _confirmed(
    model: nn.Module, example_inputs: Any, candidates: Sequence[Sequence[AttentionBlock]]
) -> list[AttentionBlock | None]:
    modules = modules_by_name(model)
    with torch.no_grad(), eval_mode(model):
        calls = _first_calls(model, example_inputs, modules, {_probed(b) for c in candidates for b in c})
        chosen: list[AttentionBlock | None] = []
        for options in candidates:
            found = None
            for block in options:
                run = _runner(model, example_inputs, modules, block, calls.get(_probed(block)))
                reference = run()
                if reference is not None and _confirms(block, modules, reference, run):
                    found = block
                    break
            chosen.append(found)
    return chosen


def _probed(block: AttentionBlock) -> str:
    """The module run alone for ``block``: the innermost one that holds its projections and output projection
    (BERT keeps the output projection beside its self-attention module)."""
    return common_parent([block.query, block.key, block.value, block.output])


def _first_calls(
    model: nn.Module, example_inputs: Any, modules: dict[str, nn.Module], names: set[str]
) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The first call of every attention module in one plain forward (a module shared by several layers is
    probed on its first use)."""
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def record_call(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.setdefault(name, (args, kwargs))

        return hook

    handles = [  # the model itself ("") is probed as a whole
        modules[name].register_forward_pre_hook(record_call(name), with_kwargs=True) for name in names if name
    ]
    try:
        call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _runner(
    model: nn.Module,
    example_inputs: Any,
    modules: dict[str, nn.Module],
    block: AttentionBlock,
    call: tuple[tuple[Any, ...], dict[str, Any]] | None,
) -> Callable[[], Tensor | None]:
    """Runs the attention module of ``block`` (or the model) and returns its output projection's first input."""
    output = modules[block.output]
    probed = _probed(block)

    def run() -> Tensor | None:
        seen: list[Tensor] = []

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not seen and args and isinstance(args[0], Tensor):
                seen.append(args[0].detach().clone())

        handle = output.register_forward_pre_hook(hook)
        try:
            if call is not None:
                try:
                    modules[probed](*call[0], **call[1])
                except Exception:  # a module that cannot run alone: the whole model below
                    seen.clear()
            if not seen:
                call_model(model, example_inputs)
        finally:
            handle.remove()
        return seen[0] if seen else None

    return run


def _confirms(
    block: AttentionBlock, modules: dict[str, nn.Module], baseline: Tensor, run: Callable[[], Tensor | None]
) -> bool:
    d, r = block.head_dim, block.group_size
    width = block.heads * d
    if baseline.shape[-1] != width:
        return False
    base = baseline.reshape(-1, width).float()
    scale = float(base.abs().max())
    if not (math.isfinite(scale) and scale > 0.0):
        return False
    # relative to the output: a tiny random model's attention output (trial CL: MobileViT's, about 1e-24) is read too
    tolerance = 1e-3 * scale
    # the first key/value head whose value rows hold weights under this reading: doubling zero rows proves nothing
    # (trial BY: with a pruned head 0, Falcon's fused projection passed for [Q | K | V] and masks cut the wrong rows)
    value = modules[block.value]
    # the first head with a tenth of the largest value weights (trial CA: a weak first head failed every reading);
    # not the strongest: a `[Q | K | V]` reading of a head-by-head projection puts the last head's value rows where
    # they are, and its probes pass
    sizes = [_rows_size(value, block.rows("value", j)) for j in range(block.kv_heads)]
    if max(sizes) == 0.0:
        return False
    j = next(i for i, size in enumerate(sizes) if size >= 0.1 * max(sizes))
    group_columns = slice(j * r * d, (j + 1) * r * d)
    q = j * r
    for part, head, inside in (
        ("value", j, group_columns),
        ("query", q, slice(q * d, (q + 1) * d)),
        ("key", j, group_columns),
    ):
        probed = _scaled(modules[getattr(block, part)], block.rows(part, head), run)
        if probed is None or probed.shape != baseline.shape:
            return False
        new = probed.reshape(-1, width).float()
        outside = torch.ones(width, dtype=torch.bool)
        outside[inside] = False
        if outside.any() and float((new[:, outside] - base[:, outside]).abs().max()) > tolerance:
            return False
        if part == "value" and (
            float(base[:, inside].abs().max()) <= tolerance  # no visible output to double: not confirmed
            or float((new[:, inside] - 2 * base[:, inside]).abs().max()) > 2 * tolerance
        ):
            return False
    return True


def _rows_size(module: nn.Module, rows: range) -> float:
    """The largest ``|value|`` in ``rows`` of ``module``'s outputs (weight and bias)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    index = torch.arange(rows.start, rows.stop, device=weight.device)
    bias = getattr(module, "bias", None)
    size = float(weight.index_select(weight_axes(module)[0], index).abs().max())
    return max(size, float(bias.index_select(0, index).abs().max())) if isinstance(bias, Tensor) else size


def _scaled(module: nn.Module, rows: range, run: Callable[[], Tensor | None]) -> Tensor | None:
    """``run()`` with ``rows`` of ``module``'s outputs (weight and bias) doubled; restored afterwards."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    assert isinstance(weight, Tensor)
    index = torch.arange(rows.start, rows.stop, device=weight.device)
    axis = weight_axes(module)[0]
    saved = weight.index_select(axis, index).clone()
    saved_bias = bias.index_select(0, index).clone() if isinstance(bias, Tensor) else None
    try:
        weight.index_copy_(axis, index, saved * 2)
        if saved_bias is not None and isinstance(bias, Tensor):
            bias.index_copy_(0, index, saved_bias * 2)
        return run()
    finally:
        weight.index_copy_(axis, index, saved)
        if saved_bias is not None and isinstance(bias, Tensor):
            bias.index_copy_(0, index, saved_bias)
