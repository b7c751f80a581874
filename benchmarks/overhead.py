"""Per-step training time with masks or fake quantization active, as a ratio to plain training, in one process.

A 10.4M-parameter MLP (1024-2360-2360-1024-10, batch 256, SGD with momentum) on random data.
Configurations are interleaved round by round; each fit prunes 90% at the end of epoch 0 and the
steps of epoch 1 are timed (from ``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward, hooks and the optimizer step):

* ``plain``: no callback (the reference);
* ``IterativePruning``: masks in the callback, gradients masked before each optimizer step;
* ``IterativePruning, event every step``: pruning during epoch 1 with the default cadence, which for a window
  of fewer than 1,000 steps (here 24) is an event after every step: each timed step includes an event;
* ``ModelPruning``: Lightning's callback, whose ``torch.nn.utils.prune`` forward-pre-hooks stay on;
* ``QuantizationAwareTraining``: int8 weights (per channel) and activations (per tensor), fake
  quantization on from the end of epoch 0;
* ``torch.ao QAT``: ``torch.ao.quantization.prepare_qat`` (x86 qconfig, QuantStub/DeQuantStub).

    python benchmarks/overhead.py
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from common import mlp_layers, no_arguments, prepare_torch_ao_qat
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, QuantizationAwareTraining

warnings.filterwarnings("ignore")
STEPS = 24


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module = mlp_layers()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(256 * STEPS, 1024, generator=g), torch.randint(0, 10, (256 * STEPS,), generator=g)
        )
        return DataLoader(data, batch_size=256)


class StepTimer(Callback):
    """Wall time and process CPU time (both threads) of every step of epoch 1."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, *args):
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == 1:
            self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def callbacks_for(name: str, model: MLP) -> list[Callback]:
    if name == "IterativePruning":
        return [IterativePruning(0.9, schedule="one_shot", start_epoch=0, end_epoch=1, every_n_epochs=1)]
    if name == "IterativePruning, event every step":
        return [IterativePruning(0.9, start_epoch=1, end_epoch=2)]  # the default cadence in a 24-step window
    if name == "QuantizationAwareTraining":
        return [QuantizationAwareTraining(8, 8, start_epoch=0)]
    if name == "torch.ao QAT":
        model.net = prepare_torch_ao_qat(model.net)
        return []
    if name == "ModelPruning":
        params = [(m, "weight") for m in model.net if isinstance(m, nn.Linear)]
        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=params,
                amount=lambda e: 0.9 if e == 0 else 0.0,
                use_global_unstructured=True,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        ]
    return []


def timed_fit(name: str) -> list[tuple[float, float]]:
    pl.seed_everything(0, verbose=False)
    model = MLP()
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[*callbacks_for(name, model), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return timer.times[2:]  # drop warm-up steps


def main(rounds: int = 9) -> None:
    names = [
        "plain", "IterativePruning", "IterativePruning, event every step", "ModelPruning", "QuantizationAwareTraining",
        "torch.ao QAT",
    ]  # fmt: skip
    params = sum(p.numel() for p in MLP().parameters())
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            times = timed_fit(name)
            wall[name].append(statistics.median(t[0] for t in times))
            cpu[name].append(statistics.median(t[1] for t in times))
        print(f"round {r}: " + ", ".join(f"{n} {wall[n][-1] * 1000:.1f} ms" for n in names), flush=True)

    def ratios(per_round: dict[str, list[float]]) -> dict[str, float]:
        plain = per_round["plain"]
        return {n: statistics.median(a / b for a, b in zip(per_round[n], plain, strict=True)) for n in names}

    result = {
        "parameters": params,
        "median_step_wall_s": {n: statistics.median(v) for n, v in wall.items()},
        "median_step_cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
        "wall_ratio_to_plain": ratios(wall),
        "cpu_ratio_to_plain": ratios(cpu),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
    }
    (pathlib.Path(__file__).parent / "results" / "overhead.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n{params / 1e6:.1f}M parameters, batch 256, {torch.get_num_threads()} threads, {rounds} interleaved rounds"
    )
    print("| training with | median step (wall) | wall time vs plain | CPU time vs plain |\n|---|---|---|---|")
    for n in names:
        print(
            f"| {n} | {result['median_step_wall_s'][n] * 1000:.1f} ms | {result['wall_ratio_to_plain'][n]:.3f}x "
            f"| {result['cpu_ratio_to_plain'][n]:.3f}x |"
        )


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
