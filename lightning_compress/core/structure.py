"""Channel groups: which slices of which parameters must be removed together.

Removing output channel ``c`` of a Conv means removing ``c`` from its bias, from the BatchNorm
after it, from the input channels of every layer that consumes it (through activations,
pooling, flatten, residual additions and concatenations), and from every other layer whose
output is added to it. Finding these couplings needs the model's data flow, which we take from
Torch-Pruning's ``DependencyGraph`` (it traces autograd, so any ``forward`` works; see
``docs`` in the README for why we use it rather than our own tracer). We only read the graph:
the groups are turned into plain :class:`ChannelGroup` records (module names and index
tensors), and masking and compaction are ours.

A group is prunable when every module in it is a Linear (``transformers``' Conv1D included), a
Conv (dense or depthwise), a BatchNorm or a GroupNorm, and none of its channels reaches the model's
output (the classifier's outputs are never pruned). Groups with a LayerNorm or a free ``nn.Parameter``
are left alone: removing a channel there is not the same as zeroing it. A GroupNorm normalizes each
of its groups of channels together, so there the unit is one of its groups (:func:`_norm_group_units`):
zeroing a whole group (its inputs, scale and shift) gives zeros, as removing it does.

Attention heads are groups too (:mod:`.heads`): a head's rows of the Q, K and V projections and
its columns of the output projection; with grouped-query attention the unit is a key/value head
with its query group. The projections that feed attention are never roots of a channel group
(removing one row alone breaks the reshape into heads).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Collection
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized

from .adapters import adapter_modules
from .group_search import TracedGroup, search_group
from .groups import (
    ChannelGroup,
    LayerSlice,
    cut_with_channels,
    is_conv1d,
    is_depthwise,
    is_group_norm,
    slice_bound,
    supported,
)
from .heads import AttentionBlock, find_attention
from .layers import foreign_linear_types, is_linear, parametrization_kinds, transformers_conv1d, weight_axes
from .tracing import (
    TracerForward,
    all_tracked,
    comparable_modules,
    forward_state_kept,
    out_of_place,
    plain_float,
)
from .wrappers import eager, modules_by_name

__all__ = ["GROUP_SEARCH_LIMIT", "build_channel_groups"]

_CONV = nn.modules.conv._ConvNd
# a channel group's search may reach this many (layer, indices) states per node of the traced graph, and 1024 more:
# on 20 models (the zoo, and transformers' BERT, GPT-2, Llama, ViT, ResNet, MobileNetV2, ConvNeXt, T5, SegFormer,
# RegNet, EfficientNet, Mixtral, Swin) the largest group reached 2.9 per node (a 12-node CNN), the others under 1;
# a DPT's residual stream reaches more than any bound (its indices shift on every lap of a cycle)
GROUP_SEARCH_LIMIT = 16


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "granularity='channel' and compact() need Torch-Pruning's dependency graph: "
            "pip install 'lightning-compress[structured]' (or pip install torch-pruning)."
        ) from err
    return torch_pruning


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
    modules = modules_by_name(model)
    conv1d = transformers_conv1d()
    foreign = foreign_linear_types()
    roots: tuple[type[nn.Module], ...] = (_CONV, nn.Linear, *foreign, *((conv1d,) if conv1d is not None else ()))
    custom = {type(m): _sizes_pruner(tp, *weight_axes(m)) for m in modules.values() if is_conv1d(m)}
    # a foreign Linear is a layer of the trace only if Torch-Pruning has a handler for it (trial FD: PyG's was read as
    # an unknown operation, and the layer feeding a GCNConv was left whole, blamed on the conv's bias)
    custom.update({kind: _sizes_pruner(tp, 0, 1) for kind in foreign})
    with (
        torch.enable_grad(),
        eager(model),
        plain_float(model),
        all_tracked(model),
        out_of_place(model),
        forward_state_kept(model),
        warnings.catch_warnings(),
    ):
        # Torch-Pruning's shape inference warns once per node it cannot follow (a recurrent layer: thousands)
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
        blocks, feeding, not_heads = find_attention(model, example_inputs)
        raw: list[TracedGroup]
        try:
            with comparable_modules(model):
                graph, unread, called = _dependency_graph(tp, model, example_inputs, custom)
                raw, untraced = _raw_groups(graph, [modules[name] for name in feeding], roots, names)
                untraced.update(
                    (names[m], f"it returns a {kind}, not a tensor or a tuple, which the "
                     "dependency graph's tracer cannot read, so its channels are left whole")
                    for m, kind in unread
                )  # fmt: skip
        except (ArithmeticError, TypeError, IndexError, KeyError, ValueError, RuntimeError, AttributeError) as err:
            # e.g. Longformer: a concatenation whose sizes the tracer cannot read; ShuffleNetV2's channel shuffle, a
            # ZeroDivisionError in Torch-Pruning's reshape mapping after three units (trial EX: it ended the setup).
            # Heads are found without the graph; every other channel is left whole, with the reason
            graph, raw = None, []
            untraced = {
                type(model).__name__: "the channel dependency graph could not be built (Torch-Pruning: "
                f"{type(err).__name__}: {str(err)[:120]}), so no channel outside attention heads can be pruned"
                # trial DX: Longformer's attention has no head this finds either, and the message implied it had
                + (
                    ""
                    if blocks
                    # trial EB: DeepSeek's heads were said left whole, then "no attention with heads" was found
                    else ", and the heads of every attention found are left whole"
                    if not_heads
                    else ", and no attention with heads this reads was found"
                )
            }
    groups: list[ChannelGroup] = []
    skipped = {name: f"its heads are left whole: {why}" for name, why in not_heads.items()}
    skipped.update(untraced)
    tied = _tied(model)
    for block in blocks:
        group, reason = _head_group(block, producers)
        shared = [] if group is None else [s.module for s in group.slices if s.module in tied]
        if shared:  # trial DU: Zamba's layers share one attention's Parameters; compact() gave each its own copy
            group, reason = (
                None,
                f"{shared[0]} shares a parameter with {tied[shared[0]]} (tied weights): cutting one would untie them",
            )
        if group is None:
            skipped[block.module] = reason
            for projection in (block.query, block.key, block.value):
                skipped.setdefault(projection, f"the heads of {block.module} are left whole")
        else:
            groups.append(group)
    parameters = {id(p): name for name, p in model.named_parameters()}
    adapters = adapter_modules(model)
    followers = {name for module, name in names.items() if id(module) in adapters}
    for raw_group in raw:
        root = names.get(raw_group.items[0].dep.target.module, "?")
        group, reason = _convert(graph, raw_group, names, producers, tied, parameters, followers)
        if group is None:
            skipped[root] = reason
            width = _outputs(modules.get(root))
            for other in _out_modules(graph, raw_group, names) - {root}:  # layers whose outputs are these channels
                if _outputs(modules[other]) == width:
                    skipped.setdefault(other, f"its channels are {root}'s: {reason}")
                else:  # trial AZ: an MLP-Mixer's token projection was said to have the embedding's channels
                    skipped.setdefault(
                        other,
                        f"the dependency graph joins its {_outputs(modules[other])} outputs to {root}'s {width} "
                        "channels through an operation that moves axes or splits them (a transpose or reshape, as an "
                        "MLP-Mixer's token mixing; a `chunk` of the wider output, as a diffusers UNet's time "
                        "embedding split into scale and shift), so its outputs have no channel group",
                    )
        else:
            groups.append(group)
    if graph is not None:
        _say_what_is_unseen(graph, names, groups, skipped, roots, producers, set(feeding), called)
    cut = {s.module for g in groups for s in g.slices if s.kind == "out"}
    for name, why in not_heads.items():  # trial EA: Timesformer's temporal output layer, said left whole, was cut
        if name in cut and skipped.get(name) == f"its heads are left whole: {why}":
            skipped[name] = f"its input heads are left whole (its output channels are in a group of their own): {why}"
    return groups, skipped


def _outputs(module: nn.Module | None) -> int | None:
    """A Linear's or convolution's output channels (``None`` for anything else)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if module is not None and is_linear(module):
        return int(cast(Tensor, module.weight).shape[0])
    return module.out_channels if isinstance(module, _CONV) else None


def _out_modules(graph: Any, raw_group: TracedGroup, names: dict[nn.Module, str]) -> set[str]:
    """The layers whose outputs a raw group's channels are."""
    return {
        names[item.dep.target.module]
        for item in raw_group.items
        if item.dep.target.module in names
        and (isinstance(item.dep.target.module, _CONV) or is_linear(item.dep.target.module))
        and graph.is_out_channel_pruning_fn(item.dep.handler)
    }


def _say_what_is_unseen(
    graph: Any,
    names: dict[nn.Module, str],
    groups: list[ChannelGroup],
    skipped: dict[str, str],
    roots: tuple[type[nn.Module], ...],
    producers: set[str] | None,
    attention: set[str],
    called: set[int],
) -> None:
    """A reason for every layer that could be a group's and is in none, nor already explained (``attention``: the
    projections that feed attention, whose heads have their own reasons; ``called``: the ids of the layers the
    traced forward called)."""
    modules = {name: module for module, name in names.items()}
    covered = {s.module for g in groups for s in g.slices if s.kind == "out" or is_depthwise(modules[s.module])}
    covered |= {g.name for g in groups}  # a depthwise conv loses its outputs with its inputs, from an "in" slice
    traced = {names[m] for m in graph.module2node if m in names}
    for module, name in names.items():
        if name in covered or name in skipped or (producers is not None and name not in producers):
            continue
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            skipped[name] = "channels of recurrent layers and of nn.MultiheadAttention's own matrices are not pruned"
            continue
        if not isinstance(module, roots):
            continue
        if name in attention:
            skipped[name] = (
                "its outputs go into a product with another activation (as attention's projections do), which no "
                "channel group follows"
            )
        elif name not in traced and id(module) in called:
            skipped[name] = (  # trial FK: fair-esm's attention scales its queries with `q *= scaling`
                "the forward calls it, but the traced graph does not hold its output: its output does not reach the "
                "forward's outputs (a head only the training code uses), an operation changed it in place before "
                "it was used (`q *= scaling`, `x += y`), or it runs where autograd records nothing (inside a custom "
                "`torch.autograd.Function`, as reversible layers do, or under `torch.no_grad`), which the tracer "
                "cannot follow; so nothing says where its channels go"
            )
        elif name not in traced:
            skipped[name] = (  # trial BX: a decoder head only `training_step` used was said to be called otherwise
                "the traced forward never calls it as a module (its weight used through F.linear, F.conv2d, "
                "einsum, ...), or its output does not reach the forward's outputs (a head only the training code "
                "uses), so nothing says where its channels go"
            )
        else:
            skipped[name] = "the dependency graph gives its outputs no channel group (see the other reasons)"


def _tied(model: nn.Module) -> dict[str, str]:
    """Modules holding a parameter another module holds too (tied weights), each with one such other module."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    return {n: next(o for o in names if o != n) for names in holders.values() if len(names) > 1 for n in names}


def _dependency_graph(
    tp: Any, model: nn.Module, example_inputs: Any, custom: dict[type, Any]
) -> tuple[Any, list[tuple[nn.Module, str]], set[int]]:
    """Torch-Pruning's graph of ``model``; the hooks it registers are removed whatever the forward raises
    (:class:`TracerForward`: a layer's plain tuple, such as Llama4's router's, is handed to the tracer as a tuple with a
    shape). A layer that returns another kind of object (a dict, a named tuple), which the tracer's hook cannot read,
    is left out of the trace and the forward traced again: its weights are no channel root (trial EW: the whole trace
    failed, and no channel of the model could be pruned). Returns the graph, each layer left out with what it
    returned, and the ids of the layers the forward called."""
    ignored: list[tuple[nn.Module, str]] = []
    # a PReLU with one slope for every channel acts on each element alone: traced as an operation, not a layer
    # (trial FC: Torch-Pruning's handler has no channel count for it, so its layer groups were refused, and a
    # concatenation after it failed the whole trace of MONAI's UNet, whose default activation it is)
    shared = [m for m in model.modules() if isinstance(m, nn.PReLU) and m.num_parameters == 1]
    while True:
        forward = TracerForward()
        graph = tp.DependencyGraph()
        try:
            graph.build_dependency(
                model,
                example_inputs,
                forward_fn=forward,
                verbose=False,
                customized_pruners=custom or None,
                ignored_layers=[*shared, *(m for m, _ in ignored)] or None,
            )
        except Exception as err:
            if forward.failure is None and not _index_mapping_rebuilt(tp, graph, err, forward.concat_sizes):
                raise  # the tracer's own failure (after a forward that ran)
        left_out = {id(m) for m, _ in ignored}
        unread = [(m, kind) for m, kind in forward.non_tensor_layers if id(m) not in left_out]
        if forward.failure is None or not unread:
            forward.reraise()
            return graph, ignored, forward.called
        ignored.extend(unread)


_INDEX_MAPPINGS = (  # Torch-Pruning's index mapping of each operation kind, as its update_index_mapping dispatches
    ("CONCAT", "update_concat_index_mapping"),
    ("SPLIT", "update_split_index_mapping"),
    ("RESHAPE", "update_reshape_index_mapping"),
    ("UNBIND", "update_unbind_index_mapping"),
    ("EXPAND", "update_expand_index_mapping"),
    ("SLICE", "update_slice_index_mapping"),
)


def _unmap_ambiguous_splits(tp: Any, graph: Any) -> None:
    """Leave unmapped each split whose pieces feed more (or fewer) operations than it has pieces, or whose sizes
    Torch-Pruning could not infer: it reads the consumers in order as the pieces, so their offsets and sizes are
    another piece's, or past the last (trial FH: litgpt's OLMo-2, whose q/k/v pieces each feed several operations:
    its index mapping, then every group search, raised an IndexError, and no channel could be pruned). Its sizes are
    forgotten and the index mappings it gave are taken back; the groups through it are checked by value like every
    other. Called where the index mapping failed only: a model it did not fail on keeps Torch-Pruning's groups (a
    litgpt LoRA model's splits, unmapped, made every group search run to its bound)."""
    for node in list(getattr(graph, "module2node", {}).values()):
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        pieces, offsets = getattr(node.module, "split_sizes", None), getattr(node.module, "offsets", None)
        if pieces is None and offsets is None:  # unmapped already
            continue
        n = len(node.outputs)
        if (
            pieces is not None
            and len(pieces) == n
            and None not in pieces
            and offsets is not None
            and len(offsets) == n + 1
        ):
            continue
        node.module.split_sizes = node.module.offsets = None
        for dep in node.dependencies:
            if dep.target in node.outputs:
                dep.index_mapping[0] = None
        for out in node.outputs:
            for dep in out.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = None


def _index_mapping_rebuilt(tp: Any, graph: Any, err: Exception, sizes: dict[Any, list[int]]) -> bool:
    """Whether the graph's index mappings were built again, once Torch-Pruning failed to build them (its last step):
    first with every concatenation's input widths measured in the forward (trial FC: MONAI's UNet, whose upsampling
    branch's width Torch-Pruning's shape inference reads as ``None``, then sums; the whole trace failed and no
    channel of the model could be pruned); where it fails still, operation by operation, leaving unmapped the ones
    it fails on. A split whose pieces feed more operations than it has pieces is left unmapped too (trial FH:
    litgpt's OLMo-2 and LoRA models, whose q/k/v pieces each feed several: Torch-Pruning reads its consumers as its
    pieces and indexed past its sizes, in the mapping and again in every group search). The groups found are
    checked by value like every other: an operation left unmapped, or a concatenation with an input the tracer does
    not see (one with no gradient history, as the model's own input: its widths do not add up to the output's, and
    nothing is mapped through it), moves channels the value trials then refuse."""
    if all(frame.f_code.co_name != "update_index_mapping" for frame, _ in traceback.walk_tb(err.__traceback__)):
        return False
    for node in list(getattr(graph, "module2node", {}).values()):
        measured = sizes.get(getattr(node, "grad_fn", None))
        if node.type == tp.ops.OPTYPE.CONCAT and measured is not None and len(measured) == len(node.inputs):
            node.module.concat_sizes = measured
    _unmap_ambiguous_splits(tp, graph)
    mapping = tp.dependency.index_mapping
    try:
        mapping.update_index_mapping(graph)
        return True
    except Exception:
        pass
    updates = [
        (kind, update)
        for name, function in _INDEX_MAPPINGS
        if (kind := getattr(tp.ops.OPTYPE, name, None)) is not None
        and callable(update := getattr(mapping, function, None))
    ]
    for node in list(graph.module2node.values()):
        for kind, update in updates:
            if node.type == kind:
                try:
                    update(graph, node)
                except Exception:  # left unmapped: the value trials refuse the groups it moves
                    continue
    return True


def _raw_groups(
    graph: Any, ignored: list[nn.Module], roots: tuple[type[nn.Module], ...], names: dict[nn.Module, str]
) -> tuple[list[TracedGroup], dict[str, str]]:
    """The graph's groups, one root layer at a time (Torch-Pruning's ``get_all_groups`` stops at the first layer whose
    channels it cannot map, e.g. inside Mamba's mixer: that layer is left whole instead, with the reason)."""
    ignored = [*ignored, *graph.IGNORED_LAYERS_IN_TRACING]
    limit = GROUP_SEARCH_LIMIT * len(graph.module2node) + 1024
    visited: set[int] = set()
    groups, failed = [], {}
    for module in list(graph.module2node):
        if module in ignored or not isinstance(module, roots) or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = None if pruner is None else pruner.get_out_channels(module)
        if channels is None:
            continue
        try:
            group = search_group(graph, module, pruner.prune_out_channels, channels, limit)
        except (ArithmeticError, IndexError, KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            # trial EW: SAM's mask decoder, a ZeroDivisionError in an index mapping of the tracer, ended the setup
            failed[names.get(module, "?")] = (
                f"its channels cannot be traced through the model (Torch-Pruning's index mapping: {type(err).__name__}"
                + (f": {str(err)[:100]})" if str(err) else ")")
            )
            continue
        if group is None:
            failed[names.get(module, "?")] = (
                f"the search for the layers its channels reach did not end within {limit:,} steps: the channel "
                "indices multiply or shift as the tracer follows them (on every lap of a cycle, as a token "
                "concatenated along the dimension the tracer reads as channels; through reshapes, as UnivNet's "
                "predicted kernels; through a split whose slices meet other channels, as FocalNet's gates)"
            )
            continue
        outputs = [item.dep.target.module for item in group.items if graph.is_out_channel_pruning_fn(item.dep.handler)]
        visited.update(id(m) for m in outputs)
        if not any(m in ignored for m in outputs):
            groups.append(group)
    return groups, failed


def _sizes_pruner(tp: Any, out_axis: int, in_axis: int) -> Any:
    """A Torch-Pruning layer handler for a layer it does not know (``transformers``' Conv1D, whose weight is ``(in,
    out)``; PyTorch Geometric's Linear): only its sizes are read (we never let Torch-Pruning cut a model)."""

    class LayerSizes(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            raise NotImplementedError("lightning-compress reads Torch-Pruning's graph only")

        # a distinct method: a layer's inputs and outputs are not coupled
        def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            raise NotImplementedError("lightning-compress reads Torch-Pruning's graph only")

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(layer.weight.shape[out_axis])  # type: ignore[index]

        def get_in_channels(self, layer: nn.Module) -> int:
            return int(layer.weight.shape[in_axis])  # type: ignore[index]

    return LayerSizes()


def _head_group(block: AttentionBlock, producers: set[str] | None) -> tuple[ChannelGroup | None, str]:
    """The channel group of ``block``'s removable units (key/value heads with their query groups)."""
    projections = {block.query, block.key, block.value}
    if producers is not None and not projections <= producers:
        return None, f"its projections {sorted(projections - producers)} are not selected (see `include`/`exclude`)"
    if block.kv_heads < 2:
        return None, "it has one key/value head"
    group = ChannelGroup(block.module, block.kv_heads, attention=block)
    group.slices = _sorted_slices(sorted(block.unit_positions().items()))
    return group, ""


def _sorted_slices(parts: Any) -> list[LayerSlice]:
    """``LayerSlice`` records from ``((module, kind), (positions, channels))`` pairs, by position."""
    slices = []
    for (name, kind), (index, channel) in parts:
        order = sorted(range(len(index)), key=index.__getitem__)
        positions = torch.tensor([index[i] for i in order], dtype=torch.long)
        slices.append(LayerSlice(name, kind, positions, torch.tensor([channel[i] for i in order], dtype=torch.long)))
    return slices


def _unsupported_reason(name: str, module: nn.Module) -> str:
    """Why a layer in a group stops it (:func:`supported` said no)."""
    kind = type(module).__name__
    groups = getattr(module, "groups", 1)
    if isinstance(module, (_CONV, nn.modules.conv._ConvTransposeNd)) and groups > 1:
        return (
            f"{name} is a grouped convolution ({kind}, groups={groups}): a channel cannot leave one of its groups "
            "without the others' sizes changing (depthwise convolutions, one channel per group, are pruned)"
        )
    if isinstance(module, nn.GroupNorm):  # affine=False: nothing in a compacted file would say its new size
        return f"{name} (GroupNorm without a scale and shift, affine=False) has no weight to read its size from"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return f"{name} ({kind}) normalizes over several channels: removing one is not the same as zeroing it"
    return f"{name} ({kind}) mixes its channels or cannot lose one (not a Linear, Conv or per-channel norm)"


def _unplaced_concat(op: Any, node: Any) -> bool:
    """A concatenation (or split) whose channel offsets Torch-Pruning left unknown: one of its tensors comes from
    no traced layer (a model input, a constant), so the indices it gives the consumers are not where the
    channels are (they would mask, e.g., the input image's channels of the next convolution). One along the first
    dimension, the batch's, is not: every piece holds all the channels, and they pass through it as they are (trial
    FN: TabNet's ghost batch norm, `torch.cat([bn(c) for c in x.chunk(k, 0)])`, had every group refused so)."""
    tp = _torch_pruning()
    kinds = tuple(k for k in (getattr(tp.ops, "_ConcatOp", None), getattr(tp.ops, "_SplitOp", None)) if k is not None)
    along_batch = getattr(getattr(node, "grad_fn", None), "_saved_dim", None) == 0
    return isinstance(op, kinds) and getattr(op, "offsets", None) is None and not along_batch


def _convert(
    graph: Any,
    raw_group: TracedGroup,
    names: dict[nn.Module, str],
    producers: set[str] | None,
    tied: dict[str, str],
    parameters: dict[int, str],
    followers: Collection[str] = (),
) -> tuple[ChannelGroup | None, str]:
    """The group of a traced one, or why it is left whole. ``followers``: modules (``peft``'s adapters) whose outputs
    are cut with a selected layer's channels they add to, but never make a group of their own (an adapter's rank)."""
    root_item = raw_group.items[0]
    selected_out = producers is None
    root = names[root_item.dep.target.module]
    size = len(root_item.idxs)
    slices: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    output = getattr(getattr(_torch_pruning().ops, "OPTYPE", None), "OUTPUT", None)
    reaches_output = False  # trial FJ: MONAI's UNet ends in `conv(x) + x`; that 1-channel group was kept, never cut,
    for item in raw_group.items:  # and named at its floor when a fit ended short of the target
        node = item.dep.target
        module = node.module
        if output is not None and node.type == output:
            reaches_output = True
            continue
        out_like = not graph.is_in_channel_pruning_fn(item.dep.handler) or cut_with_channels(module)
        if not isinstance(module, nn.Module) or module not in names:
            if isinstance(module, nn.Parameter):
                owner = parameters.get(id(module), "a free nn.Parameter")
                return (
                    None,
                    f"{owner} (a parameter outside Linear/Conv/BatchNorm: a norm's weight, a layer scale, a bias "
                    "added after the layer, as PyTorch Geometric's GCNConv's, or a GAT's attention vectors) "
                    "depends on its channels",
                )
            if _unplaced_concat(module, node):
                return None, (
                    "its channels go through a concatenation whose offsets the dependency graph does not know (a "
                    "model input, or a flattened or reshaped tensor, among its inputs, or a join along tokens or "
                    "positions rather than channels)"
                )
            if out_like and not node.outputs:
                return None, "its channels reach the model's output"
            continue  # an operation (add, cat, flatten, activation): no parameters
        name = names[module]
        if not supported(module):
            return None, _unsupported_reason(name, module)
        if is_parametrized(module):
            kinds = parametrization_kinds(module)
            return None, f"{name}'s weight is computed by a parametrization ({kinds}), not stored"
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and not isinstance(weight, nn.Parameter):  # trial CB: "not selected"
            return None, (
                f"{name}'s weight is computed before each forward (torch.nn.utils.weight_norm or spectral_norm), not "
                "stored"
            )
        if name in tied:
            return None, f"{name} shares a parameter with {tied[name]} (tied weights): cutting one would untie them"
        kind = "out" if out_like else "in"
        if kind == "out" and not node.outputs:
            return None, "its channels reach the model's output"
        if kind == "out" and not cut_with_channels(module) and producers is not None:
            if name in producers:
                selected_out = True
            elif name not in followers:
                return None, f"{name} is not selected (see `include`/`exclude`)"
        roots = [c for c in item.root_idxs if c is not None]
        if len(roots) != len(item.root_idxs):
            return None, (
                f"its channels cannot be mapped onto {name}'s: an operation on the way (a repeat, reshape, split or "
                f"chunk) loses which of its channels each of {name}'s comes from"
            )
        bound = slice_bound(module, kind)
        if any(not 0 <= int(i) < bound for i in item.idxs):  # e.g. read through a pixel shuffle
            return None, (
                f"its channels cannot be mapped onto {name}'s: the indices reaching it run past its {bound} "
                f"{kind}put channels (a reshape, pixel shuffle, split or chunk the tracer reads along another "
                "dimension)"
            )
        index, channel = slices.setdefault((name, kind), ([], []))
        index.extend(int(i) for i in item.idxs)
        channel.extend(roots)
    if not selected_out:  # trial EM: a LoRA adapter's rank, pruned when the adapters were named
        return None, f"its channels are an adapter's rank ({root}), which is not pruned"
    group = ChannelGroup(root, size, _sorted_slices(slices.items()))
    if not any(s.kind == "in" for s in group.slices):
        return None, (
            "no traced layer consumes its channels: they reach the model's output through operations that are not "
            "layers (an activation, pooling, or a weight used directly through F.linear, matmul or einsum)"
        )
    if reaches_output:
        return None, "its channels reach the model's output"
    members = {s.module for s in group.slices}
    norms = {
        name: module
        for module, name in names.items()
        if name in members and isinstance(module, nn.GroupNorm) and is_group_norm(module)
    }
    return _norm_group_units(group, norms) if norms else (group, "")


def _norm_group_units(group: ChannelGroup, norms: dict[str, nn.GroupNorm]) -> tuple[ChannelGroup | None, str]:
    """``group`` with a GroupNorm's groups as its units: the channels that share a group of any of ``norms`` (the
    GroupNorms in it, by name) are kept or removed together (a connected component), and every unit has as many of
    the root's channels. ``None`` and the reason where a GroupNorm's group holds channels from outside ``group`` (a
    concatenation that splits it): removing part of it would change how the rest is normalized."""
    parent = list(range(group.size))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for s in group.slices:
        norm = norms.get(s.module)
        if norm is None:
            continue
        width = norm.num_channels // norm.num_groups
        which = s.index // width
        for g in torch.unique(which).tolist():
            members = s.channel[which == g].tolist()
            if len(set(s.index[which == g].tolist())) != width:
                return None, (
                    f"{s.module} (GroupNorm, {norm.num_groups} groups of {width} channels) normalizes these channels "
                    "together with others (a concatenation splits one of its groups): removing some of a group would "
                    "change how the rest is normalized"
                )
            for c in members[1:]:
                parent[find(c)] = find(members[0])
    roots = [find(c) for c in range(group.size)]
    unit_of = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    unit = torch.tensor([unit_of[r] for r in roots], dtype=torch.long)
    sizes = torch.bincount(unit)
    if bool((sizes != sizes[0]).any()):
        return None, (
            f"{sorted(norms)} (GroupNorm) group its channels in units of different sizes "
            f"({sorted(set(sizes.tolist()))} channels: a norm reads only some of them), which are not pruned"
        )
    if len(unit_of) == 1:  # trial FE: GroupNorm(1, C) made channel pruning a no-op, unsaid
        return None, (
            f"{sorted(norms)} (GroupNorm) normalize all {group.size} of its channels as one group (num_groups=1, or "
            "groups of different sizes that join into one unit): none can leave without the others"
        )
    slices = [LayerSlice(s.module, s.kind, s.index, unit[s.channel]) for s in group.slices]
    return ChannelGroup(group.name, len(unit_of), slices, unit_channels=int(sizes[0])), ""
