"""Quantization-aware training on sklearn digits, side by side with fp32 fine-tuning, PTQ and torch.ao QAT.

For each seed a DigitsCNN(width=6) is trained in fp32 for 20 epochs; from those same weights:

* ``fp32``: 10 more epochs in fp32 (the reference);
* ``QAT <scale> W<w>/A<a>``: 10 epochs with ``QuantizationAwareTraining`` (calibration in epoch 0,
  fake quantization from epoch 1 on), evaluated with fake quantization;
* ``PTQ W<w>/A<a>``: the fp32 model above, quantized after training with the same bits
  (per-channel min/max weights, activation ranges calibrated on 8 training batches);
* ``torch.ao QAT W8/A8``: ``torch.ao.quantization.prepare_qat`` (x86 qconfig) with its stubs, 10 epochs;
* ``prune 90% + QAT W8/A8``: 20 epochs: ``IterativePruning`` (Taylor) to 90% over epochs 0-9, then
  int8 QAT from the end of epoch 11.

Test accuracy, mean of 3 seeds; runs are spread over 2 worker processes with one thread each.

    python benchmarks/qat_digits.py            # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import statistics
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from common import prepare_torch_ao_qat, quiet_trainer

from lightning_compress import IterativePruning, QuantConfig, QuantizationAwareTraining, convert_to_qat, sparsity
from lightning_compress.core.qat import quantizers
from lightning_compress.demo import DigitsClassifier, DigitsCNN, DigitsDataModule

WIDTH = 6
PRETRAIN, FINETUNE = 20, 10
CONFIGS = [
    "fp32",
    "QAT minmax W8/A8",
    "QAT power_of_two W8/A8",
    "QAT learned W4/A8",
    "QAT minmax W4/A8",
    "QAT learned W2/A8",
    "PTQ W8/A8",
    "PTQ W4/A8",
    "PTQ W2/A8",
    "torch.ao QAT W8/A8",
    "prune 90% + QAT W8/A8",
]


def _setup(seed: int) -> tuple[DigitsDataModule, DigitsClassifier]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, verbose=False)
    return DigitsDataModule(seed=seed), DigitsClassifier(DigitsCNN(WIDTH))


def pretrain(seed: int, path: str) -> None:
    data, module = _setup(seed)
    quiet_trainer(PRETRAIN, []).fit(module, data)
    torch.save(module.net.state_dict(), path)


def _test(module: pl.LightningModule, data: DigitsDataModule) -> float:
    return 100 * quiet_trainer(1, []).test(module, data, verbose=False)[0]["test_acc"]


def post_training_quantize(module: DigitsClassifier, data: DigitsDataModule, wbits: int, abits: int) -> None:
    convert_to_qat(module, QuantConfig(wbits, abits, "minmax"))
    module.eval()
    for _, q in quantizers(module):
        q.train()
        q.observer_enabled = True
    data.setup()
    with torch.no_grad():
        for i, (x, _) in enumerate(data.train_dataloader()):
            if i == 8:
                break
            module(x)
        module(x)  # weights observed as well
    for _, q in quantizers(module):
        q.observer_enabled = False
        q.fake_quant_enabled = True
        q.eval()


def run(config: str, seed: int, weights: str) -> dict[str, Any]:
    data, module = _setup(seed)
    module.net.load_state_dict(torch.load(weights, weights_only=True))
    bits = {"W8/A8": (8, 8), "W4/A8": (4, 8), "W2/A8": (2, 8)}
    result: dict[str, Any] = {}
    if config in ("fp32",) or config.startswith("PTQ"):
        quiet_trainer(FINETUNE, []).fit(module, data)
        if config.startswith("PTQ"):
            post_training_quantize(module, data, *bits[config.split()[-1]])
    elif config.startswith("QAT"):
        _, scale, wa = config.split()
        qat = QuantizationAwareTraining(*bits[wa], scale=scale, start_epoch=0, shift_search=scale == "power_of_two")
        quiet_trainer(FINETUNE, [qat]).fit(module, data)
    elif config.startswith("torch.ao"):
        module.net = prepare_torch_ao_qat(module.net)
        quiet_trainer(FINETUNE, []).fit(module, data)
    elif config.startswith("prune"):
        pruning = IterativePruning(0.9, importance="taylor", start_epoch=0, end_epoch=10, every_n_steps=5)
        qat = QuantizationAwareTraining(8, 8, start_epoch=11)
        quiet_trainer(2 * FINETUNE, [pruning, qat]).fit(module, data)
        result["sparsity"] = sparsity(module)
    result["acc"] = _test(module, data)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "qat_digits.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        paths = {s: f"{tmp}/pretrained_{s}.pt" for s in args.seeds}
        pool.starmap(pretrain, [(s, paths[s]) for s in args.seeds])
        jobs = [(c, s, paths[s]) for c in CONFIGS for s in args.seeds]
        outputs = pool.starmap(run, jobs)
    results: dict[str, list[dict[str, Any]]] = {}
    for (config, _, _), out in zip(jobs, outputs, strict=True):
        results.setdefault(config, []).append(out)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    fp32 = statistics.mean(r["acc"] for r in results["fp32"])
    print(f"\nDigitsCNN(width={WIDTH}): {PRETRAIN} epochs fp32, then {FINETUNE} epochs per row; seeds {args.seeds}\n")
    print("| configuration | test accuracy | vs fp32 | per seed |\n|---|---|---|---|")
    for config in CONFIGS:
        runs = results[config]
        acc = statistics.mean(r["acc"] for r in runs)
        extra = f"; sparsity {100 * statistics.mean(r['sparsity'] for r in runs):.1f}%" if "sparsity" in runs[0] else ""
        seeds = " / ".join(f"{r['acc']:.2f}" for r in runs)
        print(f"| {config} | {acc:.2f}% | {acc - fp32:+.2f} | {seeds}{extra} |")


if __name__ == "__main__":
    main()
