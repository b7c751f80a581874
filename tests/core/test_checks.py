"""Bad arguments to the Lightning-free API: a TypeError/ValueError that names the argument, and the model as it was
(found by a fuzzing trial of every public name; each case here was accepted, or failed deep in torch, before)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from lightning_compress import (
    IterativePruner,
    PruningSchedule,
    QuantConfig,
    RandomImportance,
    calibrate,
    compact,
    convert_to_float,
    convert_to_qat,
    enable_fake_quant,
    prune_,
    sparsity,
)
from lightning_compress.core.controller import AccuracyGuard


def mlp(hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def quantized() -> nn.Sequential:
    model = mlp()
    convert_to_qat(model, QuantConfig())
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: prune_(m, 0.5),
        lambda m: sparsity(m),
        lambda m: convert_to_qat(m, QuantConfig()),
        lambda m: convert_to_float(m),
        lambda m: calibrate(m, [torch.zeros(1, 8)]),
        lambda m: enable_fake_quant(m),
    ],
)
def test_a_model_that_is_not_a_module_is_a_type_error(call):
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got NoneType"):
        call(None)


def test_prune_masks_are_checked_against_the_selected_weights():
    model = mlp()
    before = state(model)
    with pytest.raises(TypeError, match="`masks` must be a dict"):
        prune_(model, 0.5, masks=[1])
    with pytest.raises(ValueError, match=r"`masks` has 'O.weight', which is not a selected weight"):
        prune_(model, 0.5, masks={"O.weight": torch.ones(16, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"`masks`\['0.weight'\] has shape \(3,\); the weight has \(16, 8\)"):
        prune_(model, 0.5, masks={"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"`masks`\['0.weight'\] must be a tensor, got int"):
        prune_(model, 0.5, masks={"0.weight": 1})
    assert same(before, state(model))
    kept = prune_(model, 0.5)  # the masks it returns are accepted back
    assert prune_(model, 0.5, masks=kept).keys() == kept.keys()


def test_layers_pruned_by_torch_prune_are_left_out_with_a_warning():
    model = mlp()
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.warns(UserWarning, match=r"leaves \['0'\] out: torch.nn.utils.prune computes their weight"):
        masks = prune_(model, 0.9)
    assert list(masks) == ["2.weight"]
    torch_prune.l1_unstructured(model[2], "weight", 0.5)
    with pytest.raises(ValueError, match=r"pruned by torch.nn.utils.prune: \['0', '2'\]"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_(model, 0.9)


def test_a_meta_model_is_refused_before_anything_runs():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="`model` has tensors on the meta device"):
        prune_(model, 0.5)
    with pytest.raises(ValueError, match="`model` has tensors on the meta device"):
        IterativePruner(model, 0.5, total_steps=4)


def test_calibrate_refuses_a_bare_tensor_and_non_iterables():
    with pytest.raises(TypeError, match=r"`batches` must be an iterable of batches .*pass `\[tensor\]`"):
        calibrate(quantized(), torch.randn(4, 8))
    for bad in (None, 3, "abc"):
        with pytest.raises(TypeError, match="`batches` must be an iterable of batches"):
            calibrate(quantized(), bad)


def test_calibrate_on_nan_data_is_refused_and_leaves_the_ranges_as_they_were():
    model = quantized()
    calibrate(model, [torch.randn(4, 8)])
    before = state(model)
    with pytest.raises(ValueError, match=r"`batches` gave NaN or infinite values to the quantizers \['0.input"):
        calibrate(model, [torch.randn(4, 8), torch.full((2, 8), math.nan)])
    assert same(before, state(model))
    assert calibrate(model, [torch.randn(4, 8)]) == 1  # still usable


def test_a_weight_whose_group_scale_overflows_is_blamed_not_the_batches():
    """Trial DE: a weight group of 1e6 overflowed its float16 group scale, and calibrate told the user to calibrate
    on finite data."""
    from lightning_compress import QuantConfig, convert_to_qat

    model = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[0, :32] = 1e6
    convert_to_qat(model, QuantConfig(4, 8, group_size=32, activation_granularity="per_token"))
    with pytest.raises(ValueError, match=r"the weights of \['0'\] give NaN or infinite scales"):
        calibrate(model, [torch.randn(4, 64)])


def test_a_batch_that_fails_leaves_the_quantizers_as_they_were():
    model = quantized()
    before = state(model)
    with pytest.raises(RuntimeError):
        calibrate(model, [torch.randn(2, 8), torch.randn(2, 5)])
    assert same(before, state(model))
    assert all(q.pending_batch_stats() is None for q in model.modules() if hasattr(q, "pending_batch_stats"))


def test_enable_fake_quant_takes_booleans_only():
    model = quantized()
    with pytest.raises(TypeError, match=r"`enabled` must be True or False, got str \('no'\)"):
        enable_fake_quant(model, "no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`observe` must be True, False or None, got int"):
        enable_fake_quant(model, True, observe=2)  # type: ignore[arg-type]
    assert not model[0].weight_fake_quant.fake_quant_enabled


def test_convert_to_qat_needs_a_config_instance_and_convert_to_float_a_list():
    model = mlp()
    with pytest.raises(TypeError, match="`config` must be a QuantConfig instance"):
        convert_to_qat(model, QuantConfig)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`config` must be a QuantConfig instance"):
        convert_to_qat(model, None)  # type: ignore[arg-type]
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    with pytest.raises(TypeError, match="`layers` must be a list of layer names or None, got the string '0'"):
        convert_to_float(quantized(), "0")


@pytest.mark.parametrize(
    ("value", "error"), [(True, TypeError), (None, TypeError), ("0.1", TypeError), (0.0, ValueError)]
)
def test_quant_config_averaging_constant(value, error):
    with pytest.raises(error, match="`averaging_constant`"):
        QuantConfig(averaging_constant=value)


def test_pruning_schedule_checks_its_fields():
    with pytest.raises(ValueError, match="`kind`='bogus' is not one of"):
        PruningSchedule("bogus", 0.5, 0, 10)
    with pytest.raises(ValueError, match=r"`target`=5.0 is outside \[0, 1\)"):
        PruningSchedule("cubic", 5.0, 0, 10)
    with pytest.raises(ValueError, match=r"`target`=nan is outside"):
        PruningSchedule("cubic", math.nan, 0, 10)
    with pytest.raises(ValueError, match="`every`=0 must be >= 1"):
        PruningSchedule("cubic", 0.5, 0, 10, every=0)
    with pytest.raises(ValueError, match="`end`=3 must be greater than `start`=3"):
        PruningSchedule("cubic", 0.5, 3, 3)
    with pytest.raises(TypeError, match="`start` must be an int, got bool"):
        PruningSchedule("cubic", 0.5, True, 10)  # type: ignore[arg-type]


def test_compact_atol_must_be_a_finite_non_negative_number():
    model = mlp()
    for bad, error in ((math.nan, ValueError), (math.inf, ValueError), (-1.0, ValueError), ("1e-4", TypeError)):
        with pytest.raises(error, match="`atol`"):
            compact(model, torch.randn(2, 8), atol=bad)  # type: ignore[arg-type]


def test_random_importance_seed_must_be_non_negative_as_the_callback_says():
    with pytest.raises(ValueError, match="`seed`=-1 must be >= 0"):
        RandomImportance(-1)


def test_the_pruner_clock_takes_whole_steps():
    pruner = IterativePruner(mlp(), 0.8, total_steps=20, every_n_steps=1)
    for bad, error in ((True, TypeError), (0.5, TypeError), (-5, ValueError)):
        with pytest.raises(error, match="`t`"):
            pruner.advance_to(bad)  # type: ignore[arg-type]
    assert pruner.steps == 0 and pruner.events == 0
    for _ in range(20):
        pruner.step()
    assert pruner.masked_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_the_guard_needs_a_number_and_a_finite_baseline():
    pruner = IterativePruner(mlp(), 0.8, total_steps=20, every_n_steps=1, max_drop=0.01)
    for bad in ("0.9", True, None):
        with pytest.raises(TypeError, match="`value` must be a number"):
            pruner.observe(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`value`=nan cannot be the accuracy guard's baseline"):
        pruner.observe(math.nan)
    assert pruner.guard is not None and pruner.guard.baseline is None
    assert pruner.observe(torch.tensor(0.9)).action == "baseline"  # a 0-d tensor, as metrics give
    guard = AccuracyGuard(max_drop=0.01)
    guard.observe(0.9)
    guard.event_applied(0.0, 0.5)
    assert guard.observe(math.nan).action == "rollback"  # after an event a NaN is the worst result


def test_the_pruner_names_its_argument_types_and_the_shapes_that_differ():
    model = mlp()
    with pytest.raises(TypeError, match="`previous` must be an IterativePruner or None, got str"):
        IterativePruner(model, 0.5, total_steps=4, previous="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`optimizers` must be an optimizer, an iterable of optimizers or None"):
        IterativePruner(model, 0.5, total_steps=4, optimizers=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`warn` must be a callable taking a message, or None, got int"):
        IterativePruner(model, 0.5, total_steps=4, warn=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`info` must be a callable taking a message, or None, got str"):
        IterativePruner(model, 0.5, total_steps=4, info="x")  # type: ignore[arg-type]
    small = IterativePruner(mlp(16), 0.5, total_steps=2, every_n_steps=1)
    small.step()
    wide = IterativePruner(mlp(32), 0.5, total_steps=2)
    with pytest.raises(ValueError, match=r"'0.weight': \(\(16, 8\), \(32, 8\)\)"):
        wide.load_state_dict(small.state_dict())
    with pytest.raises(TypeError, match="`state` must be a dict from `state_dict\\(\\)`, got NoneType"):
        wide.load_state_dict(None)  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    """A sweep's `np.int64` / `np.float32` values were refused ("must be an int, got int64"); they are numbers."""
    np = pytest.importorskip("numpy")
    from lightning_compress import IterativePruning, QuantizationAwareTraining

    config = QuantConfig(np.int64(4), np.int64(8), averaging_constant=np.float32(0.5))
    assert (type(config.weight_bits), type(config.activation_bits), type(config.averaging_constant)) == (
        int,
        int,
        float,
    )
    assert QuantizationAwareTraining(weight_bits=np.int64(4), start_epoch=np.int64(1)).start_epoch == 1
    pruning = IterativePruning(np.float32(0.5), start_epoch=np.int64(1), every_n_steps=np.int64(2), seed=np.int64(3))
    assert type(pruning.config.target_sparsity) is float and type(pruning.config.seed) is int
    schedule = PruningSchedule(lambda t: np.float32(0.25), np.float32(0.5), start=np.int64(0), end=np.int64(4))
    assert schedule.sparsity_at(2) == 0.25 and type(schedule.end) is int
    model = mlp()
    prune_(model, np.float32(0.5), importance="random", seed=np.int64(1))
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)
    for bad, match in ((np.bool_(True), "must be an int"), (torch.tensor(1), "must be an int")):
        with pytest.raises(TypeError, match=match):
            QuantizationAwareTraining(start_epoch=bad)


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        ("a", TypeError, "`seed` must be an int"),
        (-1, ValueError, "`seed`=-1 must be >= 0"),
        (1.5, TypeError, "`seed` must be an int"),
        (None, TypeError, "`seed` must be an int"),
    ],
)
def test_prune_checks_seed_whatever_the_importance(seed, error, match):
    """`seed` was checked only with importance='random' (a docs trial): a bad one passed silently otherwise."""
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        prune_(model, 0.5, seed=seed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_lazy_module_before_its_first_forward_is_named_with_the_fix():
    """An uninitialized `nn.LazyLinear` failed inside torch ('Attempted to use an uninitialized parameter')."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    match = r"`model` has parameters a lazy module has not created yet \('0.weight'.*run one forward pass"
    for call in (lambda: prune_(model, 0.5), lambda: convert_to_qat(model, QuantConfig(8, 8)), lambda: sparsity(model)):
        with pytest.raises(ValueError, match=match):
            call()
    assert isinstance(model[0], nn.LazyLinear)
    model(torch.randn(3, 5))  # materialized: it compresses like any model
    prune_(model, 0.5)
    assert sparsity(model) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("batch", ["a string", None])
def test_calibrating_on_batches_that_are_not_tensors_names_batches(batch):
    """A string or None reached the observer and failed with AttributeError: 'str' object has no attribute 'detach'."""
    model = mlp()
    convert_to_qat(model, QuantConfig(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"`batches` yields \w+s that reach a quantized layer as something other than"):
        calibrate(model, [batch])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_example_inputs_the_forward_does_not_take_are_named(tmp_path):
    """A wrongly shaped `example_inputs` surfaced the model's own 'mat1 and mat2 shapes cannot be multiplied' from
    inside the tracer, without naming the argument (a docs trial)."""
    from lightning_compress import export_onnx

    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = r"`example_inputs` does not run through Sequential's forward \(RuntimeError: mat1 and mat2 shapes"
    with pytest.raises(ValueError, match=match):
        prune_(model, 0.5, granularity="channel", example_inputs=torch.randn(2, 5))
    with pytest.raises(ValueError, match=match):
        compact(model, torch.randn(2, 5))
    with pytest.raises(ValueError, match=match):
        export_onnx(model, tmp_path / "model.onnx", torch.randn(2, 5))
    assert not (tmp_path / "model.onnx").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_first_line_drops_a_terminals_colour_codes():
    """Trial GE: torch's pickle error is printed bold, and a refusal quoting it carried `[1m...[0m` into the message."""
    from lightning_compress.core.checks import first_line

    assert first_line(ValueError("\x1b[1mWeights only load failed.\x1b[0m Re-running\nmore")) == (
        "Weights only load failed. Re-running"
    )
