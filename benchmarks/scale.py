"""One global magnitude pruning step on a 100M-parameter model (10 x Linear 3162x3162).

Each method runs in a fresh subprocess so its peak RSS is its own:
* ``ours``: ``lightning_compress.prune_(model, 0.5)`` (the step: scores, exact global top-k, masks,
  zeroing). ``ours-event`` additionally keeps the callback's run-time masks (weight dtype, see README).
* ``ModelPruning``: ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.5)``,
  what Lightning's ``ModelPruning(use_global_unstructured=True)`` runs at each pruning event.

    python benchmarks/scale.py
"""

from __future__ import annotations

import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import no_arguments
from torch import nn


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def child(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3162, 3162) for _ in range(10)])
    weights_gb = sum(m.weight.numel() for m in model) * 4 / 1e9
    base = rss_gb()
    start = time.perf_counter()
    if method == "ours":
        from lightning_compress import prune_

        prune_(model, 0.5)
    elif method == "ours-event":  # one event of an iterative run, which keeps its masks in the weight dtype
        from lightning_compress import IterativePruner

        IterativePruner(model, 0.5, total_steps=1, schedule="one_shot", min_density=0.0).advance_to(1)
    else:
        from torch.nn.utils import prune

        prune.global_unstructured([(m, "weight") for m in model], pruning_method=prune.L1Unstructured, amount=0.5)
    seconds = time.perf_counter() - start
    zeros = sum(int((m.weight == 0).sum()) for m in model) / sum(m.weight.numel() for m in model)
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "weights_gb": weights_gb,
                "rss_before_gb": base,
                "peak_gb": peak_gb(),
                "extra_peak_gb": peak_gb() - base,
                "sparsity": zeros,
            }
        )
    )


def main() -> None:
    rows = []
    for method in ["ours", "ours", "ours", "ours-event", "ours-event", "ours-event", "ModelPruning"]:
        out = subprocess.run([sys.executable, __file__, method], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    path = pathlib.Path(__file__).parent / "results" / "scale.json"
    path.write_text(json.dumps(rows, indent=1))
    print("\n| method | seconds | peak RSS above the weights (GB) | sparsity |\n|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        sec = statistics.median(r["seconds"] for r in mine)
        extra = max(r["extra_peak_gb"] for r in mine)
        label = f"{method} (median of {len(mine)})" if len(mine) > 1 else method
        print(f"| {label} | {sec:.2f} | {extra:.2f} | {mine[0]['sparsity']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):  # one method's child process
        child(sys.argv[1])
    else:
        no_arguments(__doc__)  # trial DB: `--help` ran a 100M-weight child as the method "--help"
        main()
