"""Attention heads: which projections form a multi-head attention block, read from one forward.

A block is found from the data flow, not from class or attribute names: a linear-like layer (the
output projection) whose input is computed, through reshapes, an attention product (a batched
matmul of two activations, or scaled dot-product attention) and no other layer or parameter,
from the outputs of the query, key and value projections (three layers, or one fused layer whose
output is split in three). The head size is the attention module's ``head_dim`` (or
``attention_head_size`` / ``head_size``) attribute: the common parent of the projections.

The unit that can be removed is a key/value head with its whole query group (with grouped-query
attention, query heads ``j * r .. (j + 1) * r - 1`` read key/value head ``j``; ``r = 1`` for
multi-head attention): its rows of Q, K and V and its columns of the output projection. Removing
it is exact when those slices are zero, and the forward keeps working after compaction as long as
it derives head counts from the projections' sizes (``view(..., -1, head_dim)``, what current
``transformers`` models do) or from the attributes :func:`set_head_counts` updates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import adapter_modules
from .head_layout import common_parent, confirmed_layouts, unconfirmed_reasons
from .layers import linear_like_types, weight_axes
from .tracing import call_model
from .wrappers import modules_by_name

__all__ = [
    "COUNT_ATTRIBUTES",
    "HEADS_ATTRIBUTE",
    "AttentionBlock",
    "find_attention",
    "head_attributes",
    "head_record",
    "set_head_counts",
]

_ATTENTION_OPS = ("Bmm", "ScaledDotProduct", "Baddbmm")
_LAYER_OPS = ("Addmm", "MmBackward", "Convolution")
_MAX_DEPTH = 40
_HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size")
HEADS_ATTRIBUTE = "_lightning_compress_heads"  # on a compacted attention module: {attribute: count} it was given
# attributes an attention module may keep of its sizes: (name, what it counts)
_COUNT_ATTRS = (
    ("num_heads", "heads"),
    ("num_attention_heads", "heads"),
    ("n_head", "heads"),
    ("n_heads", "heads"),  # DistilBERT
    ("num_key_value_heads", "kv_heads"),
    ("num_kv_heads", "kv_heads"),
    ("all_head_size", "width"),
    ("split_size", "width"),
    ("inner_dim", "width"),
)
COUNT_ATTRIBUTES = frozenset(name for name, _ in _COUNT_ATTRS)


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: its projections (module names), head size and head counts.

    ``query``/``key``/``value`` name the same module for a fused projection; ``offsets`` are where
    Q, K and V start among that module's outputs (``(0, 0, 0)`` for separate projections), unless
    ``interleaved``: then the fused outputs hold one key/value group after another, each its query
    heads, then its key head, then its value head (``view(..., kv_heads, group_size + 2, head_dim)``; with
    one query head per group, ``view(..., heads, 3 * head_dim)`` as GPT-NeoX, BLOOM and GPTBigCode do).
    """

    module: str
    query: str
    key: str
    value: str
    output: str
    head_dim: int
    heads: int
    kv_heads: int
    offsets: tuple[int, int, int] = (0, 0, 0)
    interleaved: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def rows(self, part: str, head: int) -> range:
        """The output positions of ``part`` (``"query"``, ``"key"`` or ``"value"``) that hold ``head`` (a query
        head for ``"query"``, a key/value head otherwise) in its projection."""
        d, r = self.head_dim, self.group_size
        if self.interleaved:
            group, index = divmod(head, r) if part == "query" else (head, r if part == "key" else r + 1)
            start = (group * (r + 2) + index) * d
        else:
            start = self.offsets[("query", "key", "value").index(part)] + head * d
        return range(start, start + d)

    def unit_positions(self) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
        """Per (module, ``"out"``/``"in"``), the positions each unit owns and the unit of each."""
        d, r = self.head_dim, self.group_size
        parts: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

        def add(name: str, kind: str, positions: range, unit: int) -> None:
            index, channel = parts.setdefault((name, kind), ([], []))
            index.extend(positions)
            channel.extend([unit] * len(positions))

        for j in range(self.kv_heads):
            for h in range(j * r, (j + 1) * r):
                add(self.query, "out", self.rows("query", h), j)
                add(self.output, "in", range(h * d, (h + 1) * d), j)
            add(self.key, "out", self.rows("key", j), j)
            add(self.value, "out", self.rows("value", j), j)
        return parts


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, linear_like_types()) and not isinstance(module, nn.modules.conv._ConvNd)


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[weight_axes(module)[0]])


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[weight_axes(module)[1]])


def _sources(start: Any, produced_by: dict[Any, str]) -> tuple[set[str], bool, list[Tensor]] | None:
    """Walk back from ``start``: the layers whose outputs it is computed from, whether an attention product lies
    on the way, and the parameters that do (a query/key norm's weight); ``None`` if an unhooked layer does."""
    found: set[str] = set()
    attention = False
    parameters: list[Tensor] = []
    seen: set[Any] = set()
    queue: deque[tuple[Any, int]] = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced_by:
            found.add(produced_by[node])
            continue
        kind = type(node).__name__
        if any(op in kind for op in _LAYER_OPS) or depth > _MAX_DEPTH:
            return None
        if "AccumulateGrad" in kind:
            parameters.append(node.variable)
            continue
        attention = attention or any(op in kind for op in _ATTENTION_OPS)
        queue.extend((parent, depth + 1) for parent, _ in node.next_functions)
    return found, attention, parameters


def _head_size(module: nn.Module) -> int | None:
    for attr in _HEAD_SIZE_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_attention(model: nn.Module, example_inputs: Any) -> tuple[list[AttentionBlock], set[str], dict[str, str]]:
    """Attention blocks of ``model``, read from the autograd graph of one forward on ``example_inputs``.

    Returns:
        The blocks whose heads can be removed; the names of every layer that feeds an attention
        product (Q/K/V projections, also of blocks that were not recognized); and, per block that
        was not recognized (keyed by its output projection), why.
    """
    inputs: dict[str, Tensor] = {}
    produced_by: dict[Any, str] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: Any, out: Any) -> None:
            if args and isinstance(args[0], Tensor):
                inputs[name] = args[0]
            if isinstance(out, Tensor) and out.grad_fn is not None:
                produced_by[out.grad_fn] = name

        return record

    modules = modules_by_name(model)
    adapters = adapter_modules(model)  # peft adapters adding to projections: heads left whole
    owner = {id(p): n for n, m in modules.items() for p in m.parameters(recurse=False)}
    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items() if _linear_like(m)]
    try:
        with torch.enable_grad():
            result = call_model(model, example_inputs)
    finally:
        for handle in hooks:
            handle.remove()
    del result  # the graph stays alive through the recorded tensors
    blocks: list[AttentionBlock] = []
    feeding: set[str] = set()
    skipped: dict[str, str] = {}
    candidates: list[list[AttentionBlock]] = []
    for name, value in inputs.items():
        walked = _sources(value.grad_fn, produced_by) if value.grad_fn is not None else None
        if walked is None or not walked[1] or not walked[0]:
            continue
        producers = sorted(walked[0])
        feeding.update(producers)  # left out of channel groups, whether or not the heads can be removed
        per_head = _head_size(modules.get(common_parent(producers), model))
        owners = {owner.get(id(p)) for p in walked[2]}
        if len(owners) > 2:  # StableLM's qk_layernorm: a LayerNorm per head, which head removal would have to cut
            held = sorted(str(o) for o in owners)
            skipped[name] = (  # named (trial BX: LeViT's BatchNorms and attention biases were called norms per head)
                f"{len(owners)} modules with parameters ({held[:4]}{' ...' if len(held) > 4 else ''}) lie between "
                "its projections and the attention product (a norm per head, as StableLM's qk_layernorm, or norms and "
                "biases over all heads; or the product is no attention at all, as a recommender's interaction of its "
                "embeddings), which head removal does not cut"
            )
            continue
        if any(p.dim() != 1 or p.numel() != per_head for p in walked[2]):
            skipped[name] = (
                "a layer with parameters other than a per-head norm (e.g. a query/key norm over all heads, a "
                "position bias per head) lies between its projections and the attention product, which head "
                "removal does not cut"
            )
            continue
        # else a norm over one head's features (Qwen3, Gemma3: one for the queries, one for the keys) is the same for
        # every head: no cut needed
        found = _block(model, modules, name, producers, adapters)
        if isinstance(found, str):
            skipped[name] = found
        else:
            candidates.append(found)
    unconfirmed = []
    for options, confirmed in zip(candidates, confirmed_layouts(model, example_inputs, candidates), strict=True):
        if confirmed is None:
            unconfirmed.append(options[0])
        else:
            blocks.append(confirmed)
    if unconfirmed:
        for block, reason in zip(unconfirmed, unconfirmed_reasons(model, example_inputs, unconfirmed), strict=True):
            skipped[block.output] = reason
    return blocks, feeding, skipped


def _block(
    model: nn.Module, modules: dict[str, nn.Module], output: str, producers: list[str], adapters: dict[int, str]
) -> list[AttentionBlock] | str:
    """The readings of an attention block's projections that sizes allow (confirmed on the model later), or why
    there is none."""
    added = [n for n in producers if id(modules[n]) in adapters]
    if added:  # trial EM: GPT-2's reason named the tuner layer, the adapters' common parent, as the attention
        shown = f"{added[:2]}{' ...' if len(added) > 2 else ''}"
        return f"adapters (peft: {shown}) add to its projections: merge the adapters first to prune heads"
    parent = common_parent(producers)
    attention = modules[parent]
    d = _head_size(attention)
    if d is None:
        return f"its attention module {parent or type(model).__name__} has no {'/'.join(_HEAD_SIZE_ATTRS)} attribute"
    width = _in_features(modules[output])
    if width % d:
        return f"its output projection reads {width} features, not a multiple of the head size {d}"
    heads = width // d
    if len(producers) == 1:
        (fused,) = producers
        rest = _out_features(modules[fused]) - width
        if rest <= 0 or rest % (2 * d) or heads % (rest // (2 * d)):
            return f"its fused projection {fused} does not hold Q for {heads} heads of size {d} and equal K and V"
        kv_heads = rest // (2 * d)
        split = (0, width, width + kv_heads * d)
        return [
            AttentionBlock(parent, fused, fused, fused, output, d, heads, kv_heads, split),
            AttentionBlock(parent, fused, fused, fused, output, d, heads, kv_heads, interleaved=True),
        ]
    if len(producers) != 3:
        return f"its attention reads {len(producers)} projections, not 3 (Q, K, V)"
    sizes = {n: _out_features(modules[n]) for n in producers}
    if any(s % d for s in sizes.values()):
        return f"its projections' sizes {sorted(sizes.values())} are not multiples of the head size {d}"
    larger = [n for n in producers if sizes[n] == width]
    if len(set(sizes.values())) == 1:
        q, k, v = producers
    elif len(larger) == 1 and len({sizes[n] for n in producers if n not in larger}) == 1:
        q = larger[0]
        k, v = (n for n in producers if n != q)
    else:
        return f"its projections' sizes {sizes} do not form Q and equal K/V"
    kv_heads = sizes[k] // d
    if sizes[q] != width or heads % kv_heads:
        return f"its output projection reads {width} features for {sizes[q] // d} query heads of size {d}"
    # equal sizes do not say which is Q: every assignment is a candidate, the model confirms one
    return [AttentionBlock(parent, a, b, c, output, d, heads, kv_heads) for a, b, c in _assignments(q, k, v, sizes)]


def _assignments(q: str, k: str, v: str, sizes: dict[str, int]) -> list[tuple[str, str, str]]:
    """(query, key, value) assignments of three projections: ``q`` is Q when it alone is wider; K and V may be
    either way round, and with equal sizes any of the three may be Q."""
    queries = [q] if sizes[q] != sizes[k] else [q, k, v]
    out = []
    for query in queries:
        others = [n for n in (q, k, v) if n != query]
        out += [(query, others[0], others[1]), (query, others[1], others[0])]
    return out


def head_attributes(attention: nn.Module, block: AttentionBlock) -> dict[str, int]:
    """The attributes of ``attention`` that hold ``block``'s head counts or width, with their values."""
    counts = {"heads": block.heads, "kv_heads": block.kv_heads, "width": block.heads * block.head_dim}
    found = {}
    for attr, what in _COUNT_ATTRS:
        value = getattr(attention, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == counts[what]:
            found[attr] = value
    return found


def set_head_counts(attention: nn.Module, block: AttentionBlock, kv_heads: int) -> dict[str, int]:
    """Set ``attention``'s count attributes for ``kv_heads`` key/value heads kept (each with its query
    group); returns the attributes set and their new values."""
    heads = kv_heads * block.group_size
    counts = {"heads": heads, "kv_heads": kv_heads, "width": heads * block.head_dim}
    updated = {}
    for attr in head_attributes(attention, block):
        what = dict(_COUNT_ATTRS)[attr]
        setattr(attention, attr, counts[what])
        updated[attr] = counts[what]
    setattr(attention, HEADS_ATTRIBUTE, {**getattr(attention, HEADS_ATTRIBUTE, {}), **updated})
    return updated


def head_record(model: nn.Module) -> dict[str, dict[str, int]]:
    """The head counts compaction set on ``model``'s attention modules: ``{module: {attribute: count}}``."""
    return {
        name: dict(getattr(module, HEADS_ATTRIBUTE))
        for name, module in model.named_modules()
        if isinstance(getattr(module, HEADS_ATTRIBUTE, None), dict)
    }
