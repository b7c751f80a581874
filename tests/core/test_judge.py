"""``EventJudge`` on its own: which events it admits, and its state entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.judge import EventJudge


def _judge() -> EventJudge:
    torch.manual_seed(0)
    return EventJudge(nn.Linear(4, 3), max_drop=0.01, mode="max", warn=lambda message: None)


def test_admit_waits_or_raises_without_a_baseline():
    judge = _judge()
    assert not judge.admit(5, None, wait_for_baseline=True, first_event=5)
    with pytest.raises(ValueError, match=r"no value before the first pruning event: .* before step 5"):
        judge.admit(5, None, wait_for_baseline=False, first_event=5)


def test_admit_after_a_baseline_and_not_past_the_last_judged_step():
    judge = _judge()
    judge.guard.observe(0.9)  # the baseline
    assert judge.admit(5, judged_until=10, wait_for_baseline=False, first_event=5)
    assert not judge.admit(11, judged_until=10, wait_for_baseline=False, first_event=5)  # nothing would judge it
    assert judge.waited_for_quantization == 0


def test_empty_entries_are_the_keys_a_judge_saves():
    judge = _judge()
    judge.guard.observe(0.9)
    saved = judge.state_entries()
    empty = EventJudge.empty_entries()
    assert set(empty) == set(saved)
    assert empty["decisions"] == [] and empty["guard"] is None and empty["join_next"] is False
    assert EventJudge.empty_entries() is not EventJudge.empty_entries()  # no shared mutable default
