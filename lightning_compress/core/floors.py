"""The ``min_density`` floor of global element-wise pruning: which layers it holds now, and saying so once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .masks import floor_count
from .selection import Target

__all__ = ["FloorNotes", "floored_layers"]


def floored_layers(targets: Sequence[Target], pruned: Mapping[str, int], min_density: float) -> list[str]:
    """The layers (``Target.key``: a layer, or a module's own matrix such as ``attn.in_proj_weight``) whose
    pruned count (``pruned``, by parameter name) leaves them at the ``min_density`` floor."""
    return [
        target.key
        for target in targets
        if target.param_name in pruned
        and target.numel - pruned[target.param_name] <= floor_count(min_density, target.numel)
    ]


class FloorNotes:
    """Says once which layers the floor holds back, and what to do about it; layers it holds at later events are
    logged (trial EC: one warning per event, six on a FocalNet)."""

    def __init__(self, min_density: float | None, warn: Callable[[str], None], info: Callable[[str], None]) -> None:
        self.min_density = min_density
        self._warn = warn
        self._info = info
        self.said: set[str] = set()

    def note(self, held: Sequence[str], now: float, wanted: float, short: bool) -> None:
        """After an event: ``held`` layers at the floor, the sparsity ``now`` reached of the ``wanted`` one,
        ``short`` when the floors held the event back."""
        new = [name for name in held if name not in self.said]
        if not new:
            return
        first = not self.said
        self.said.update(new)
        reached = f"{now:.4f} instead of {wanted:.4f}"
        if not first:
            self._info(
                f"IterativePruning: layer(s) {new} are held at the `min_density`={self.min_density} floor too"
                + (f" (the model reaches {reached})." if short else ".")
            )
            return
        self._warn(
            f"IterativePruning: layer(s) {new} are held at the `min_density`={self.min_density} floor: one "
            "global threshold would prune them further."
            + (f" The model reaches {reached}." if short else "")
            + " Raise `min_density` to keep more of every layer, lower it to let the one threshold decide, or "
            "`exclude` the layer(s) to keep them dense. Layers it holds later are logged; `held_at_floor` lists them."
        )
