"""Sweep sparsity x bits on sklearn digits; write a CSV and the accuracy-vs-size Pareto chart.

One dense CNN is trained first; every grid point fine-tunes a copy of it with ``IterativePruning``
(Taylor) and, below 32 bits, ``QuantizationAwareTraining`` (LSQ scales), then saves it with
``save_compressed``. The chart marks the Pareto front: the points no other point beats on both
size and accuracy.

    python examples/sweep.py [--sparsity 0 0.5 0.8 0.9 0.95] [--bits 32 8 4] [--out sweep] [--fast]
"""

from __future__ import annotations

import argparse
import copy
import csv
import pathlib
import warnings

import lightning.pytorch as pl
import torch

from lightning_compress import IterativePruning, QuantizationAwareTraining, save_compressed
from lightning_compress.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )


def pareto(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """Points with no other point at most as large and at least as accurate (one strictly better)."""
    front = []
    for p in points:
        dominated = any(
            q["bytes"] <= p["bytes"]
            and q["accuracy"] >= p["accuracy"]
            and (q["bytes"], q["accuracy"]) != (p["bytes"], p["accuracy"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--out", default="sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="few epochs (a smoke run)")
    args = parser.parse_args()
    for bits in args.bits:
        if bits != 32 and not 2 <= bits <= 8:
            parser.error(f"--bits {bits}: use 32 (float) or 2..8")
    dense_epochs, tune_epochs = (2, 3) if args.fast else (10, 8)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(seed=args.seed)
    dense = DigitsClassifier()
    _trainer(dense_epochs, []).fit(dense, data)

    rows: list[dict[str, float]] = []
    for sparsity in args.sparsity:
        for bits in args.bits:
            pl.seed_everything(args.seed, verbose=False)
            model = copy.deepcopy(dense)
            callbacks: list[pl.Callback] = []
            if sparsity > 0:
                end = max(1, tune_epochs // 2)
                callbacks.append(IterativePruning(sparsity, importance="taylor", start_epoch=0, end_epoch=end))
            if bits != 32:
                callbacks.append(QuantizationAwareTraining(bits, 8, scale="learned", start_epoch=tune_epochs - 3))
            trainer = _trainer(tune_epochs, callbacks)
            trainer.fit(model, data)
            accuracy = trainer.test(model, data, verbose=False)[0]["test_acc"]
            report = save_compressed(model, out / f"digits_s{sparsity:g}_b{bits}.lcz")
            rows.append(
                {
                    "sparsity": sparsity,
                    "bits": bits,
                    "accuracy": 100 * accuracy,
                    "bytes": report.file_bytes,
                    "ratio": report.compression_ratio,
                }
            )
            print(
                f"sparsity {sparsity:>5.2f}  bits {bits:>2}  accuracy {100 * accuracy:6.2f}%  "
                f"{report.file_bytes / 1024:8.1f} KiB  {report.compression_ratio:5.1f}x",
                flush=True,
            )

    front = pareto(rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sparsity", "bits", "accuracy", "bytes", "ratio", "pareto"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "pareto": row in front})
    _chart(rows, front, out / "pareto.png")
    print(f"\nWrote {out / 'sweep.csv'} and {out / 'pareto.png'}")


def _chart(rows: list[dict[str, float]], front: list[dict[str, float]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axis = plt.subplots(figsize=(7, 5))
    for bits in sorted({int(r["bits"]) for r in rows}, reverse=True):
        mine = [r for r in rows if r["bits"] == bits]
        axis.scatter(
            [r["bytes"] / 1024 for r in mine],
            [r["accuracy"] for r in mine],
            label="float32" if bits == 32 else f"int{bits} weights",
        )
        for r in mine:
            axis.annotate(
                f"{100 * r['sparsity']:.0f}%",
                (r["bytes"] / 1024, r["accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    axis.plot(
        [r["bytes"] / 1024 for r in front],
        [r["accuracy"] for r in front],
        color="black",
        linewidth=1,
        label="Pareto front",
    )
    axis.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # "30", not "3x10^1": labels of a narrow range ran together
    axis.xaxis.set_major_formatter(plain)
    axis.xaxis.set_minor_formatter(plain)
    axis.set_xlabel("compressed file size (KiB, log scale)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("sklearn digits: accuracy vs size (labels: sparsity)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
