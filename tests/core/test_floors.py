"""The ``min_density`` floor: which layers it holds, said once with advice, then logged."""

from __future__ import annotations

from torch import nn

from lightning_compress.core.floors import FloorNotes, floored_layers
from lightning_compress.core.selection import select_targets


def test_floored_layers_are_those_pruned_down_to_the_floor():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))  # 100 and 20 weights
    targets = select_targets(model)
    # a 10% floor keeps 10 of 100 and 2 of 20
    assert floored_layers(targets, {"0.weight": 90, "1.weight": 17}, 0.1) == ["0"]
    assert floored_layers(targets, {"0.weight": 89, "1.weight": 18}, 0.1) == ["1"]
    assert floored_layers(targets, {}, 0.1) == []  # nothing pruned: nothing held


def test_floor_notes_warn_once_then_log_new_layers_only():
    warned: list[str] = []
    logged: list[str] = []
    notes = FloorNotes(0.05, warned.append, logged.append)
    notes.note(["fc1"], now=0.8, wanted=0.85, short=True)
    assert len(warned) == 1 and "['fc1'] are held at the `min_density`=0.05 floor" in warned[0]
    assert "reaches 0.8000 instead of 0.8500" in warned[0] and "`exclude`" in warned[0]
    notes.note(["fc1"], now=0.9, wanted=0.9, short=False)  # nothing new: silent
    notes.note(["fc1", "head"], now=0.9, wanted=0.9, short=False)
    assert len(warned) == 1 and logged == [
        "IterativePruning: layer(s) ['head'] are held at the `min_density`=0.05 floor too."
    ]
