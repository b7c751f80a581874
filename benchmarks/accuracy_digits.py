"""Accuracy at 90/95/98% sparsity on sklearn digits: IterativePruning vs Lightning's ModelPruning.

Same CNN (lightning_compress.demo.DigitsCNN), same stratified 70/30 split, same 30 epochs of Adam,
pruning at the end of epochs 5..19 with a cubic schedule, mean of 3 seeds, all in one process.

    python benchmarks/accuracy_digits.py            # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import IterativePruning, PruningSchedule, sparsity
from lightning_compress.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore")
START, END, EPOCHS = 5, 20, 30


def model_pruning(target: float, lottery: bool, model: nn.Module) -> ModelPruning:
    """ModelPruning with global L1 and the same cubic sparsity after every epoch as ours."""
    schedule = PruningSchedule("cubic", target, START, END)

    def amount(epoch: int) -> float:  # torch.nn.utils.prune compounds: prune a fraction of what is left
        before, after = schedule.sparsity_at(epoch), schedule.sparsity_at(epoch + 1)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=params,
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=lottery,
        verbose=0,
    )


def run(method: str, target: float, seed: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    module = DigitsClassifier()
    callbacks: list[pl.Callback] = []
    if method == "ours-magnitude":
        callbacks.append(IterativePruning(target, start_epoch=START, end_epoch=END))
    elif method == "ours-taylor":
        callbacks.append(IterativePruning(target, importance="taylor", start_epoch=START, end_epoch=END))
    elif method.startswith("ModelPruning"):
        callbacks.append(model_pruning(target, method.endswith("+LTH"), module))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test_acc"]
    return {"acc": 100 * acc, "sparsity": sparsity(module), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "accuracy_digits.json"))
    args = parser.parse_args()
    methods = ["ours-magnitude", "ours-taylor", "ModelPruning", "ModelPruning+LTH"]
    results: dict[str, dict[str, list[dict[str, float]]]] = {"dense": {"0": [run("dense", 0.0, s) for s in args.seeds]}}
    for method in methods:
        results[method] = {}
        for level in args.levels:
            results[method][str(level)] = [run(method, level, s) for s in args.seeds]
            print(method, level, [round(r["acc"], 2) for r in results[method][str(level)]], flush=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    dense = statistics.mean(r["acc"] for r in results["dense"]["0"])
    print(f"\ndense: {dense:.2f}% (mean of seeds {args.seeds})\n")
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
