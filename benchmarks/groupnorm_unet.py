"""Channel pruning of a GroupNorm network: a ``diffusers`` UNet2DModel trained as a DDPM denoiser on digits.

Until session 40 a GroupNorm left the channels around it whole, and channel pruning of this UNet reached only its
time-embedding MLP (trial ES: 176,849 -> 166,545 parameters, 1.00x). A GroupNorm's group of channels is now the unit.

Per seed: a dense UNet (176,849 parameters; the trial's configuration) is trained ``--dense-epochs`` on the digits
upsampled to 16x16 (noise-prediction loss at random timesteps of a linear 1000-step schedule); from those weights,
``--finetune-epochs`` more of

* **dense**: plain training (the same budget);
* **channels 50%**: ``IterativePruning(0.5, granularity="channel")`` with every other argument at its default, then
  ``compact()`` (checked exact on a batch).

Validation: the noise-prediction MSE on 297 held-out images at fixed noise and timesteps (lower is better). Speed:
eager inference at batch 64, one thread, interleaved rounds (median process CPU time) of the seed-0 models.

    pip install diffusers   # not a dependency of the package
    python benchmarks/groupnorm_unet.py            # ~10 minutes on one CPU core
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
from diffusers import UNet2DModel
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
STEPS = 1000


def unet() -> nn.Module:
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip


def images() -> tuple[Tensor, Tensor]:
    """Digits 16x16 in [-1, 1]: 1,500 for training, 297 held out (a fixed split)."""
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    x = nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1500]], x[order[1500:]]


class Denoiser(pl.LightningModule):
    """Predicts the noise added at a random timestep (DDPM); logs ``val_mse`` on fixed noise and timesteps."""

    def __init__(self, net: nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        betas = torch.linspace(1e-4, 0.02, STEPS)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0), persistent=False)
        self.example_input_array = (torch.zeros(2, 1, 16, 16), torch.tensor([10, 500]))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t).sample

    def _loss(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return nn.functional.mse_loss(self(a.sqrt() * x + (1 - a).sqrt() * noise, t), noise)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        t = torch.randint(0, STEPS, (len(x),), device=x.device)
        return self._loss(x, torch.randn_like(x), t)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, noise, t = batch
        self.log("val_mse", self._loss(x, noise, t))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    train, held = images()
    g = torch.Generator().manual_seed(1234)  # the same noise and timesteps for every method and seed
    val = TensorDataset(held, torch.randn(held.shape, generator=g), torch.randint(0, STEPS, (len(held),), generator=g))
    shuffle = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(train), 64, shuffle=True, generator=shuffle), DataLoader(val, 297)


def validate(module: Denoiser, val: DataLoader) -> float:
    return float(quiet_trainer(0, []).validate(module, val, verbose=False)[0]["val_mse"])


def run(seed: int, dense_epochs: int, finetune_epochs: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    torch.set_num_threads(1)
    train, val = loaders(seed)
    dense = Denoiser(unet())
    quiet_trainer(dense_epochs, []).fit(dense, train)
    x = next(iter(val))
    inputs = (x[0][:64], x[2][:64])
    out: dict[str, Any] = {"seed": seed, "dense_start": validate(dense, val)}
    figures, models = dense_vs_channels(
        dense, seed, finetune_epochs, loaders(seed + 100)[0], val, lambda m: validate(m, val), "mse", inputs
    )
    out.update(figures)
    if seed == 0:
        out["ms"] = interleaved_ms({m: (lambda m=m: models[m](*inputs)) for m in models}, rounds=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "groupnorm_unet.json"))
    args = parser.parse_args()
    results = [run(s, args.dense_epochs, args.finetune_epochs) for s in args.seeds]
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps(r))
    first = results[0]
    print(
        f"validation MSE (mean of seeds {args.seeds}): dense start "
        f"{statistics.mean(r['dense_start'] for r in results):.4f}, dense fine-tune "
        f"{statistics.mean(r['dense_mse'] for r in results):.4f}, channels 50% compacted "
        f"{statistics.mean(r['compacted_mse'] for r in results):.4f}; parameters {first['params'][0]:,} -> "
        f"{first['params'][1]:,}; MACs {first['macs'][1] / first['macs'][0]:.1%}; speed "
        f"{first['ms']['dense'] / first['ms']['channels50']:.2f}x (dense {first['ms']['dense']:.1f} ms, compacted "
        f"{first['ms']['channels50']:.1f} ms at batch 64); max |diff| at compaction "
        f"{max(r['max_abs_diff'] for r in results):.1e}"
    )


if __name__ == "__main__":
    main()
