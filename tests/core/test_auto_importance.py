"""``importance="auto"``: LAMP where a BatchNorm normalizes a pruned layer's output, magnitude elsewhere."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from lightning_compress import IterativePruner, prune_, sparsity
from lightning_compress.core.importance import LampImportance, MagnitudeImportance, auto_importance, normalized_layers
from tests.conftest import spawn


def bn_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def test_lamp_scores_are_monotone_in_magnitude_within_a_layer_and_free_of_its_scale():
    weight = torch.randn(32, 16)
    scores = LampImportance().score("w", weight)
    assert scores.max() == pytest.approx(1.0)
    order = weight.abs().flatten().argsort()
    assert (scores.flatten()[order].diff() >= 0).all()
    assert torch.allclose(LampImportance().score("w", 1000.0 * weight), scores)


def lamp_by_definition(weight: torch.Tensor) -> torch.Tensor:
    """LAMP by its definition, the squares sorted as floats (the code before they were sorted as int32 bits)."""
    magnitude = weight.abs().flatten()
    square = (magnitude / magnitude.max()).square()
    ordered, order = torch.sort(square, stable=True)
    scores = torch.empty_like(square)
    scores[order] = ordered / ordered.flip(0).cumsum(0).flip(0).clamp_min(torch.finfo(torch.float32).tiny)
    return scores.view(weight.shape)


def test_lamp_sorts_the_squares_bits_as_integers_and_scores_bit_for_bit_as_its_definition():
    """An event sorts each layer's squares by their int32 bits (a radix sort, several times faster than a float
    sort), and the scores are bit for bit those of sorting the floats: zeros, ties and tiny values included."""
    torch.manual_seed(0)
    weight = torch.randn(64, 48)
    weight[torch.rand_like(weight) < 0.85] = 0.0  # a layer at 85% sparsity
    weight[0, :8] = 0.5  # ties
    weight[1, 0] = 1e-30  # squares to zero against the largest weight
    assert torch.equal(LampImportance().score("w", weight), lamp_by_definition(weight))
    assert torch.equal(LampImportance().score("w", torch.zeros(4, 4)), torch.zeros(4, 4))
    dense = torch.randn(16, 8)
    assert torch.equal(LampImportance().score("w", dense), lamp_by_definition(dense))


def test_a_batchnorm_after_a_layer_makes_auto_lamp_and_its_masks_ignore_that_layers_scale():
    model = bn_cnn()
    assert normalized_layers(model, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]) == ["2"]

    def scaled() -> nn.Sequential:
        model = bn_cnn()
        with torch.no_grad():
            model[2].weight.mul_(100.0)  # the BatchNorm after it makes this rescaling invisible to the function
        return model

    masks, scaled_masks = prune_(model, 0.9), prune_(scaled(), 0.9)
    assert all(torch.equal(masks[k], scaled_masks[k]) for k in masks)
    assert all(torch.equal(masks[k], v) for k, v in prune_(bn_cnn(), 0.9, importance="lamp").items())
    magnitude = prune_(scaled(), 0.9, importance="magnitude")
    assert not all(torch.equal(masks[k], magnitude[k]) for k in masks)
    assert sparsity(model) == pytest.approx(0.9, abs=1e-3)


class _DropPath(nn.Module):
    """Stochastic depth as `transformers` and timm write it (`PatchTSTDropPath`, `DropPath`): no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_batchnorm_after_a_dropout_or_drop_path_still_normalizes_the_layer():
    """Trial DU: PatchTST registers `out_proj, dropout_path1 (Identity), norm_sublayer1.batchnorm`, and `"auto"`
    scored by magnitude (one seed's validation MSE 4.64 against 0.49 with LAMP). Identities, dropouts and drop paths
    leave the layer's scale to the BatchNorm after them; an activation or another layer does not count as one."""
    layers = lambda m: [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]  # noqa: E731
    for between in (nn.Identity(), nn.Dropout(0.1), nn.Dropout2d(0.1), _DropPath()):
        model = nn.Sequential(nn.Conv2d(1, 8, 3), between, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        assert normalized_layers(model, layers(model)) == ["0"]
    for between in (nn.ReLU(), nn.Conv2d(8, 8, 1)):
        model = nn.Sequential(nn.Conv2d(1, 8, 3), between, nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
        assert "0" not in normalized_layers(model, layers(model))


def test_without_such_a_batchnorm_auto_is_magnitude():
    model = mlp()
    auto = prune_(model, 0.9)
    magnitude = prune_(mlp(), 0.9, importance="magnitude")
    assert all(torch.equal(auto[k], magnitude[k]) for k in auto)
    head_norm = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 8))  # normalizes the input, not a layer's output
    importance, why = auto_importance(head_norm, [head_norm[1]], "element", sharded=False)
    assert isinstance(importance, MagnitudeImportance) and why == "magnitude"


@pytest.mark.parametrize(("granularity", "sharded"), [("channel", False), ("N:M", False), ("element", True)])
def test_auto_is_magnitude_for_channels_n_m_and_sharded_weights(granularity, sharded):
    model = bn_cnn()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    importance, why = auto_importance(model, layers, granularity, sharded)
    assert isinstance(importance, MagnitudeImportance)
    assert ("sharded" in why) == sharded


def test_lamp_cannot_rank_a_shard_alone():
    with pytest.raises(ValueError, match=r"LampImportance\(\) scores a weight against the whole layer, but 'w'"):
        LampImportance().shard_ranking("w", torch.randn(4), 4)


def test_lamp_is_element_wise_only():
    with pytest.raises(ValueError, match="`importance`='lamp' scores only some granularities"):
        prune_(bn_cnn(), 0.5, importance="lamp", granularity="2:4")


def test_the_pruner_says_what_auto_chose(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_compress"):
        pruner = IterativePruner(bn_cnn(), 0.9, total_steps=10)
    assert isinstance(pruner.rule.importance, LampImportance)
    assert "importance='auto' scores by LAMP (a BatchNorm normalizes the outputs of ['2'])" in caplog.text


def _sharded_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        model = bn_cnn()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        results = {"auto": type(IterativePruner(model, 0.5, total_steps=4).rule.importance).__name__}
        try:
            IterativePruner(model, 0.5, importance="lamp", total_steps=4)
            results["lamp"] = ""
        except ValueError as err:
            results["lamp"] = str(err)
        torch.save(results, f"{out}/results.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_fsdp2_auto_is_magnitude_and_lamp_is_refused_before_any_event(tmp_path):
    spawn(_sharded_worker, tmp_path, nprocs=1)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert results["auto"] == "MagnitudeImportance"
    assert "`importance`='lamp' scores whole weights, but this model's are sharded (FSDP2)" in results["lamp"]


def test_a_model_already_converted_for_qat_is_still_seen_as_normalized():
    """Regression: QAT layers hold their quantizers as children, so the layer was no leaf and a pruning callback
    set up after QAT's conversion fell back to magnitude."""
    from lightning_compress import QuantConfig, convert_to_qat

    model = bn_cnn()
    convert_to_qat(model, QuantConfig())
    layers = [model[i] for i in (0, 2, 6, 8)]
    assert normalized_layers(model, layers) == ["2"]


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_lamp_scores_stay_finite_and_scale_free_at_extreme_scales(scale):
    """Regression (a trial): the squares overflowed float32 above |w| ~ 1e19 (NaN scores, a refused event) and
    underflowed to zero below ~1e-19 (the scale came back)."""
    weight = torch.randn(64, 32)
    scores = LampImportance().score("w", weight * scale)
    assert scores.isfinite().all()
    assert torch.allclose(scores, LampImportance().score("w", weight), rtol=1e-5, atol=1e-7)


def test_resuming_with_another_importance_says_so():
    """A checkpoint pruned with magnitude, resumed on a BatchNorm model where "auto" picks LAMP: the rest of the
    schedule is scored differently, which the resume now says (it did so silently)."""
    before = IterativePruner(bn_cnn(), 0.9, importance="magnitude", total_steps=10, every_n_steps=1)
    for _ in range(3):
        before.step()
    after = IterativePruner(bn_cnn(), 0.9, total_steps=10, every_n_steps=1)
    with pytest.warns(UserWarning, match="masks were scored by MagnitudeImportance, this run scores by LampImportance"):
        after.load_state_dict(before.state_dict())
    same = IterativePruner(bn_cnn(), 0.9, importance="magnitude", total_steps=10, every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(before.state_dict())
