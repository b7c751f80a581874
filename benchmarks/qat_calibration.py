"""How long QAT calibrates in a fit that ``max_steps`` ends inside its first epoch (the fine-tune shape).

    python benchmarks/qat_calibration.py   # about 6 minutes on 2 CPU cores; writes results/qat_calibration.json

``QuantizationAwareTraining()`` with its defaults (int8 weights per channel, int8 activations per tensor from
observed ranges) calibrates during ``start_epoch`` and switches on when the next epoch starts. Where ``max_steps``
ends the fit inside that epoch, it calibrates on a share of the fit's steps in it (``CALIBRATION_SHARE``) and switches
on after them. This measures candidate shares on zoo pairs (``benchmarks/zoo.py``): each model is pretrained in float
(``PRETRAIN`` optimizer steps), then fine-tuned for ``FINETUNE`` steps in one long epoch with QAT, and the quantized
model is scored on the pair's test split. Side by side: the float fine-tune, and the float fine-tune quantized after
it (post-training, the same int8 recipe calibrated on 8 training batches).

The share is chosen on ``CHOICE`` (two pairs, seeds 0-3) and reported on ``HELD_OUT`` (two other pairs, seeds 4-7);
the table gives accuracy (%, higher is better) or perplexity per byte (lower is better).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import pathlib
import statistics
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # run as a script, like zoo.py

from zoo import PAIRS, ZooModule

import lightning_compress.core.qat_schedule as qat_schedule
from lightning_compress import QuantConfig, QuantizationAwareTraining, calibrate, convert_to_qat, enable_fake_quant

PRETRAIN = 400
FINETUNE = 150
BATCH = 32
SHARES = [0.02, 0.1, 0.25, 0.5]
CHOICE = (["mlp-digits", "bytelm-pydoc"], [0, 1, 2, 3])
HELD_OUT = (["cnnbn-digits", "vit-mnist"], [4, 5, 6, 7])


def long_epoch(pair: str, seed: int, steps: int) -> tuple[DataLoader, DataLoader]:
    """One epoch of ``steps + 50`` random training batches (so ``max_steps`` ends the fit inside it), and the test
    split."""
    x_tr, y_tr, x_te, y_te = PAIRS[pair].data(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(TensorDataset(x_tr, y_tr), replacement=True, num_samples=(steps + 50) * BATCH,
                            generator=generator)  # fmt: skip
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=BATCH, sampler=sampler)
    return train, DataLoader(TensorDataset(x_te, y_te), batch_size=256)


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer."""
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def score(module: ZooModule, test: DataLoader) -> float:
    """Accuracy in percent, or perplexity per byte for the language model."""
    result = trainer().test(module, test, verbose=False)[0]
    return math.exp(result["test_loss"]) if module.lm else 100.0 * result["test_acc"]


def fine_tune(pretrained: ZooModule, pair: str, seed: int, callbacks: list[pl.Callback]) -> ZooModule:
    module = copy.deepcopy(pretrained)
    train, _ = long_epoch(pair, seed + 100, FINETUNE)
    pl.seed_everything(seed, verbose=False)
    trainer(max_epochs=-1, max_steps=FINETUNE, callbacks=callbacks).fit(module, train)
    return module


def run(pair: str, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    pretrained = ZooModule(PAIRS[pair].model(), PAIRS[pair].lm)
    train, test = long_epoch(pair, seed, PRETRAIN)
    trainer(max_epochs=-1, max_steps=PRETRAIN).fit(pretrained, train)
    row: dict[str, Any] = {"pair": pair, "seed": seed, "pretrained": score(pretrained, test)}
    floated = fine_tune(pretrained, pair, seed, [])
    row["float"] = score(floated, test)
    ptq = copy.deepcopy(floated)
    convert_to_qat(ptq.net, QuantConfig())
    batches = [x for x, _ in list(long_epoch(pair, seed + 200, 8)[0])[:8]]
    calibrate(ptq.net, batches)
    enable_fake_quant(ptq.net)
    row["ptq"] = score(ptq, test)
    for share in SHARES:
        qat_schedule.CALIBRATION_SHARE = share
        start = time.perf_counter()
        quantized = fine_tune(pretrained, pair, seed, [QuantizationAwareTraining()])
        row[f"share {share}"] = score(quantized, test)
        row[f"seconds {share}"] = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["pretrained", "float", "ptq", *(f"share {s}" for s in SHARES)]
    lines = ["| pair | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        mine = [r for r in rows if r["pair"] == pair]
        means = [statistics.mean(r[c] for r in mine) for c in columns]
        seeds = ",".join(str(r["seed"]) for r in mine)
        lines.append(f"| {pair} | {seeds} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "qat_calibration.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    default = qat_schedule.CALIBRATION_SHARE
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, (pairs, seeds) in {"choice": CHOICE, "held_out": HELD_OUT}.items():
            results[name] = [run(pair, seed) for pair in pairs for seed in seeds]
            sys.stdout.write(f"\n{name}\n{table(results[name])}\n")
            sys.stdout.flush()
    finally:
        qat_schedule.CALIBRATION_SHARE = default
    minutes = (time.perf_counter() - start) / 60
    sys.stdout.write(f"\nwall time {minutes:.1f} min\n")
    pathlib.Path(args.out).write_text(json.dumps({"minutes": round(minutes, 1), **results}, indent=1))


if __name__ == "__main__":
    main()
