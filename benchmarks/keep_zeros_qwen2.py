"""A model pruned in one fit and pruned further in a second, as a new user would: a `transformers` Qwen2ForCausalLM
built from a config (grouped-query attention, 2 layers, untied head, random weights) on the bytes of Python's own
documentation (`pydoc_data`), CPU.

1. ``IterativePruning(0.8)`` with every default, 3 epochs.
2. A new ``IterativePruning(0.9, keep_zeros=True)`` beside ``QuantizationAwareTraining(start_epoch=1)``, 3 epochs:
   the sparsity before every batch (it must start at the first fit's and never go lower).
3. ``save_compressed`` / ``load_compressed`` into a fresh instance: the largest logit difference.
4. The default (``keep_zeros=False``) on a model ``prune_`` left at 0.7: whether it warns that the zeros train back.

    python benchmarks/keep_zeros_qwen2.py     # ~15 s
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from pydoc_data.topics import topics

import lightning.pytorch as pl
import torch
from common import no_arguments
from torch.utils.data import DataLoader, TensorDataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from lightning_compress import (
    IterativePruning,
    QuantizationAwareTraining,
    load_compressed,
    prune_,
    save_compressed,
    sparsity,
)


class ByteLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        self.model = Qwen2ForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        ids = batch[0]
        return torch.nn.functional.cross_entropy(self(ids[:, :-1]).reshape(-1, 256), ids[:, 1:].reshape(-1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), 3e-3)


class SparsityTrace(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, i: int) -> None:
        self.seen.append(sparsity(pl_module))


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    windows = torch.tensor(list("".join(topics.values()).encode()[:200_000])).unfold(0, 33, 33)
    train = DataLoader(TensorDataset(windows[:400]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(windows[400:480]), batch_size=40)
    model = ByteLM()
    trainer(3, [IterativePruning(0.8)]).fit(model, train, val)
    print(f"1. defaults: sparsity {sparsity(model):.4f}")
    trace = SparsityTrace()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        callbacks = [IterativePruning(0.9, keep_zeros=True), QuantizationAwareTraining(start_epoch=1), trace]
        trainer(3, callbacks).fit(model, train, val)
    zeros_said = [str(w.message)[:100] for w in said if "zero" in str(w.message)]
    print(
        f"2. keep_zeros: first {trace.seen[0]:.4f}, lowest {min(trace.seen):.4f}, final {sparsity(model):.4f}, "
        f"never lower: {trace.seen == sorted(trace.seen)}, warnings about zeros: {zeros_said}"
    )
    ids = windows[400:404, :-1]
    model.eval()
    with torch.no_grad():
        logits = model(ids)
    path = Path(tempfile.mkdtemp()) / "qwen2.lcz"
    save_compressed(model, path)
    fresh = ByteLM()
    load_compressed(fresh, path)
    with torch.no_grad():
        difference = float((fresh.eval()(ids) - logits).abs().max())
    print(f"3. reloaded: largest logit difference {difference}, file {path.stat().st_size / 1024:.1f} KiB")
    pruned = ByteLM()
    prune_(pruned, 0.7)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer(2, [IterativePruning(0.8)]).fit(pruned, train, val)
    print(f"4. default on a model pruned to 0.7 warns: {any('already' in str(w.message) for w in said)}")


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
