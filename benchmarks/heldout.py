"""Held-out shapes: the defaults against ModelPruning on three model/data pairs no default was chosen on.

Written by a new-user trial (session 12), kept as it ran: nothing in it was tuned, and the defaults were not
changed after it. Pairs (nothing downloaded):

* ``widemlp-cancer``: a 30-4096-2 MLP with dropout on scikit-learn's breast-cancer table (70/30 split);
* ``dwsep-glyphs``: a MobileNet-v1-style net (depthwise 3x3 + pointwise 1x1 convs with BatchNorm) on 36
  characters drawn at 16x16 in matplotlib's 20 bundled fonts, rotated, shifted and noised (70/30 split);
* ``cnn1d-stdlib``: a byte embedding, three dilated Conv1d layers and an MLP saying which of 8 standard-library
  packages a 64-byte window of source code comes from (train on the first 75% of each package, test on the rest).

30 epochs of Adam (1e-3, batch 64), pruning at the end of epochs 5-19: ``IterativePruning(t, start_epoch=5,
end_epoch=20)`` with every other argument at its default, against Lightning's ``ModelPruning`` (global L1 on every
Linear/Conv weight) following the same cubic curve per epoch, with and without the lottery ticket option (and, on
the MLP, a constant per-epoch fraction). Seeds 11 and 12. One thread, one fit at a time.

    python benchmarks/heldout.py            # 72 fits, ~20 minutes on one core
    python benchmarks/heldout.py --pairs dwsep-glyphs --methods ours --out benchmarks/results/heldout_session14.jsonl
                                            # session 14's defaults on the glyph CNN (6 fits)
    python benchmarks/heldout.py --pairs widemlp-cancer cnn1d-stdlib --methods ours-lamp \
        --out benchmarks/results/heldout_lamp_session14.jsonl        # LAMP on the pairs without BatchNorm (12 fits)
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sysconfig
import tempfile
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning

EPOCHS, START, END = 30, 5, 20
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
CACHE = pathlib.Path(tempfile.gettempdir()) / "lightning_compress_heldout"
FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
]  # fmt: skip
CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PACKAGES = ["asyncio", "email", "json", "unittest", "xml", "tkinter", "multiprocessing", "concurrent"]
PAIRS = ["widemlp-cancer", "dwsep-glyphs", "cnn1d-stdlib"]


def glyphs(n_aug: int = 4, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    cached = CACHE / f"glyphs_{n_aug}_{size}.npz"
    if cached.exists():
        data = np.load(cached)
        return data["x"], data["y"]
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    root = pathlib.Path(matplotlib.get_data_path()) / "fonts/ttf"
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in FONTS:
        for index, char in enumerate(CHARS):
            for _ in range(n_aug):
                font = ImageFont.truetype(str(root / name), int(rng.integers(26, 36)))
                image = Image.new("L", (48, 48), 0)
                at = (24 + rng.integers(-4, 5), 24 + rng.integers(-4, 5))
                ImageDraw.Draw(image).text(at, char, fill=255, font=font, anchor="mm")
                image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
                pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
                xs.append(np.clip(pixels + rng.normal(0, 0.08, pixels.shape).astype(np.float32), 0, 1))
                ys.append(index)
    x, y = np.stack(xs)[:, None], np.array(ys)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cached, x=x, y=y)
    return x, y


def stdlib_windows(context: int = 64) -> tuple[np.ndarray, ...]:
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(0)
    per_class = 250
    out: dict[str, list[np.ndarray]] = {"xtr": [], "ytr": [], "xte": [], "yte": []}
    for index, package in enumerate(PACKAGES):
        files = sorted(p for p in (lib / package).rglob("*.py") if "test" not in p.parts)
        data = np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)
        n = len(data) // context
        windows = data[: n * context].reshape(n, context)
        windows = windows[(windows != 32).sum(1) > context // 2]  # drop near-empty windows
        cut = int(0.75 * len(windows))
        train = windows[:cut][rng.choice(cut, min(per_class, cut), replace=False)]
        rest = len(windows) - cut
        test = windows[cut:][rng.choice(rest, min(per_class * 3 // 7, rest), replace=False)]
        out["xtr"].append(train)
        out["ytr"].append(np.full(len(train), index))
        out["xte"].append(test)
        out["yte"].append(np.full(len(test), index))
    return tuple(np.concatenate(out[k]) for k in ("xtr", "ytr", "xte", "yte"))


def split(pair: str, seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.model_selection import train_test_split

    if pair == "dwsep-glyphs":
        x, y = glyphs()
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
        return torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte)
    if pair == "cnn1d-stdlib":  # a fixed split by position: the seed changes the initialization and order only
        xtr, ytr, xte, yte = stdlib_windows()
        as_long = [torch.tensor(a.astype(np.int64)) for a in (xtr, xte)]
        return as_long[0], torch.tensor(ytr), as_long[1], torch.tensor(yte)
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(xtr)
    return (
        torch.tensor(scaler.transform(xtr), dtype=torch.float32),
        torch.tensor(ytr),
        torch.tensor(scaler.transform(xte), dtype=torch.float32),
        torch.tensor(yte),
    )


def _dwsep(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )  # fmt: skip


class CharCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.convs = nn.Sequential(
            nn.Conv1d(32, 48, 5, padding=2), nn.ReLU(),
            nn.Conv1d(48, 48, 5, padding=4, dilation=2), nn.ReLU(),
            nn.Conv1d(48, 96, 3, padding=4, dilation=4), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(self.emb(x).transpose(1, 2))
        return self.head(torch.cat([h.amax(2), h.mean(2)], 1))


def make_model(pair: str) -> nn.Module:
    if pair == "dwsep-glyphs":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            _dwsep(16, 32, 2), _dwsep(32, 64, 1), _dwsep(64, 96, 2), _dwsep(96, 128, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 36),
        )  # fmt: skip
    if pair == "cnn1d-stdlib":
        return CharCNN()
    return nn.Sequential(nn.Linear(30, 4096), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4096, 2))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _cubic(target: float, k: int, n: int) -> float:
    return target * (1 - (1 - k / n) ** 3)


def model_pruning(target: float, lottery: bool, module: nn.Module, kind: str) -> ModelPruning:
    n = END - START
    if kind == "cubic":  # the cubic curve of IterativePruning's default, one step per epoch (ModelPruning compounds)

        def amount(epoch: int) -> float:
            k = epoch - START + 1
            if k < 1 or k > n:
                return 0.0
            return 1.0 - (1.0 - _cubic(target, k, n)) / (1.0 - _cubic(target, k - 1, n))

    else:  # a constant fraction per epoch
        fraction = 1 - (1 - target) ** (1 / n)

        def amount(epoch: int) -> float:
            return fraction if START <= epoch < END else 0.0

    params = [(m, "weight") for m in module.modules() if isinstance(m, PRUNABLE)]
    return ModelPruning(
        "l1_unstructured", parameters_to_prune=params, amount=amount, use_global_unstructured=True,
        use_lottery_ticket_hypothesis=lottery, verbose=0,
    )  # fmt: skip


def fit(pair: str, method: str, target: float, seed: int) -> dict:
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = split(pair, seed)
    pl.seed_everything(seed, verbose=False)
    module = Classifier(make_model(pair))
    train = DataLoader(
        TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    callbacks: list[pl.Callback] = []
    if method == "ours":  # the defaults of the code that runs (importance="auto" since session 14)
        callbacks.append(IterativePruning(target, start_epoch=START, end_epoch=END))
    elif method in ("ours-magnitude", "ours-lamp"):  # the defaults before session 14; LAMP everywhere
        importance = method.split("-")[1]
        callbacks.append(IterativePruning(target, importance=importance, start_epoch=START, end_epoch=END))
    elif method.startswith("MP"):  # MP-cubic, MP-cubic-LTH, MP-const, MP-const-LTH
        callbacks.append(model_pruning(target, method.endswith("LTH"), module, method.split("-")[1]))
    trainer = pl.Trainer(
        max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(module, DataLoader(TensorDataset(xte, yte), batch_size=512), verbose=False)[0]
    weights = [m.weight for m in module.modules() if isinstance(m, PRUNABLE)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "pair": pair, "method": method, "target": target, "seed": seed, "acc": 100 * accuracy["test_acc"],
        "sparsity": zeros, "fit_s": seconds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    parser.add_argument("--methods", nargs="+", help="default: dense, ours and ModelPruning's configurations")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "heldout.jsonl"))
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with open(args.out, "a") as out:
        for pair in args.pairs:
            for seed in args.seeds:
                runs = [] if args.methods and "dense" not in args.methods else [("dense", 0.0)]
                methods = ["ours", "MP-cubic", "MP-cubic-LTH"]
                methods += ["MP-const", "MP-const-LTH"] if pair == "widemlp-cancer" else []
                methods = [m for m in args.methods if m != "dense"] if args.methods else methods
                runs += [(m, t) for t in args.targets for m in methods]
                for method, target in runs:
                    record = fit(pair, method, target, seed)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    print(json.dumps(record))


if __name__ == "__main__":
    main()
