"""A small, complete workload for examples, tests and benchmarks: sklearn's digits and a CNN.

``load_digits`` ships inside scikit-learn (1,797 8x8 images, 10 classes): nothing is
downloaded. Needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "load_digits_split"]


def load_digits_split(seed: int = 0, test_size: float = 0.3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified train/test split of sklearn digits as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape ``(N, 1, 8, 8)`` scaled to [0, 1].
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'lightning-compress[examples]'") from err
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=test_size, stratify=data.target, random_state=seed
    )

    def to_x(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0

    def to_y(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


class DigitsDataModule(pl.LightningDataModule):
    """Digits with a stratified 70/30 split; the 30% serve as validation and test set."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self._data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            self._data = load_digits_split(self.seed)

    def _loader(self, train: bool) -> DataLoader:
        assert self._data is not None, "call setup() first"
        x_train, y_train, x_test, y_test = self._data
        if train:
            generator = torch.Generator().manual_seed(self.seed)
            return DataLoader(
                TensorDataset(x_train, y_train), batch_size=self.batch_size, shuffle=True, generator=generator
            )
        return DataLoader(TensorDataset(x_test, y_test), batch_size=256)

    def train_dataloader(self) -> DataLoader:
        return self._loader(True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(False)


class DigitsCNN(nn.Sequential):
    """Conv(1->32) - ReLU - Conv(32->64) - BN - ReLU - MaxPool - Linear(1024->128) - ReLU - Linear(128->10)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 digits: stem, ``blocks`` residual blocks with BatchNorm, pooling, head."""

    def __init__(self, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class DigitsClassifier(pl.LightningModule):
    """Trains any ``(N, 1, 8, 8) -> (N, 10)`` network; logs ``train_loss``, ``val_acc``, ``test_acc``."""

    def __init__(self, net: nn.Module | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net if net is not None else DigitsCNN()
        self.lr = lr
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
