"""Pieces the benchmark scripts share (run them from the repository root: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn


def quiet_trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def mlp_layers() -> nn.Sequential:
    """The 10.4M-parameter MLP of the overhead and export benchmarks: 1024-2360-2360-1024-10."""
    return nn.Sequential(
        nn.Linear(1024, 2360),
        nn.ReLU(),
        nn.Linear(2360, 2360),
        nn.ReLU(),
        nn.Linear(2360, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


class Stubbed(nn.Module):
    """What torch.ao eager QAT needs around a network: QuantStub / DeQuantStub."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.net = net
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.net(self.quant(x)))


def prepare_torch_ao_qat(net: nn.Module) -> nn.Module:
    """Wrap ``net`` in stubs and run ``torch.ao.quantization.prepare_qat`` (x86 qconfig) on it."""
    stubbed = Stubbed(net)
    stubbed.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(stubbed.train(), inplace=True)
    return stubbed
