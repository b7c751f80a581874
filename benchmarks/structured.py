"""Channel pruning to 50% of channels: IterativePruning(granularity="channel") + compact() vs Torch-Pruning.

Two models on sklearn digits: ``DigitsCNN(32)`` (conv-conv-BN-linear-linear) and
``DigitsResNet(64, blocks=3)`` (stem + 3 residual blocks with BatchNorm, the kind of model
Torch-Pruning's 3.1x figure was measured on). Per seed, one dense model is trained for
``--dense-epochs``; from those same weights:

* **dense**: ``--finetune-epochs`` more epochs of plain training (same budget as the others);
* **ours**: the same epochs with ``IterativePruning(0.5, granularity="channel", scope="layer",
  importance="taylor")`` pruning during the first half (cubic schedule), then ``compact()``;
* **Torch-Pruning**: its ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` (its default
  L2 criterion), ``pruning_ratio=0.5``, head ignored, one shot; then the same epochs of training.

Accuracy is the test accuracy (30% split) after those epochs, mean of ``--seeds``. Speed is
eager PyTorch inference at batch 256 with one thread: interleaved rounds, median process CPU
time of the seed-0 models; a ratio against the dense model measured in the same rounds.

    python benchmarks/structured.py                # ~12 minutes on 2 CPU cores
    python benchmarks/structured.py --speed-check  # ~1 minute: only the two compacted models' speed
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
import torch_pruning as tp
from common import interleaved_ms, quiet_trainer
from torch import nn

from lightning_compress import IterativePruning, compact, prune_
from lightning_compress.demo import DigitsClassifier, DigitsCNN, DigitsDataModule, DigitsResNet

warnings.filterwarnings("ignore")
MODELS = {"DigitsCNN(32)": lambda: DigitsCNN(32), "DigitsResNet(64, blocks=3)": lambda: DigitsResNet(64, blocks=3)}


def _head(net: nn.Module) -> nn.Module:
    return net.head if isinstance(net, DigitsResNet) else net[-1]


def _test(module: DigitsClassifier, data: DigitsDataModule, epochs: int, callbacks: list[pl.Callback]) -> float:
    trainer = quiet_trainer(epochs, callbacks)
    if epochs:
        trainer.fit(module, data)
    return 100 * float(trainer.test(module, data, verbose=False)[0]["test_acc"])


def run(model: str, seed: int, dense_epochs: int, finetune_epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # two runs side by side on two cores
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    dense = DigitsClassifier(MODELS[model]())
    _test(dense, data, dense_epochs, [])
    out: dict[str, Any] = {}

    start = time.perf_counter()
    pl.seed_everything(seed + 100, verbose=False)
    baseline = copy.deepcopy(dense)
    out["dense"] = {"acc": _test(baseline, data, finetune_epochs, []), "net": baseline.net}

    pl.seed_everything(seed + 100, verbose=False)
    ours = copy.deepcopy(dense)
    pruning = IterativePruning(
        0.5, importance="taylor", granularity="channel", scope="layer", start_epoch=0, end_epoch=finetune_epochs // 2
    )
    _test(ours, data, finetune_epochs, [pruning])
    report = compact(ours)
    out["ours"] = {"acc": _test(ours, data, 0, []), "net": ours.net, "channels": report.channels}

    pl.seed_everything(seed + 100, verbose=False)
    theirs = copy.deepcopy(dense)
    pruner = tp.pruner.MetaPruner(
        theirs.net,
        torch.zeros(1, 1, 8, 8),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[_head(theirs.net)],
    )
    pruner.step()
    out["torch-pruning"] = {"acc": _test(theirs, data, finetune_epochs, []), "net": theirs.net}
    for key in out:
        out[key]["params"] = sum(p.numel() for p in out[key]["net"].parameters())
    out["seconds"] = time.perf_counter() - start
    if seed != 0:
        for key in ("dense", "ours", "torch-pruning"):
            del out[key]["net"]
    return out


def speed(nets: dict[str, nn.Module], rounds: int = 40, reps: int = 5) -> dict[str, float]:
    """Median ms per batch of 256 (one thread), interleaved rounds."""
    x = torch.randn(256, 1, 8, 8)
    for net in nets.values():
        net.eval()
    return interleaved_ms({name: (lambda net=net: net(x)) for name, net in nets.items()}, rounds, reps)


def speed_check(rounds: int = 100) -> dict[str, float]:
    """The same random-weight ResNet pruned by both tools, timed alone: is one compacted model faster?"""
    torch.manual_seed(0)
    base = DigitsResNet(64, blocks=3).eval()
    x = torch.zeros(1, 1, 8, 8)
    ours = copy.deepcopy(base)
    prune_(ours, 0.5, granularity="channel", scope="layer", example_inputs=x)
    compact(ours, x)
    theirs = copy.deepcopy(base)
    tp.pruner.MetaPruner(
        theirs,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[theirs.head],
    ).step()
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    return speed({"ours": ours, "torch-pruning": theirs}, rounds=rounds, reps=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "structured.json"))
    parser.add_argument("--speed-check", action="store_true", help="only time both tools' compacted ResNet")
    args = parser.parse_args()
    if args.speed_check:
        ms = speed_check()
        print(
            "same random-weight ResNet, 50% of channels, ms / batch 256 (1 thread): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
        )
        return
    jobs = [(m, s, args.dense_epochs, args.finetune_epochs) for m in MODELS for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        outputs = pool.starmap(run, jobs)
    results: dict[str, Any] = {}
    for (model, seed, _, _), out in zip(jobs, outputs, strict=True):
        entry = results.setdefault(model, {"runs": []})
        if seed == 0:
            entry["ms_batch_256"] = speed({k: out[k]["net"] for k in ("dense", "ours", "torch-pruning")})
            entry["same_shapes"] = [p.shape for p in out["ours"]["net"].parameters()] == [
                p.shape for p in out["torch-pruning"]["net"].parameters()
            ]
        entry["runs"].append(
            {k: {kk: vv for kk, vv in v.items() if kk != "net"} if isinstance(v, dict) else v for k, v in out.items()}
        )
    budget = f"{args.dense_epochs} dense epochs + {args.finetune_epochs} fine-tuning epochs"
    print(f"\n50% of channels, {budget}, seeds {args.seeds}\n")
    print("| model | method | parameters | test accuracy (mean) | vs dense | ms / batch 256 (1 thread) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for model, entry in results.items():
        ms = entry["ms_batch_256"]
        means = {k: statistics.mean(r[k]["acc"] for r in entry["runs"]) for k in ("dense", "ours", "torch-pruning")}
        entry["mean_acc"] = means
        for key, label in (("dense", "dense"), ("ours", "lightning-compress"), ("torch-pruning", "Torch-Pruning")):
            params = entry["runs"][0][key]["params"]
            print(
                f"| {model} | {label} | {params:,} | {means[key]:.2f}% | {means[key] - means['dense']:+.2f} | "
                f"{ms[key]:.2f} | {ms['dense'] / ms[key]:.2f}x |"
            )
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
