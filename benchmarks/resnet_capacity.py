"""How far the zoo's ResNet can go at 95 and 98%: narrow dense ResNets, and every pruning variant tried.

The 14k-parameter ``DigitsResNet(16, 3)`` of ``zoo.py`` keeps about 700 weights at 95% and 280 at 98%. Two
questions, both answered with ``zoo.run`` (same data, optimizer, 30 epochs, pruning window, one thread):

* ``--part dense``: what do dense ResNets of that many weights reach? ``DigitsResNet(width, blocks)`` with
  110 to 762 weights, no pruning, seeds 0-2.
* ``--part variants``: does any pruning variant come near dense at 98%? The defaults (LAMP on this model) and five
  variants of them (regrowth, linear and geometric schedules, Taylor scores, no floor), plus ModelPruning, on the
  choice seeds 10-12 (none of them is a reported seed, and none was adopted from this run).

    python benchmarks/resnet_capacity.py --part dense        # 18 fits, ~1 min on 2 cores
    python benchmarks/resnet_capacity.py --part variants     # 42 fits, ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import statistics
from typing import Any

import zoo

from lightning_compress.demo import DigitsResNet

NARROW = [(2, 1), (3, 1), (4, 1), (4, 2), (6, 1), (16, 3)]  # (width, blocks); (16, 3) is the zoo's ResNet
VARIANTS: dict[str, dict[str, Any]] = {
    "lamp": {"every_n_steps": 1, "importance": "lamp"},  # what importance="auto" picks here: the defaults
    "lamp-regrow": {"every_n_steps": 1, "importance": "lamp", "regrow": 0.1},
    "lamp-linear": {"every_n_steps": 1, "importance": "lamp", "schedule": "linear"},
    "lamp-geometric": {"every_n_steps": 1, "importance": "lamp", "schedule": "geometric"},
    "lamp-nofloor": {"every_n_steps": 1, "importance": "lamp", "min_density": "0"},
    "taylor": zoo.CANDIDATES["taylor"],
}


def register() -> None:
    """The narrow ResNets as zoo pairs and the variants as zoo candidates (in this process and in workers)."""
    for width, blocks in NARROW:
        zoo.PAIRS[f"resnet{width}x{blocks}"] = zoo.Pair(
            lambda width=width, blocks=blocks: DigitsResNet(width, blocks), zoo.load_digits_split, ""
        )
    zoo.CANDIDATES.update(VARIANTS)


def job(args: tuple[str, str, float, int]) -> dict[str, Any]:
    register()
    return zoo.run(*args, epochs=zoo.EPOCHS)


def weights(width: int, blocks: int) -> int:
    return sum(p.numel() for p in DigitsResNet(width, blocks).parameters() if p.dim() > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["dense", "variants"], required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.part == "dense":
        jobs = [(f"resnet{w}x{b}", "dense", 0.0, seed) for w, b in NARROW for seed in (0, 1, 2)]
    else:
        methods = [*VARIANTS, "ModelPruning", "dense"]
        jobs = [("resnet-digits", m, t, s) for m in methods for t in (0.95, 0.98) for s in (10, 11, 12)]
        jobs = [j for j in jobs if j[1] != "dense" or j[2] == 0.95]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(job, jobs)
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"resnet_capacity_{args.part}.json")
    out.write_text(json.dumps(results, indent=1))

    def mean(**match: Any) -> float:
        return statistics.mean(r["metric"] for r in results if all(r[k] == v for k, v in match.items()))

    if args.part == "dense":
        print("| width x blocks | weights | dense test acc % (seeds 0-2) |\n|---|---|---|")
        for w, b in NARROW:
            print(f"| {w} x {b} | {weights(w, b):,} | {mean(pair=f'resnet{w}x{b}'):.2f} |")
    else:
        print(f"dense (seeds 10-12): {mean(method='dense'):.2f}\n| variant | 95% | 98% |\n|---|---|---|")
        for m in [*VARIANTS, "ModelPruning"]:
            print(f"| {m} | {mean(method=m, target=0.95):.2f} | {mean(method=m, target=0.98):.2f} |")
    print(f"{len(results)} fits, written to {out}")


if __name__ == "__main__":
    main()
