"""The callbacks in a Trainer of the standalone ``pytorch_lightning`` package (the same classes under the older name,
which ``lightning`` installs; neuralforecast's models derive from it). Trial FI: QAT, the accuracy guard and channel
pruning failed inside every neuralforecast fit with Lightning's ``ValueError: Expected a parent``."""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from torch import nn

from lightning_compress import IterativePruning, QuantizationAwareTraining, load_qat_checkpoint, sparsity
from lightning_compress.core.qat import qat_modules
from tests.conftest import make_blobs

ptl = pytest.importorskip("pytorch_lightning")


class _OldNameModule(ptl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)
        self.example_input_array = torch.randn(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_blobs(256), batch_size=32)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(make_blobs(128, seed=1), batch_size=64)


def _trainer(tmp_path, callbacks, **kwargs):
    return ptl.Trainer(
        max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", **kwargs,
    )  # fmt: skip


def test_the_guard_and_channel_pruning_run_in_a_pytorch_lightning_trainer(tmp_path):
    torch.manual_seed(0)
    model = _OldNameModule()
    guarded = IterativePruning(0.5, monitor="val_acc", max_drop=0.5, start_epoch=0, end_epoch=2)
    _trainer(tmp_path, [guarded], enable_checkpointing=False).fit(model)
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)
    torch.manual_seed(0)
    model = _OldNameModule()
    channels = IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=2)
    _trainer(tmp_path, [channels], enable_checkpointing=False).fit(model)
    assert int((model.net[0].weight.abs().sum(1) == 0).sum()) == 16


def test_qat_runs_in_a_pytorch_lightning_trainer_and_its_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    model = _OldNameModule()
    _trainer(tmp_path, [QuantizationAwareTraining(start_epoch=0)], enable_checkpointing=True).fit(model)
    assert len(qat_modules(model)) == 3
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = load_qat_checkpoint(_OldNameModule, path)
    assert len(qat_modules(loaded)) == 3 and not loaded.training
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())
