"""Activation checkpointing applied in `configure_model` (as Lightning documents it beside FSDP2): the blocks are
wrapped after the callbacks' `setup` took the layers' names (trial GD: QAT failed as it switched on, and channel
pruning with a raw `KeyError`)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from lightning_compress import IterativePruning, QuantizationAwareTraining, compact
from lightning_compress.core.qat import qat_modules
from tests.conftest import TinyModule, trainer


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class CheckpointedInConfigureModel(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), _Block(32), _Block(32), nn.Linear(32, 4))
        self.example_input_array = torch.randn(4, 16)

    def configure_model(self) -> None:
        for i in (1, 2):
            if not isinstance(self.net[i], CheckpointWrapper):
                self.net[i] = checkpoint_wrapper(self.net[i])


def test_qat_switches_on_every_layer_of_blocks_wrapped_in_configure_model_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = CheckpointedInConfigureModel()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    fit = trainer(max_epochs=3, callbacks=[QuantizationAwareTraining(start_epoch=0), ckpt], enable_checkpointing=True)
    fit.fit(model)
    layers = qat_modules(model)
    assert len(layers) == 6 and all(layer.weight_fake_quant.fake_quant_enabled for _, layer in layers)
    assert any("_checkpoint_wrapped_module" in name for name, _ in layers)  # wrapped after the conversion
    state = torch.load(tmp_path / "epoch=2.ckpt", weights_only=False)
    assert "net.1.fc1.weight_fake_quant.scale" in state["state_dict"]  # plain names, as the wrappers save them
    resumed = CheckpointedInConfigureModel()
    trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(start_epoch=0)]).fit(
        resumed, ckpt_path=tmp_path / "epoch=1.ckpt"
    )
    assert len(qat_modules(resumed)) == 6


def test_channel_pruning_of_blocks_wrapped_in_configure_model_compacts_exactly():
    torch.manual_seed(0)
    model = CheckpointedInConfigureModel()
    trainer(max_epochs=3, callbacks=[IterativePruning(0.5, granularity="channel")]).fit(model)
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    compact(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=0)
    assert isinstance(model.net[1], CheckpointWrapper) and model.net[1].fc1.out_features < 64


@pytest.mark.parametrize("wrapped", [False, True])
def test_plain_names_find_layers_through_checkpoint_wrappers(wrapped):
    from lightning_compress.core.wrappers import modules_by_name, plain_name

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    if wrapped:
        model[1] = checkpoint_wrapper(model[1])  # a layer wrapped alone: its plain name is the layer's
    assert plain_name("1._checkpoint_wrapped_module") == "1" and plain_name("a.b") == "a.b"
    assert isinstance(modules_by_name(model)["1"], nn.Linear)
