"""Channel pruning of FSDP2-sharded weights in core (2 CPU processes, gloo): groups traced on the whole model
before `fully_shard`, scored from each process's shards, give the whole model's masks, cut to each shard; `export_onnx`
refuses a sharded model, naming what works."""

import copy
import os

import pytest
import torch
from torch import nn

from lightning_compress import compact, export_onnx
from lightning_compress.core.importance import BatchNormScaleImportance, MagnitudeImportance, RandomImportance
from lightning_compress.core.rules import channel_structure, rule_for
from lightning_compress.core.selection import select_targets
from lightning_compress.core.sharding import local_part, model_class_name
from tests.conftest import spawn


def _model() -> nn.Sequential:
    """Convolutions with BatchNorm, then a Linear: 11 and 13 filters split 6/5 and 7/6 over two processes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 11, 3), nn.BatchNorm2d(11), nn.ReLU(), nn.Conv2d(11, 13, 3), nn.BatchNorm2d(13), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(13, 5),
    )  # fmt: skip


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, x = _model(), torch.randn(2, 3, 8, 8)
        with torch.no_grad():  # BatchNorm scales of different sizes, so that scores differ between channels
            for bn in (model[1], model[4]):
                bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
        whole = copy.deepcopy(model)
        structure = channel_structure(model, select_targets(model), x)
        mesh = init_device_mesh("cpu", (2,))
        for layer in (model[0], model[3], model[8]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            rule_for(model, select_targets(model), "channel", None, MagnitudeImportance(), "global", 0.0, x)
            refused = ""
        except ValueError as err:
            refused = str(err)
        results = {"refused": refused, "onnx": "", "compact": "", "name": model_class_name(model)}
        try:
            export_onnx(model, f"{out}/sharded.onnx", x)
        except ValueError as err:
            results["onnx"] = str(err)
        try:  # trial CG: FSDP's own AssertionError from the copy the output check takes
            compact(model, x)
        except ValueError as err:
            results["compact"] = str(err)
        importances = (("magnitude", MagnitudeImportance()), ("random", RandomImportance(3)))
        for name, importance in (*importances, ("bn_scale", BatchNormScaleImportance())):
            for scope in ("global", "layer"):
                reference, _ = rule_for(whole, select_targets(whole), "channel", None, importance, scope, 0.0, x)
                sharded, _ = rule_for(
                    model, select_targets(model), "channel", None, importance, scope, 0.0, x, structure=structure
                )
                expected = reference.compute(0.5, {})
                masks = sharded.compute(0.5, {})
                params = {t.param_name: t.param for t in sharded.targets}
                results[f"{name}/{scope}/masks"] = masks.keys() == expected.keys() and all(
                    torch.equal(masks[k], local_part(params[k], expected[k])) for k in expected
                )
                results[f"{name}/{scope}/units"] = (sharded.units(masks), reference.units(expected))
                results[f"{name}/{scope}/again"] = sharded.units(sharded.compute(0.7, masks))
                results[f"{name}/{scope}/again_expected"] = reference.units(reference.compute(0.7, expected))
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_channel_masks_are_the_whole_models_cut_to_each_shard(tmp_path):
    spawn(_worker, tmp_path, nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert "cannot trace a sharded (FSDP2) model (0 is sharded): trace the whole model before" in results["refused"]
        assert "export_onnx traces a whole model, but FSDPSequential's parameters are sharded" in results["onnx"]
        assert "compact removes channels of whole layers, but Sequential's parameters are sharded" in results["compact"]
        assert results["name"] == "Sequential"  # trial CG: a compressed file named the model 'FSDPSequential'
        for name in ("magnitude", "random", "bn_scale"):
            for scope in ("global", "layer"):
                key = f"{name}/{scope}"
                assert results[f"{key}/masks"], key
                (units, expected) = results[f"{key}/units"]
                # half of the 24 channels; per layer, half of 11 and of 13, halves rounded up: 6 + 7
                assert units == expected and units[0] == (13 if scope == "layer" else 12), key
                assert results[f"{key}/again"] == results[f"{key}/again_expected"], key
