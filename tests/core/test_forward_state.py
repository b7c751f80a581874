"""What this package's own forwards leave in a model's attributes (core/tracing.py::forward_state_kept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import prune_
from lightning_compress.core.tracing import forward_state_kept, parameters_kept


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


class _LazilyInitialized(nn.Module):
    """gpytorch's variational strategy, in short: on the first forward it sees it fills a Parameter from the data and
    the random generator, and sets a flag buffer (`.data.copy_`, as gpytorch writes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.mean = nn.Parameter(torch.zeros(4))
        self.register_buffer("initialized", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if not self.initialized.item():
            self.mean.data.copy_(h.detach().mean(0) + torch.randn(4))
            self.initialized.fill_(1)
        return h - self.mean


def test_a_refused_channel_setup_leaves_parameters_buffers_and_the_random_generator_as_they_were():
    """Trial FN: a deep-kernel GP refused by `granularity='channel'` came back with its variational mean filled from
    the example and the random generator, and its `variational_params_initialized` flag set: the trace had run the
    lazy initialization on the live model. The model keeps what it held; so does torch's random generator."""
    torch.manual_seed(0)
    model = _LazilyInitialized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    x = torch.randn(4, 8)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"no channel group it can prune: features\.2: mean"):
        prune_(model, 0.5, granularity="channel", include=["features.2"], example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_parameters_and_running_statistics_written_in_place_are_put_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with parameters_kept(model):
        model(torch.randn(8, 4))  # BatchNorm's running statistics are written
        with torch.no_grad():
            model[0].weight[0].zero_()  # a view of a Parameter
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with parameters_kept(model.eval()):
        model(torch.randn(8, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
