"""What LAMP (``importance="auto"`` on a BatchNorm model) costs per pruning event against magnitude.

One ``prune_`` of a ``Conv2d(512, 1088, 3)`` followed by a BatchNorm (5.0M weights) to 90%, one CPU thread, median
of 3: magnitude ranks the weights by a radix histogram without sorting them; LAMP sorts each layer's surviving
weights. ``dense``: the first event of a schedule (no weight pruned yet); ``at 80%``: a later event, with 80% of the
weights already zero (LAMP sorts the other 20%).

    python benchmarks/lamp_cost.py          # ~20 s
"""

from __future__ import annotations

import time

import torch
from common import no_arguments
from torch import nn

from lightning_compress import prune_


def model(zeros: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(512, 1088, 3), nn.BatchNorm2d(1088))
    with torch.no_grad():
        net[0].weight[torch.rand_like(net[0].weight) < zeros] = 0.0
    return net


def main() -> None:
    torch.set_num_threads(1)
    for zeros in (0.0, 0.8):
        for importance in ("magnitude", "auto"):
            times = []
            for _ in range(3):
                net = model(zeros)
                start = time.perf_counter()
                prune_(net, 0.9, importance=importance)
                times.append(time.perf_counter() - start)
            state = "dense" if zeros == 0 else f"at {zeros:.0%}"
            print(f"{state}, {importance}: {sorted(times)[1]:.2f} s per event")


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
