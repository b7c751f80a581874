"""The compressed files of stored zoo runs against both baselines, without training anything.

``zoo.py`` records, per run, the file's bytes, ``torch.save`` of the QAT model's state dict (what
``CompressionReport.baseline_bytes`` was until session 20: the fake quantizers' scales, ranges and flags included)
and ``torch.save`` of the float state dict (what it is now). This prints the mean ratio over the seeds against
each, per pair, method and target:

    python benchmarks/file_ratios.py benchmarks/results/zoo_files_bias.json benchmarks/results/zoo_resnet32_files.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def ratios(path: str) -> dict[tuple[str, str, float], tuple[float, float, int]]:
    """``(pair, method, target) -> (ratio against the QAT state dict, ratio against the float one, seeds)``."""
    with open(path) as f:
        runs = json.load(f)["runs"]
    found: dict[tuple[str, str, float], list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        if "file_bytes" in run:
            key = (run["pair"], run["method"], run["target"])
            found[key].append((run["state_dict_bytes"] / run["file_bytes"], run["float_bytes"] / run["file_bytes"]))
    return {
        key: (statistics.mean(q for q, _ in values), statistics.mean(f for _, f in values), len(values))
        for key, values in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="zoo.py result files (JSON)")
    args = parser.parse_args()
    print("| pair | method | target | vs float state dict (reported now) | vs QAT state dict (before) | seeds |")
    print("|---|---|---|---|---|---|")
    for path in args.results:
        for (pair, method, target), (qat, flt, seeds) in sorted(ratios(path).items()):
            print(f"| {pair} | {method} | {target:.0%} | {flt:.1f}x | {qat:.1f}x | {seeds} |")


if __name__ == "__main__":
    main()
