"""Hostile input: random arguments and shapes, odd models, non-finite weights, damaged files.

Every case gives a correct result or a clear ``ValueError``/``TypeError``, and never a
half-modified model.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress import (
    CompressedFileError,
    IterativePruning,
    QuantizationAwareTraining,
    load_compressed,
    prune_,
    save_compressed,
    sparsity,
)
from tests.export.helpers import Net, compressed_net


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def equal(x: torch.Tensor, y: torch.Tensor) -> bool:
        if not x.is_floating_point():
            return torch.equal(x, y)
        return x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all())

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), max_size=3),
    sparsity_value=st.one_of(st.floats(-0.5, 1.5), anything),
    importance=st.sampled_from(["magnitude", "random", "taylor", "l2", 3]),
    scope=st.sampled_from(["global", "layer", "all"]),
    min_density=st.one_of(st.floats(-0.1, 1.1), st.just(0.0)),
    include=st.sampled_from([None, "*", ["0"], ["nope"], [], 5]),
    nan=st.booleans(),
)
@example(  # regression: a NaN weight that is pruned must become an exact zero (a mask multiply kept NaN)
    sizes=[(1, 1)], sparsity_value=0.75, importance="random", scope="global", min_density=0.0, include=None, nan=True
)
def test_prune_gives_a_result_or_a_clear_error(sizes, sparsity_value, importance, scope, min_density, include, nan):
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in sizes])
    if nan and sizes:
        with torch.no_grad():
            model[0].weight.view(-1)[0] = float("nan")
    before = snapshot(model)
    try:
        masks = prune_(model, sparsity_value, importance, scope, include=include, min_density=min_density)
    except (ValueError, TypeError) as err:
        assert str(err)  # a message, naming what is wrong
        assert same(before, snapshot(model)), "an error left the model modified"
        return
    assert not (nan and importance == "magnitude")  # |NaN| cannot be ranked: that must be an error
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned <= math.ceil(sparsity_value * total) + len(masks)
    for name, mask in masks.items():
        assert (model.get_parameter(name)[~mask] == 0).all()


@settings(max_examples=120, deadline=None)
@given(
    target=anything,
    importance=st.one_of(st.sampled_from(["magnitude", "taylor", "random", "bn_scale"]), anything),
    scope=anything,
    granularity=st.one_of(st.sampled_from(["element", "channel", "2:4", "1:8", "4:4", "0:2", "rows"]), anything),
    regrow=st.one_of(st.sampled_from([0.0, 0.1, 0.99]), anything),
    schedule=st.one_of(st.sampled_from(["cubic", "linear", "geometric", "one_shot"]), anything),
    start=anything,
    end=anything,
    every_n_epochs=anything,
    min_density=anything,
    mode=anything,
    max_drop=anything,
)
def test_pruning_arguments_are_validated(
    target, importance, scope, granularity, regrow, schedule, start, end, every_n_epochs, min_density, mode, max_drop
):
    kwargs = dict(
        target_sparsity=target,
        granularity=granularity,
        regrow=regrow,
        importance=importance,
        scope=scope,
        schedule=schedule,
        start_epoch=start,
        end_epoch=end,
        every_n_epochs=every_n_epochs,
        min_density=min_density,
        mode=mode,
        max_drop=max_drop,
    )
    try:
        callback = IterativePruning(**kwargs)
    except (ValueError, TypeError) as err:
        assert "`" in str(err)  # names the argument
        return
    assert 0 <= callback.target_sparsity < 1


@settings(max_examples=80, deadline=None)
@given(
    weight_bits=anything,
    activation_bits=anything,
    scale=st.one_of(st.sampled_from(["minmax", "learned"]), anything),
    shift_search=anything,
    start=anything,
    freeze=anything,
)
def test_qat_arguments_are_validated(weight_bits, activation_bits, scale, shift_search, start, freeze):
    try:
        QuantizationAwareTraining(weight_bits, activation_bits, scale, shift_search, start, freeze)
    except (ValueError, TypeError) as err:
        assert "`" in str(err)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(), nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), nn.Identity()],
    ids=["empty", "no-linear-or-conv", "identity"],
)
def test_models_without_prunable_weights(model):
    with pytest.raises(ValueError, match="select no weight"):
        prune_(model, 0.5)


def test_tied_frozen_and_tiny_layers():
    shared = nn.Linear(8, 8)
    frozen = nn.Linear(8, 8).requires_grad_(False)
    tiny = nn.Linear(1, 1)
    model = nn.Sequential(shared, frozen, shared, nn.Linear(8, 1), tiny)
    masks = prune_(model, 0.5, min_density=0.1)
    assert set(masks) == {"0.weight", "1.weight", "3.weight", "4.weight"}  # the tied weight once
    assert masks["4.weight"].all()  # 1 weight with a 10% floor: kept
    assert 0.45 < sparsity(model) < 0.55


def test_infinite_weights_raise_before_any_change():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        prune_(model, 0.5)
    assert same(before, snapshot(model))


# ---------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcz") / "m.lcz"
    save_compressed(compressed_net(), path)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_always_raise_cleanly(good_file, tmp_path, data):
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    raw = bytearray(good_file)
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "splice":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    if bytes(raw) == good_file:
        return
    path = tmp_path / "bad.lcz"
    path.write_bytes(bytes(raw))
    model = Net()
    before = snapshot(model)
    with pytest.raises(CompressedFileError):
        load_compressed(model, path)
    assert same(before, snapshot(model))
    assert type(model.fc1) is nn.Linear  # no half-applied conversion
