"""What LAMP (``importance="auto"`` on a BatchNorm model) costs per pruning event against magnitude.

One ``prune_`` of a ``Conv2d(512, 1088, 3)`` followed by a BatchNorm (5.0M weights) to 90%, one CPU thread, median
of 3: magnitude ranks the weights by a radix histogram without sorting them; LAMP sorts each layer's weights.

    python benchmarks/lamp_cost.py          # ~10 s
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lightning_compress import prune_


def main() -> None:
    torch.set_num_threads(1)
    for importance in ("magnitude", "auto"):
        times = []
        for _ in range(3):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(512, 1088, 3), nn.BatchNorm2d(1088))
            start = time.perf_counter()
            prune_(model, 0.9, importance=importance)
            times.append(time.perf_counter() - start)
        print(f"{importance}: {sorted(times)[1]:.2f} s per event")


if __name__ == "__main__":
    main()
