"""What this package's own forwards leave in a model's attributes (core/tracing.py::forward_state_kept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import prune_
from lightning_compress.core.tracing import forward_state_kept


class _Rotary(nn.Module):
    """fair-esm's rotary embedding: a cache of cos/sin tables and, beside it, the length they were built for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
        self._seq_len_cached = None
        self._cos_cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n != self._seq_len_cached or self._cos_cached.device != x.device:  # fails on a half-reset cache
            self._seq_len_cached = n
            t = torch.arange(n).type_as(self.inv_freq)
            self._cos_cached = torch.cat([torch.outer(t, self.inv_freq)] * 2, -1).cos()
        return x * self._cos_cached


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.rotary, self.b = nn.Linear(8, 16), _Rotary(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.rotary(self.a(x))))


def test_a_cache_taken_back_takes_its_bookkeeping_with_it():
    """Trial FK: the cos/sin tables of fair-esm's rotary embedding were taken back after the package's forwards, its
    cached length was not, and every later forward of ESM-2 failed (`'NoneType' object has no attribute 'device'`)."""
    model, x = _Encoder().eval(), torch.randn(2, 5, 8)
    with forward_state_kept(model):
        model(x)
    assert model.rotary._seq_len_cached is None and model.rotary._cos_cached is None
    model(x)  # runs
    fresh = _Encoder().eval()
    with pytest.raises(ValueError, match="a: its channels also feed an operation"):  # the rotary's width is fixed
        prune_(fresh, 0.5, granularity="channel", example_inputs=x)  # after the trace's and the trials' forwards
    assert fresh.rotary._seq_len_cached is None and fresh.rotary._cos_cached is None
    fresh(torch.randn(3, 5, 8))


class _Flags(nn.Module):
    """A module whose forward sets a flag that held None and fills no tensor: the flag stays."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.hooked = nn.Linear(4, 4), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hooked = True
        return self.fc(x)


def test_a_module_that_fills_no_tensor_keeps_what_its_forward_set():
    model = _Flags()
    with forward_state_kept(model):
        model(torch.randn(2, 4))
    assert model.hooked is True
