"""The README's plain PyTorch loop runs as written and does what it says."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(starts_with: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(starts_with)]
    assert len(found) == 1, f"no single README block starting with {starts_with!r}"
    return found[0]


def test_the_plain_pytorch_loop_prunes_to_its_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    namespace = {
        "torch": torch,
        "model": model,
        "loader": list(zip(x.split(16), y.split(16), strict=True)),
        "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2),
        "loss_fn": nn.functional.cross_entropy,
    }
    exec(compile(_block("from lightning_compress import IterativePruner"), "README.md", "exec"), namespace)
    from lightning_compress import sparsity

    assert sparsity(model) == pytest.approx(0.9, abs=1e-3)
    assert (tmp_path / "run.pt").exists()
    assert namespace["pruner"].steps == 40
