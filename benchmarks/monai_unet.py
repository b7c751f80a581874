"""Channel pruning of MONAI's UNet through its skip concatenations: segmenting the strokes of noisy digits.

Until session 41 MONAI's UNet was refused whole: Torch-Pruning's shape inference could not size the upsampling
branch at a skip concatenation and the whole channel trace failed. The concatenations' widths are now measured in
the traced forward.

Per seed: a dense ``monai.networks.nets.UNet`` (2-D, channels (16, 32, 64), strides (2, 2), two residual units per
level, MONAI's defaults otherwise: instance norm, PReLU) is trained ``--dense-epochs`` to segment the strokes of the
digits (upsampled to 32x32, target: pixels above the stroke threshold) from images with Gaussian noise added; from
those weights, ``--finetune-epochs`` more of

* **dense**: plain training (the same budget);
* **channels 50%**: ``IterativePruning(0.5, granularity="channel")`` with every other argument at its default, then
  ``compact()`` (checked exact on a batch).

Validation: the Dice score of the thresholded prediction on 297 held-out images at fixed noise (higher is better).
Speed: eager inference at batch 64, one thread, interleaved rounds (median process CPU time) of the seed-0 models.

    pip install monai   # not a dependency of the package
    python benchmarks/monai_unet.py            # ~6 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from common import dense_vs_channels, interleaved_ms, quiet_trainer
from monai.networks.nets import UNet
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
NOISE = 0.6


def unet() -> nn.Module:
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64), strides=(2, 2), num_res_units=2)


def images() -> tuple[Tensor, Tensor]:
    """Digits 32x32 in [0, 1]: 1,500 for training, 297 held out (a fixed split)."""
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1500]], x[order[1500:]]


def dice(logits: Tensor, target: Tensor) -> Tensor:
    predicted = (logits > 0).float()
    return (2 * (predicted * target).sum() + 1) / (predicted.sum() + target.sum() + 1)


class Segmenter(pl.LightningModule):
    """Segments the strokes (pixels above 0.5) of a noisy digit; logs ``val_dice`` on fixed noise."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.example_input_array = torch.zeros(2, 1, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        logits = self(x + NOISE * torch.randn_like(x))
        target = (x > 0.5).float()
        soft = torch.sigmoid(logits)
        soft_dice = (2 * (soft * target).sum() + 1) / (soft.sum() + target.sum() + 1)
        return nn.functional.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, noise = batch
        self.log("val_dice", dice(self(x + noise), (x > 0.5).float()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    train, held = images()
    noise = NOISE * torch.randn(held.shape, generator=torch.Generator().manual_seed(1234))  # the same for every run
    shuffle = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(train), 64, shuffle=True, generator=shuffle), DataLoader(
        TensorDataset(held, noise), 297
    )


def validate(module: Segmenter, val: DataLoader) -> float:
    return float(quiet_trainer(0, []).validate(module, val, verbose=False)[0]["val_dice"])


def run(seed: int, dense_epochs: int, finetune_epochs: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    torch.set_num_threads(1)
    train, val = loaders(seed)
    dense = Segmenter(unet())
    quiet_trainer(dense_epochs, []).fit(dense, train)
    x, noise = next(iter(val))
    inputs = ((x + noise)[:64],)
    out: dict[str, Any] = {"seed": seed, "dense_start": validate(dense, val)}
    figures, models = dense_vs_channels(
        dense, seed, finetune_epochs, loaders(seed + 100)[0], val, lambda m: validate(m, val), "dice", inputs
    )
    out.update(figures)
    if seed == 0:
        out["ms"] = interleaved_ms({m: (lambda m=m: models[m](*inputs)) for m in models}, rounds=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "monai_unet.json"))
    args = parser.parse_args()
    results = [run(s, args.dense_epochs, args.finetune_epochs) for s in args.seeds]
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps(r))
    first = results[0]
    print(
        f"validation Dice (mean of seeds {args.seeds}): dense start "
        f"{statistics.mean(r['dense_start'] for r in results):.4f}, dense fine-tune "
        f"{statistics.mean(r['dense_dice'] for r in results):.4f}, channels 50% compacted "
        f"{statistics.mean(r['compacted_dice'] for r in results):.4f}; parameters {first['params'][0]:,} -> "
        f"{first['params'][1]:,}; MACs {first['macs'][1] / first['macs'][0]:.1%}; speed "
        f"{first['ms']['dense'] / first['ms']['channels50']:.2f}x (dense {first['ms']['dense']:.1f} ms, compacted "
        f"{first['ms']['channels50']:.1f} ms at batch 64); max |diff| at compaction "
        f"{max(r['max_abs_diff'] for r in results):.1e}"
    )


if __name__ == "__main__":
    main()
