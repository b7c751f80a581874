"""Session 20's held-out pairs, written by a new-user trial (AD) after the defaults were chosen: one fit per call.

    python benchmarks/heldout_session20.py MODEL METHOD TARGET SEED     # prints one `RESULT {json}` line, 10-40 s

MODEL: conv1d (the 8 rows of a digits image as a sequence, 3 Conv1d with BatchNorm1d), mixer (MLP-Mixer on 2x2
patches of digits, LayerNorm), mlpln (30-256-256-128-2 MLP with LayerNorm and dropout on breast_cancer).
METHOD: dense, ours (IterativePruning(TARGET, start_epoch=4, end_epoch=16), all else default), ourslamp (the same
with importance="lamp"), mp / mplth (Lightning's ModelPruning, global L1, the same cubic schedule per epoch, without
/ with lottery-ticket rewinding). 24 epochs of Adam; a 70/30 split per seed. BENCHMARKS.md, "Session 20", holds the
table (means of seeds 0 and 1; the mixer also seed 2).
"""

import argparse
import json
import logging
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
import lightning.pytorch as pl
import numpy as np
import torch
from common import quiet_trainer
from lightning.pytorch.callbacks import ModelPruning
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning

torch.set_num_threads(1)
for n in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(n).setLevel(logging.WARNING)

EPOCHS, START, END = 24, 4, 16


# ---------------- models (none written by the project)
class RowConv1d(nn.Module):
    """Digits image as a sequence of 8 rows (8 features each): 1-D CNN over rows, BN, global pool."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 64, 3, padding=1)
        self.b1 = nn.BatchNorm1d(64)
        self.c2 = nn.Conv1d(64, 128, 3, padding=1)
        self.b2 = nn.BatchNorm1d(128)
        self.c3 = nn.Conv1d(128, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 8, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: (B, 64)
        x = x.view(-1, 8, 8).transpose(1, 2)  # (B, C=8 columns, L=8 rows)
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.head(torch.relu(self.fc(x.flatten(1))))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, tok_hidden, ch_hidden):
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.t1 = nn.Linear(tokens, tok_hidden)
        self.t2 = nn.Linear(tok_hidden, tokens)
        self.n2 = nn.LayerNorm(dim)
        self.m1 = nn.Linear(dim, ch_hidden)
        self.m2 = nn.Linear(ch_hidden, dim)

    def forward(self, x):  # (B, T, D)
        y = self.n1(x).transpose(1, 2)
        x = x + self.t2(nn.functional.gelu(self.t1(y))).transpose(1, 2)
        return x + self.m2(nn.functional.gelu(self.m1(self.n2(x))))


class Mixer(nn.Module):
    """MLP-Mixer on 2x2 patches of the 8x8 digits: 16 tokens of 4 pixels, dim 64, 3 blocks."""

    def __init__(self, dim=64, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.Sequential(*[MixerBlock(16, dim, 64, 192) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = x.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        x = self.blocks(self.embed(x))
        return self.head(self.norm(x).mean(1))


class MLPLN(nn.Module):
    """MLP with LayerNorm and dropout on breast cancer (30 features, 2 classes)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(30, 256),
            nn.LayerNorm(256),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(256, 256),
            nn.LayerNorm(256),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.LayerNorm(128),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(128, 2),
        )

    def forward(self, x):
        return self.net(x)


def data(model, seed):
    if model == "mlpln":
        X, y = load_breast_cancer(return_X_y=True)
    else:
        X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd

    def t(a, d):
        return torch.tensor(np.asarray(a), dtype=d)

    g = torch.Generator().manual_seed(seed)
    bs = 32 if model == "mlpln" else 64
    train = TensorDataset(t(Xtr, torch.float32), t(ytr, torch.long))
    test = TensorDataset(t(Xte, torch.float32), t(yte, torch.long))
    return DataLoader(train, batch_size=bs, shuffle=True, generator=g), DataLoader(test, batch_size=256)


class Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, b, i):
        x, y = b
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, b, i):
        x, y = b
        out = self(x)
        self.log("test_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def cubic(target, k):  # sparsity after k epochs (my own cubic: Zhu & Gupta)
    if k <= START:
        return 0.0
    if k >= END:
        return target
    return target * (1 - (1 - (k - START) / (END - START)) ** 3)


def prunable(net):
    return [(m, "weight") for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["conv1d", "mixer", "mlpln"])
    parser.add_argument("method", choices=["dense", "ours", "ourslamp", "mp", "mplth"])
    parser.add_argument("target", type=float)
    parser.add_argument("seed", type=int)
    args = parser.parse_args()  # trial DB: `--help` was an IndexError
    model, method, target, seed = args.model, args.method, args.target, args.seed
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    train, test = data(model, seed)
    net = {"conv1d": RowConv1d, "mixer": Mixer, "mlpln": MLPLN}[model]()
    module = Module(net)
    cbs = []
    if method == "ours":
        cbs.append(IterativePruning(target, start_epoch=START, end_epoch=END))
    elif method == "ourslamp":
        cbs.append(IterativePruning(target, start_epoch=START, end_epoch=END, importance="lamp"))
    elif method in ("mp", "mplth"):

        def amount(epoch):  # after epoch `epoch` ends, sparsity must be cubic(epoch+1); prune compounds
            before, after = cubic(target, epoch), cubic(target, epoch + 1)
            return 0.0 if after <= before else 1 - (1 - after) / (1 - before)

        cbs.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=prunable(net),
                amount=amount,
                use_global_unstructured=True,
                use_lottery_ticket_hypothesis=(method == "mplth"),
                verbose=0,
            )
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = quiet_trainer(EPOCHS, cbs)
        tr.fit(module, train)
        acc = tr.test(module, test, verbose=False)[0]["test_acc"]
    ws = [m.weight for m, _ in prunable(net)]
    zeros = sum(int((w == 0).sum()) for w in ws)
    total = sum(w.numel() for w in ws)
    out = {
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "acc": 100 * acc,
        "sparsity": zeros / total,
        "params": sum(p.numel() for p in net.parameters()),
        "per_layer": [round(float((w == 0).float().mean()), 4) for w in ws],
        "seconds": round(time.perf_counter() - t0, 1),
        "warnings": sorted(
            {
                f"{w.category.__name__}: {str(w.message)[:300]}"
                for w in caught
                if "lightning_compress" in (w.filename or "") or "Pruning" in str(w.message)
            }
        ),
    }
    if method == "ours":
        out["selected"] = [(t.name if hasattr(t, "name") else str(t)) for t in cbs[0].pruner.targets][:20]
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
