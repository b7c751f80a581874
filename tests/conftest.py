"""Shared fixtures: a tiny LightningModule on generated data that trains in about a second."""

from __future__ import annotations

import os

# One intra-op thread per test process (and the processes tests start), unless the caller chose: the suite's models
# are tiny, and on a 2-core machine two threads per process made it up to 3x slower (session 31: 210 s against 63 s
# for tests/callbacks/test_pruning.py and tests/core/test_structure.py beside another job).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*")


def make_blobs(n: int = 256, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around fixed centers; ``seed`` draws the samples (train, val and test share centers)."""
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 0.8
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


class TinyModule(pl.LightningModule):
    """A 3-layer MLP classifier; logs `val_acc` and `val_loss`."""

    def __init__(self, hidden: int = 32, lr: float = 0.05, optimizer: str = "sgd", n: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4)
        )
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        return DataLoader(make_blobs(self.hparams.n), batch_size=32, shuffle=False)

    def val_dataloader(self):
        return DataLoader(make_blobs(128, seed=1), batch_size=64)

    def test_dataloader(self):
        return DataLoader(make_blobs(128, seed=2), batch_size=64)


# The accelerator of `trainer()`: the CPU, unless LIGHTNING_COMPRESS_TEST_ACCELERATOR names another ("gpu" in
# benchmarks/gpu_check.sh, which runs the callbacks' tests on a lent GPU machine).
TEST_ACCELERATOR = os.environ.get("LIGHTNING_COMPRESS_TEST_ACCELERATOR", "cpu")
# Where that Trainer computes: a test that redoes by hand what a fit computed redoes it there (a GPU divides a tensor
# by a Python number as a product with its reciprocal, which can round differently from the CPU's division).
TEST_DEVICE = torch.device("cuda" if TEST_ACCELERATOR == "gpu" else TEST_ACCELERATOR)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(*paths: os.PathLike | str, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts: ``paths`` and the repository first on ``PYTHONPATH``, the caller's
    ``PYTHONPATH`` after them (on the GPU machine the carried wheels live there), one intra-op thread, then ``extra``.
    """
    path = [str(p) for p in paths] + [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", **extra}


def trainer(tmp_path=None, **kwargs) -> pl.Trainer:
    """A quiet Trainer on `TEST_ACCELERATOR`."""
    defaults = dict(
        accelerator=TEST_ACCELERATOR,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kwargs)
    with warnings.catch_warnings():  # on a GPU machine, a CPU Trainer warns; tests that turn warnings into errors
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        return pl.Trainer(**defaults)


@pytest.fixture
def tiny() -> TinyModule:
    pl.seed_everything(0, verbose=False)
    return TinyModule()


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().clone() for k, v in module.state_dict().items()
    }  # on the CPU: the suite also runs on GPUs


class SparsityChanges(pl.Callback):
    """Counts the optimizer steps after which the pruning callback (listed before it) changed the masks."""

    def __init__(self, pruning: pl.Callback) -> None:
        self.pruning, self.changes, self.last = pruning, 0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check()

    def on_train_epoch_end(self, trainer, pl_module):
        self._check()

    def _check(self) -> None:
        now = self.pruning.pruner.masked_sparsity()
        self.changes += now != self.last
        self.last = now


class StopAfterEpoch(pl.Callback):
    """Stops the fit at the end of epoch ``epoch`` (0-indexed), as early stopping would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class FlatLinear(nn.Module):
    """A layer that keeps its weights flat, 1-d, and reshapes them in forward, as e3nn's ``o3.Linear`` and
    ``FullyConnectedTensorProduct`` do."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out * n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.view(self.n_out, self.n_in).t()


def prune_and_compact(model: nn.Module, x: torch.Tensor, atol: float) -> Any:
    """Half of ``model``'s channels pruned on ``x``, then ``compact()`` in eval mode; the outputs on ``x`` must stay
    within ``atol``. Returns the compaction's report."""
    from lightning_compress import compact, prune_

    prune_(model, 0.5, granularity="channel", example_inputs=x)
    model.eval()
    with torch.no_grad():
        before = model(x)
        report = compact(model, x)
        assert torch.allclose(model(x), before, atol=atol)
    return report


def _leave_after(rank: int, worker: Any, port: int, out: str) -> None:
    """``worker(rank, port, out)``, then exit without the interpreter's teardown, as the distributed scripts do
    (``tests/callbacks/_exit.py``): the gloo threads FSDP2 keeps alive after ``destroy_process_group`` sometimes
    abort the process there ("terminate called without an active exception", 3 of 25 runs of the sharded-channel
    test, once in CI) after every result was saved. A failing worker still raises, with its traceback."""
    import sys

    worker(rank, port, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Any, tmp_path: object, nprocs: int) -> None:
    """Run ``worker(rank, port, str(tmp_path))`` in ``nprocs`` spawned processes on a free local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_leave_after, args=(worker, port, str(tmp_path)), nprocs=nprocs, start_method="spawn")


class MetricSettings(nn.Module):
    """Keeps its settings as a module's extra state, a dict, as nequip's loss and metrics manager does."""

    def __init__(self) -> None:
        super().__init__()
        self.coefficients = {"energy": 1.0, "forces": 10.0}

    def get_extra_state(self) -> dict[str, float]:
        return dict(self.coefficients)

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.coefficients = dict(state)


class ModuleWithExtraState(TinyModule):
    """A training module whose state dict holds a dict (``loss._extra_state``) beside the network's tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = MetricSettings()
        self.example_input_array = torch.randn(2, 16)


class SpectralConv1d(nn.Module):
    """A Fourier layer as neuraloperator's FNO holds it: a complex weight per mode, multiplied through einsum."""

    def __init__(self, channels: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(channels, channels, modes, dtype=torch.cfloat) / channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x, dim=-1)[..., : self.modes]
        mixed = torch.einsum("bim,iom->bom", spectrum, self.weight)
        return torch.fft.irfft(mixed, n=x.shape[-1], dim=-1)


class FourierModule(pl.LightningModule):
    """Lifting, one Fourier layer with a pointwise skip, projection; regression of a smoothed input (Adam)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lift = nn.Conv1d(1, 8, 1)
        self.spectral = SpectralConv1d(8, 6)
        self.skip = nn.Conv1d(8, 8, 1)
        self.project = nn.Conv1d(8, 1, 1)
        x = torch.randn(128, 1, 32)
        self.data = torch.utils.data.TensorDataset(x, torch.nn.functional.avg_pool1d(x, 5, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lift(x)
        return self.project(torch.nn.functional.gelu(self.spectral(h) + self.skip(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=16)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)
