"""One channel group read from Torch-Pruning's dependency graph, by a search with a bound on its size.

Starting from a root layer's output channels, the search follows the graph's dependencies (a layer's outputs to the
layers that consume them, a residual addition to the other layers added there, ...), mapping channel indices through
the concatenations, splits and reshapes on the way, and stops where a layer is reached again with indices it already
holds. This is the search of Torch-Pruning's ``DependencyGraph.get_pruning_group``, over the same graph and with the
same index mappings, with two differences:

* **a bound.** Where a mapping shifts indices around a cycle of the graph, every lap reaches the same layers with new
  indices. A ``transformers`` DPT does this (its readout token is concatenated along the dimension the tracer reads as
  channels): Torch-Pruning's search ran for minutes on a 118k-parameter model and did not end. Here a group that grows
  past ``limit`` entries, or past ``GROUP_SEARCH_INDICES * limit * channels`` (at most ``GROUP_SEARCH_MAX_INDICES``)
  indices mapped in all (reshapes can multiply them: UnivNet's kernel predictor), is given up, and its root is left
  whole with the reason.
* **a set of states.** A layer reached twice with the same indices (by the same handler) is expanded once, and the
  check is a set lookup, not a scan of the group so far.

The entries are then merged per layer and handler (their indices joined, the first root index of each kept), and
parameters the graph ignores are dropped, as Torch-Pruning does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

__all__ = ["GROUP_SEARCH_INDICES", "GROUP_SEARCH_MAX_INDICES", "GroupItem", "TracedGroup", "search_group"]

GROUP_SEARCH_INDICES = 4  # channel indices a search may map, per state of its bound and channel of its root
GROUP_SEARCH_MAX_INDICES = 8_000_000  # and in all (a few seconds of Torch-Pruning's index mappings)


class _Index(NamedTuple):
    """A channel index in the layer reached, and the root channel it comes from (the fields Torch-Pruning's index
    mappings read and write)."""

    idx: int
    root_idx: int | None


@dataclass(frozen=True)
class GroupItem:
    """One layer's part of a group: the dependency that reaches it (``dep.target`` is the graph node, ``dep.handler``
    says whether inputs or outputs are cut), its indices, and the root channel each index comes from (``None`` where
    a mapping lost it)."""

    dep: Any
    idxs: list[int]
    root_idxs: list[int | None]


@dataclass(frozen=True)
class TracedGroup:
    """The layers and indices coupled to a root layer's output channels; ``items[0]`` is the root's."""

    items: list[GroupItem]


def search_group(
    graph: Any, module: nn.Module, pruning_fn: Callable[..., Any], channels: int, limit: int
) -> TracedGroup | None:
    """The group of ``module``'s ``channels`` output channels in Torch-Pruning's ``graph``, or ``None`` when the
    search reaches more than ``limit`` (layer, handler, indices) states.

    ``pruning_fn`` is the handler that cuts ``module``'s outputs (its pruner's ``prune_out_channels``).
    """
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.index_mapping import update_index_mapping
    from torch_pruning.pruner import function

    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1:
        pruning_fn = function.prune_depthwise_conv_out_channels  # a depthwise conv: its inputs go with its outputs
    update_index_mapping(graph)  # concatenation and split offsets, read from the traced shapes
    root = graph.module2node[module]
    first = [_Index(i, i) for i in range(channels)]
    found: list[tuple[Any, Sequence[Any]]] = [(Dependency(pruning_fn, pruning_fn, source=root, target=root), first)]
    seen = {_state(root, pruning_fn, first)}
    stack = list(found)
    # the work, not only the states: through reshapes the indices of one state can multiply (trial FT: UnivNet's
    # kernel predictor, 9.4M indices a state by the 250th, ran for minutes within the bound on states)
    budget, held = min(GROUP_SEARCH_INDICES * limit * max(channels, 1), GROUP_SEARCH_MAX_INDICES), 0
    while stack:
        dep, idxs = stack.pop()
        for new in dep.target.dependencies:
            if not new.is_triggered_by(dep.handler):
                continue
            mapped = idxs
            for mapping in new.index_mapping:
                if mapping is not None:
                    if held + len(mapped) * _expansion(mapping) > budget:  # before the mapping, which may expand
                        return None
                    mapped = mapping(mapped)
                    held += len(mapped)  # indices made: the work of the search, whatever becomes of them
            if len(mapped) == 0:
                continue
            state = _state(new.target, new.handler, mapped)
            if state in seen:
                continue
            if len(found) >= limit:
                return None
            seen.add(state)
            found.append((new, mapped))
            stack.append((new, mapped))
    return _merged(graph, found)


def _expansion(mapping: Any) -> int:
    """How many indices a mapping makes of each it is given: a flatten's stride (Torch-Pruning's
    ``_FlattenIndexMapping``, forward: every channel becomes its positions), else one."""
    stride = getattr(mapping, "_stride", 1)
    return 1 if getattr(mapping, "reverse", True) or not isinstance(stride, int) else max(1, stride)


def _state(node: Any, handler: Any, idxs: Sequence[Any]) -> tuple[Any, ...]:
    return (node, handler, tuple((i.idx, i.root_idx) for i in idxs))


def _merged(graph: Any, found: list[tuple[Any, Sequence[Any]]]) -> TracedGroup:
    """One item per (layer, handler), in the order first reached, with the indices of every visit joined."""
    ignored = {id(p) for p in graph.ignored_params}
    merged: dict[tuple[Any, Any], tuple[Any, dict[int, int | None]]] = {}
    for dep, idxs in found:
        if isinstance(dep.target.module, nn.Parameter) and id(dep.target.module) in ignored:
            continue
        _, roots = merged.setdefault((dep.target, dep.handler), (dep, {}))
        for index in idxs:
            roots.setdefault(int(index.idx), index.root_idx)
    return TracedGroup(
        [GroupItem(dep, list(roots), list(roots.values())) for dep, roots in merged.values()]  # dicts keep order
    )
