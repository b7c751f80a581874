"""Channel groups: which slices of which parameters must be removed together.

Removing output channel ``c`` of a Conv means removing ``c`` from its bias, from the BatchNorm
after it, from the input channels of every layer that consumes it (through activations,
pooling, flatten, residual additions and concatenations), and from every other layer whose
output is added to it. Finding these couplings needs the model's data flow, which we take from
Torch-Pruning's ``DependencyGraph`` (it traces autograd, so any ``forward`` works; see
``docs`` in the README for why we use it rather than our own tracer). We only read the graph:
the groups are turned into plain :class:`ChannelGroup` records (module names and index
tensors), and masking and compaction are ours.

A group is prunable when every module in it is a Linear, a Conv (dense or depthwise) or a
BatchNorm, and none of its channels reaches the model's output (the classifier's outputs are
never pruned). Groups with a LayerNorm, GroupNorm, attention or a free ``nn.Parameter`` are
left alone: removing a channel there is not the same as zeroing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layers import linear_like_types
from .qat import quantizers

__all__ = [
    "ChannelGroup",
    "LayerSlice",
    "attention_inputs",
    "build_channel_groups",
    "call_model",
    "eval_mode",
    "nonzero_channels",
    "output_tensors",
    "param_slices",
    "per_position",
    "plain_float",
]

_CONV = nn.modules.conv._ConvNd
_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class LayerSlice:
    """Positions along one module's output (``"out"``) or input (``"in"``) dimension.

    ``index[i]`` belongs to channel ``channel[i]`` of its group (a flatten maps one channel to
    several input features of the next Linear).
    """

    module: str
    kind: str
    index: Tensor
    channel: Tensor


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, named after the layer whose outputs they are."""

    name: str
    size: int
    slices: list[LayerSlice] = field(default_factory=list)

    def modules(self) -> list[str]:
        return sorted({s.module for s in self.slices})


def is_depthwise(module: nn.Module) -> bool:
    if not isinstance(module, _CONV):
        return False
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def supported(module: nn.Module) -> bool:
    """Modules whose channels can be removed exactly: Linear, dense or depthwise Conv, BatchNorm."""
    if isinstance(module, _CONV):
        return module.groups == 1 or is_depthwise(module)
    return isinstance(module, (nn.Linear, _NORM))


def param_slices(module: nn.Module, kind: str) -> list[tuple[str, int]]:
    """``(attribute, dim)`` of the parameters that a slice of ``kind`` cuts in ``module``."""
    if isinstance(module, _NORM):
        return [(a, 0) for a in ("weight", "bias") if isinstance(getattr(module, a, None), nn.Parameter)]
    if kind == "out":
        return [(a, 0) for a in ("weight", "bias") if isinstance(getattr(module, a, None), nn.Parameter)]
    if is_depthwise(module):
        return []  # a depthwise conv's input channel is its output channel
    return [("weight", 1)]


def per_position(values: Tensor, dim: int, index: Tensor) -> Tensor:
    """Sum of ``values`` over each slice ``index[i]`` along ``dim`` (one number per position)."""
    index = index.to(values.device)
    return values.index_select(dim, index).movedim(dim, 0).reshape(index.numel(), -1).sum(1)


def nonzero_channels(values: Tensor, dim: int, index: Tensor, channel: Tensor, size: int) -> Tensor:
    """Which of a group's ``size`` channels have a nonzero entry in ``values`` at the slice's positions."""
    nonzero = (per_position(values != 0, dim, index) > 0).cpu()
    out = torch.zeros(size, dtype=torch.bool)
    out.index_put_((channel,), nonzero, accumulate=True)
    return out


@contextlib.contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` meanwhile (a ``transformers`` model then returns outputs, not caches)."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way Lightning calls it with ``example_input_array``, with caches off."""
    with without_cache(model):
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode; each module's own training flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def plain_float(model: nn.Module) -> Iterator[None]:
    """The float data flow in eval mode: fake quantizers off; everything restored afterwards."""
    saved = []
    for _, q in quantizers(model):
        saved.append((q, q.fake_quant_enabled, q.observer_enabled))
        q.fake_quant_enabled = False
        q.observer_enabled = False
    try:
        with eval_mode(model):
            yield
    finally:
        for q, fq, ob in saved:
            q.fake_quant_enabled = fq
            q.observer_enabled = ob


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "granularity='channel' and compact() need Torch-Pruning's dependency graph: "
            "pip install 'lightning-compress[structured]' (or pip install torch-pruning)."
        ) from err
    return torch_pruning


_ATTENTION_OPS = ("Bmm", "ScaledDotProduct", "Baddbmm")
_ATTENTION_DEPTH = 16


def attention_inputs(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the Linear layers whose outputs reach an attention product (a batched matmul of two
    activations, or scaled dot-product attention) before any other layer: Q/K/V projections.

    Read from the autograd graph of one forward. Their output channels are heads' rows: removing
    one alone breaks the reshape into heads, and following them through attention is what makes a
    dependency-graph search explode (minutes on a 2-layer Llama), so they are not used as roots.
    """
    outputs: dict[str, Any] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or type(module) in linear_like_types()[2:]
    ]
    try:
        with torch.enable_grad():
            result = call_model(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    consumers: dict[Any, list[Any]] = {}
    stack = [t.grad_fn for t in output_tensors(result) if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                consumers.setdefault(parent, []).append(node)
                stack.append(parent)
    found = []
    for name, out in outputs.items():
        start = getattr(out, "grad_fn", None)
        if start is not None and _reaches_attention(start, consumers):
            found.append(name)
    return found


def _reaches_attention(start: Any, consumers: dict[Any, list[Any]]) -> bool:
    frontier, visited = [(start, 0)], set()
    while frontier:
        node, depth = frontier.pop(0)
        if node in visited or depth > _ATTENTION_DEPTH:
            continue
        visited.add(node)
        kind = type(node).__name__
        if depth and any(op in kind for op in _ATTENTION_OPS):
            return True
        if depth and (kind.startswith("Addmm") or kind.startswith("MmBackward") or "Convolution" in kind):
            continue  # another layer: its output is its own
        frontier.extend((c, depth + 1) for c in consumers.get(node, []))
    return False


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model's output (nested tuples, lists, dicts and ``ModelOutput``s)."""
    flat: list[Tensor] = []
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            flat.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return flat


def build_channel_groups(
    model: nn.Module, example_inputs: Any, producers: set[str] | None = None
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Trace ``model`` once on ``example_inputs`` and return its prunable channel groups.

    Args:
        model: the model (its weights are not changed; modes are restored).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        producers: module names whose output channels may be pruned; a group is prunable only
            if every layer producing its channels is in this set. ``None``: all of them.

    Returns:
        The prunable groups, and for every group left alone, why (keyed by its layer's name).
    """
    tp = _torch_pruning()
    names = {module: name for name, module in model.named_modules()}
    with torch.enable_grad(), plain_float(model):
        attention = attention_inputs(model, example_inputs)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=call_model, verbose=False)
        modules = dict(model.named_modules())
        ignored = [modules[name] for name in attention]
        raw = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=(_CONV, nn.Linear)))
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = dict.fromkeys(attention, "it feeds attention (heads are not pruned by channel)")
    for raw_group in raw:
        root = names.get(raw_group[0].dep.target.module, "?")
        group, reason = _convert(graph, raw_group, names, producers)
        if group is None:
            skipped[root] = reason
        else:
            groups.append(group)
    return groups, skipped


def _convert(
    graph: Any, raw_group: Any, names: dict[nn.Module, str], producers: set[str] | None
) -> tuple[ChannelGroup | None, str]:
    root_item = raw_group[0]
    root = names[root_item.dep.target.module]
    size = len(root_item.idxs)
    slices: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for item in raw_group.items:
        node = item.dep.target
        module = node.module
        out_like = not graph.is_in_channel_pruning_fn(item.dep.handler) or isinstance(module, _NORM)
        if not isinstance(module, nn.Module) or module not in names:
            if isinstance(module, nn.Parameter):
                return None, "a free nn.Parameter depends on its channels"
            if out_like and not node.outputs:
                return None, "its channels reach the model's output"
            continue  # an operation (add, cat, flatten, activation): no parameters
        name = names[module]
        if not supported(module):
            return None, f"{name} ({type(module).__name__}) mixes or cannot lose channels"
        kind = "out" if out_like else "in"
        if kind == "out" and not node.outputs:
            return None, "its channels reach the model's output"
        if kind == "out" and not isinstance(module, _NORM) and producers is not None and name not in producers:
            return None, f"{name} is not selected (see `include`/`exclude`)"
        index, channel = slices.setdefault((name, kind), ([], []))
        index.extend(int(i) for i in item.idxs)
        channel.extend(int(c) for c in item.root_idxs)
    group = ChannelGroup(root, size)
    for (name, kind), (index, channel) in slices.items():
        order = sorted(range(len(index)), key=index.__getitem__)
        group.slices.append(
            LayerSlice(
                name,
                kind,
                torch.tensor([index[i] for i in order], dtype=torch.long),
                torch.tensor([channel[i] for i in order], dtype=torch.long),
            )
        )
    if not any(s.kind == "in" for s in group.slices):
        return None, "no layer consumes its channels"
    return group, ""
