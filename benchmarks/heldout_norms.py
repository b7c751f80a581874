"""Held-out check of the defaults on normalization layers the zoo does not have: GroupNorm, LayerNorm, BatchNorm.

Written by an independent held-out trial in session 15 (nothing was chosen on it): three small models on sklearn
digits (1,400 train / 397 validation images, one fixed split), Adam 3e-3, batch 64, 10 epochs;
``IterativePruning(t, start_epoch=1, end_epoch=7)`` with every other argument at its default, against Lightning's
``ModelPruning("l1_unstructured", use_global_unstructured=True)`` over the same Linear/Conv weights, with per-epoch
amounts that follow the same cubic schedule (both reach exactly the target), and dense. Metric: accuracy on the
validation split after fit (there is no test split: the split is nobody's choice set). Seeds 0 and 1.

    python benchmarks/heldout_norms.py            # 30 fits, ~4 min on one core
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning

START, END, EPOCHS = 1, 7, 10


class GroupNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.c2, self.g2 = nn.Conv2d(32, 48, 3, padding=1), nn.GroupNorm(4, 48)
        self.c3 = nn.Conv2d(48, 64, 3, padding=1)
        self.fc1, self.fc = nn.Linear(64 * 2 * 2, 64), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.g1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.g2(self.c2(x))), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(F.relu(self.fc1(x.flatten(1))))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.n1 = nn.Linear(64, 256), nn.LayerNorm(256)
        self.l2, self.n2 = nn.Linear(256, 128), nn.LayerNorm(128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.n1(self.l1(x.flatten(1))))
        return self.fc(F.gelu(self.n2(self.l2(x))))


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.c2, self.bn2 = nn.Conv2d(24, 40, 3, padding=1), nn.BatchNorm2d(40)
        self.c3 = nn.Conv2d(40, 56, 3)
        self.fc1, self.fc = nn.Linear(56 * 2 * 2, 48), nn.Linear(48, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.c2(x))), 2)
        return self.fc(F.relu(self.fc1(F.relu(self.c3(x)).flatten(1))))


MODELS: dict[str, Callable[[], nn.Module]] = {"gn-cnn": GroupNormCNN, "ln-mlp": LayerNormMLP, "bn-cnn": BatchNormCNN}


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loaders(seed: int) -> tuple[DataLoader, tuple[Tensor, Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))
    x, y = x[order], y[order]
    train = DataLoader(
        TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return train, (x[1400:], y[1400:])


def cubic(target: float, epoch: int) -> float:
    """Sparsity after the event at the end of ``epoch`` (events at START..END-1)."""
    if epoch < START:
        return 0.0
    done = min(epoch - START + 1, END - START) / (END - START)
    return target * (1 - (1 - done) ** 3)


def model_pruning(target: float, net: nn.Module) -> Callback:
    def amount(epoch: int) -> float:
        if epoch < START or epoch >= END:
            return 0.0
        return 1 - (1 - cubic(target, epoch)) / (1 - cubic(target, epoch - 1))

    layers = [(m, "weight") for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return ModelPruning("l1_unstructured", amount=amount, use_global_unstructured=True, parameters_to_prune=layers)


def run(model: str, method: str, target: float, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    train, (x, y) = loaders(seed)
    module = Classifier(MODELS[model]())
    callbacks: list[Callback] = []
    if method == "defaults":
        callbacks.append(IterativePruning(target, start_epoch=START, end_epoch=END))
    elif method == "ModelPruning":
        callbacks.append(model_pruning(target, module.net))
    trainer = pl.Trainer(
        max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train)
    module.eval()
    with torch.no_grad():
        accuracy = float((module(x).argmax(1) == y).float().mean()) * 100
    weights = [m.weight for m in module.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"model": model, "method": method, "target": target, "seed": seed, "accuracy": accuracy, "zeros": zeros}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "heldout_norms.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    jobs = [("dense", 0.0)] + [(m, t) for t in (0.9, 0.95) for m in ("defaults", "ModelPruning")]
    results = [run(model, m, t, seed) for model in args.models for m, t in jobs for seed in args.seeds]
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print("| model | dense | defaults 90% | ModelPruning 90% | defaults 95% | ModelPruning 95% |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        cells = [
            statistics.mean(r["accuracy"] for r in results if (r["model"], r["method"], r["target"]) == (model, m, t))
            for m, t in jobs
        ]
        print(f"| {model} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
