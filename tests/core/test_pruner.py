"""Pruner regrowth: which weights go and come back, floors, undo and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.importance import MagnitudeImportance, TaylorImportance
from lightning_compress.core.iterative import IterativePruner
from lightning_compress.core.nm import NMRule
from lightning_compress.core.pruner import Pruner
from lightning_compress.core.rules import ElementRule
from lightning_compress.core.selection import select_targets


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(10, 1, bias=False), nn.Linear(10, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 11.0))  # |w| = 1..10
        model[1].weight.copy_(torch.arange(11.0, 21.0))  # |w| = 11..20
    return model


def _grads(model: nn.Sequential, first: list[float], second: list[float]) -> None:
    model[0].weight.grad = torch.tensor([first], dtype=torch.float32)
    model[1].weight.grad = torch.tensor([second], dtype=torch.float32)


def test_masks_and_the_pruners_statistics_follow_their_weights_to_the_device_they_moved_to():
    """Lightning trains on the GPU and moves the model back to the CPU before ``on_fit_end``, where the callback
    zeroes the pruned weights again: on a GPU every fit ended in a device mismatch (session 35, the first run of
    benchmarks/gpu_check.sh). Here the meta device stands in for the other one, reached as ``.to("cuda")`` moves a
    model (the same Parameter objects, new storage)."""
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), TaylorImportance(), "global", 0.0), regrow=0.2)
    pruner.save_rewind_point()
    _grads(model, [1.0] * 10, [2.0] * 10)
    pruner.observe_gradients()
    pruner.prune_to(0.5, keep_undo=True)  # an undo record
    _grads(model, [3.0] * 10, [1.0] * 10)
    pruner.observe_gradients()  # regrowth's and Taylor's sums for the next event
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    assert model[0].weight is pruner.targets[0].param
    pruner.follow_weights()
    undo = [t for pair in (pruner._rollback or {}).values() for t in pair]
    statistics = [*pruner._grads.values(), *pruner.importance._acc.values()]  # type: ignore[attr-defined]
    moved = [*pruner.masks.values(), *(pruner.rewind_point or {}).values(), *undo, *statistics]
    assert len(moved) == 2 + 2 + 2 + 2 + 2 + 2
    assert {t.device.type for t in moved} == {"meta"}


def test_regrowth_swaps_the_weakest_kept_for_the_pruned_with_the_largest_gradients():
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0), regrow=0.2)
    pruner.prune_to(0.5)  # first event: nothing to regrow yet; the 10 smallest go (all of layer 0)
    assert pruner.bool_masks()["0.weight"].sum() == 0
    _grads(model, [0, 0, 0, 9, 0, 0, 0, 0, 0, 0], [0.0] * 10)  # pruned weight 0.weight[3] wants to come back
    pruner.observe_gradients()
    assert pruner.prune_to(0.55)  # 11 pruned; then one of the 9 kept is swapped
    masks = pruner.bool_masks()
    assert bool(masks["0.weight"][0, 3])  # regrown, at zero
    assert model[0].weight[0, 3] == 0
    assert not bool(masks["1.weight"][0, 1])  # the weakest kept (|w| = 12) went instead
    assert pruner.masked_sparsity() == pytest.approx(0.55)


def test_regrowth_respects_min_density_floors():
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.3), regrow=0.5)
    pruner.prune_to(0.3)
    _grads(model, [5.0] * 10, [0.0] * 10)
    pruner.observe_gradients()
    pruner.prune_to(0.35)
    for name, mask in pruner.bool_masks().items():
        assert int(mask.sum()) >= 3, name  # ceil(0.3 * 10)


def test_undo_zeroes_regrown_weights_that_trained_since():
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0), regrow=0.2)
    pruner.prune_to(0.5)
    _grads(model, [0, 0, 0, 9, 0, 0, 0, 0, 0, 0], [0.0] * 10)
    pruner.observe_gradients()
    pruner.prune_to(0.55, keep_undo=True)
    with torch.no_grad():
        model[0].weight[0, 3] = 0.7  # the regrown weight trained
    assert pruner.undo()
    assert model[0].weight[0, 3] == 0
    assert model[1].weight[0, 1] == 12  # and the weight regrowth dropped is back


def test_a_joined_undo_goes_back_before_both_events_with_each_weights_value_when_it_was_pruned():
    model = _model()
    original = model[0].weight.detach().clone()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0))
    pruner.prune_to(0.25, keep_undo=True)  # |w| = 1..5
    with torch.no_grad():
        model[0].weight[0, 5:] += 0.5  # the kept weights train before the second event
    trained = model[0].weight.detach().clone()
    pruner.prune_to(0.5, keep_undo=True, join_undo=True)  # |w| = 6.5..10.5 go too
    assert pruner.masked_sparsity() == pytest.approx(0.5) and not bool(model[0].weight.any())
    assert pruner.undo() and pruner.masked_sparsity() == 0.0
    assert torch.equal(model[0].weight[0, :5], original[0, :5])  # values when the first event pruned them
    assert torch.equal(model[0].weight[0, 5:], trained[0, 5:])  # and when the second did
    pruner.prune_to(0.25, keep_undo=True)
    pruner.prune_to(0.5, keep_undo=True)  # not joined: undo goes back one event
    assert pruner.undo() and pruner.masked_sparsity() == pytest.approx(0.25)


def test_gradient_sums_survive_a_checkpoint():
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0), regrow=0.2)
    pruner.prune_to(0.5)
    _grads(model, [1.0] * 10, [2.0] * 10)
    pruner.observe_gradients()
    state = pruner.state_dict()
    fresh = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0), regrow=0.2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh._grads["1.weight"], pruner._grads["1.weight"])


def test_no_gradient_tracking_without_regrowth():
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0))
    pruner.prune_to(0.5)
    _grads(model, [1.0] * 10, [2.0] * 10)
    pruner.observe_gradients()
    assert not pruner._grads and "grads" not in pruner.state_dict()


@pytest.mark.parametrize(
    ("rule", "regrow", "match"),
    [
        (None, -0.1, r"`regrow` must be in \[0, 1\)"),
        (None, 1.0, r"`regrow` must be in \[0, 1\)"),
        ("nm", 0.1, "`regrow`=0.1 exchanges single weights: it needs the element rule, not NMRule"),
    ],
)
def test_pruner_refuses_bad_regrow(rule: str | None, regrow: float, match: str):
    targets = select_targets(_model())
    mask_rule = ElementRule(targets, MagnitudeImportance(), "global", 0.0)
    if rule == "nm":
        mask_rule = NMRule(targets, MagnitudeImportance(), 2, 4)
    with pytest.raises(ValueError, match=match):
        Pruner(mask_rule, regrow=regrow)


def test_masks_of_another_width_are_refused_naming_every_layer_that_differs():
    """One check for the pruner's own restore and the iterative pruner's state check (they had two copies)."""
    model = _model()
    pruner = Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0))
    pruner.prune_to(0.5)
    state = pruner.state_dict()
    state["masks"] = {n: torch.ones(m.shape[0] + 1, *m.shape[1:]) for n, m in state["masks"].items()}
    shapes = r"\{'0.weight': \(\(2, 10\), \(1, 10\)\), '1.weight': \(\(2, 10\), \(1, 10\)\)\}"
    with pytest.raises(
        ValueError, match=r"masks do not fit this model: \(saved shape, this model's shape\) of " + shapes
    ):
        Pruner(ElementRule(select_targets(model), MagnitudeImportance(), "global", 0.0)).load_state_dict(state)
    iterative = IterativePruner(model, 0.5, total_steps=4, every_n_steps=1)
    iterative.advance_to(2)
    saved = iterative.state_dict()
    saved["pruner"]["masks"] = state["masks"]
    with pytest.raises(
        ValueError, match=r"masks do not fit this model: \(saved shape, this model's shape\) of " + shapes
    ):
        IterativePruner(model, 0.5, total_steps=4, every_n_steps=1).load_state_dict(saved)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp"])
def test_complex_weights_are_ranked_by_their_modulus_and_adams_complex_moments_are_zeroed(importance):
    """Trial GK: FNO's complex spectral weights were ranked by their real part (magnitude, Taylor and LAMP cast them
    to float), and Adam's complex moments were left to regrow them at the next step."""
    from tests.conftest import SpectralConv1d

    torch.manual_seed(0)
    model = nn.Sequential(SpectralConv1d(8, 6))
    weight = model[0].weight
    with torch.no_grad():  # moduli and real parts ranked far apart
        weight.copy_(torch.polar(torch.rand(weight.shape) + 0.01, torch.rand(weight.shape) * 6.28))
    x = torch.randn(16, 8, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    pruner = IterativePruner(
        model, 0.5, total_steps=1, importance=importance, include=["0"], schedule="one_shot", optimizers=optimizer
    )
    optimizer.zero_grad()
    model(x).square().mean().backward()
    scores = (weight.detach() * weight.grad).abs() if importance == "taylor" else weight.detach().abs()
    pruner.before_optimizer_step()
    optimizer.step()
    before_event = weight.detach().clone()
    pruner.step()  # the event: half the weights, by score
    kept = pruner.masks["0.weight"].bool()
    if importance != "taylor":  # ranked on the weights after the step (LAMP keeps the moduli's order)
        scores = before_event.abs()
    assert float(scores[~kept].max()) <= float(scores[kept].min())
    assert bool((weight[~kept] == 0).all())
    optimizer.zero_grad()
    model(x).square().mean().backward()
    pruner.before_optimizer_step()  # pruned weights' gradients zeroed: Adam's moments alone would move them
    optimizer.step()
    assert bool((weight[~kept] == 0).all())
