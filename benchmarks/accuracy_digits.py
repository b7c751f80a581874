"""Accuracy at 90/95/98% sparsity on sklearn digits: IterativePruning vs Lightning's ModelPruning.

Same CNN (lightning_compress.demo.DigitsCNN(width=6), 26.7k parameters, dense ~98.4%), same
stratified 70/30 split, same 30 epochs of Adam, pruning between epochs 5 and 20 (the target is
reached after epoch 20) with a cubic schedule, mean of 3 seeds. Runs are spread over 2 worker
processes with one thread each; every run is deterministic.

    python benchmarks/accuracy_digits.py            # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from common import model_pruning, quiet_trainer

from lightning_compress import IterativePruning, sparsity
from lightning_compress.demo import DigitsClassifier, DigitsCNN, DigitsDataModule

warnings.filterwarnings("ignore")
START, END, EPOCHS = 5, 20, 30


def run(method: str, target: float, seed: int, width: int) -> dict[str, float]:
    torch.set_num_threads(1)  # two runs side by side on two cores
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    module = DigitsClassifier(DigitsCNN(width))
    callbacks: list[pl.Callback] = []
    if method == "ours-magnitude":  # the defaults before the zoo chose a step cadence: one event per epoch
        callbacks.append(
            IterativePruning(target, importance="magnitude", start_epoch=START, end_epoch=END, every_n_epochs=1)
        )
    elif method == "ours-taylor":
        callbacks.append(
            IterativePruning(target, importance="taylor", start_epoch=START, end_epoch=END, every_n_epochs=1)
        )
    elif method == "ours-taylor-steps":  # the same window, pruning every 5 optimizer steps (4 times per epoch)
        callbacks.append(
            IterativePruning(target, importance="taylor", start_epoch=START, end_epoch=END, every_n_steps=5)
        )
    elif method == "ours-taylor-steps-regrow":  # the same, exchanging 10% of the kept weights at every event
        callbacks.append(
            IterativePruning(target, importance="taylor", start_epoch=START, end_epoch=END, every_n_steps=5, regrow=0.1)
        )
    elif method.startswith("ModelPruning"):
        callbacks.append(model_pruning(target, START, END, method.endswith("+LTH"), module))
    trainer = quiet_trainer(EPOCHS, callbacks)
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test_acc"]
    return {"acc": 100 * acc, "sparsity": sparsity(module), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--width", type=int, default=6, help="channels of the first conv layer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "ours-magnitude",
            "ours-taylor",
            "ours-taylor-steps",
            "ours-taylor-steps-regrow",
            "ModelPruning",
            "ModelPruning+LTH",
        ],
    )
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "accuracy_digits.json"))
    args = parser.parse_args()
    methods = args.methods
    jobs = [("dense", 0.0, s, args.width) for s in args.seeds]
    jobs += [(m, lv, s, args.width) for m in methods for lv in args.levels for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        outputs = pool.starmap(run, jobs)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (method, level, _, _), out in zip(jobs, outputs, strict=True):
        results.setdefault(method, {}).setdefault("0" if method == "dense" else str(level), []).append(out)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    dense = statistics.mean(r["acc"] for r in results["dense"]["0"])
    n_params = sum(p.numel() for p in DigitsCNN(args.width).parameters())
    print(f"\nDigitsCNN(width={args.width}), {n_params} parameters; dense: {dense:.2f}% (mean of seeds {args.seeds})\n")
    print("| method | " + " | ".join(f"{100 * lv:g}% sparsity" for lv in args.levels) + " |")
    print("|---|" + "---|" * len(args.levels))
    for method in methods:
        cells = []
        for level in args.levels:
            runs = results[method][str(level)]
            acc = statistics.mean(r["acc"] for r in runs)
            sp = statistics.mean(r["sparsity"] for r in runs)
            cells.append(f"{acc:.2f}% ({acc - dense:+.2f}; {100 * sp:.1f}% zero)")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
