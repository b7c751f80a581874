"""Prune heads and MLP neurons of a `transformers` Llama and quantize it to int8 while it trains sharded by
FSDP2, then export the compacted int8 model to ONNX. Nothing is downloaded: the model is built from a config
with random weights and trained on the Python documentation that ships with Python (`pydoc_data`), as bytes.

    python examples/fsdp2.py                                  # 2 CPU processes (gloo), about 2 minutes
    python examples/fsdp2.py --accelerator gpu --devices 8    # the same on 8 GPUs

The three things FSDP2 needs: build the layers in ``__init__`` (the callbacks trace and copy the whole model at
``setup``), shard them in ``configure_model`` with ``fully_shard``, and use
``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, QuantizationAwareTraining


def byte_windows(context: int, count: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``context + 1`` bytes of the Python docs (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    text = torch.frombuffer(bytearray("\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.uint8)
    starts = torch.randint(0, text.numel() - context - 1, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([text[s : s + context + 1] for s in starts.tolist()]).long()


class ByteLlama(pl.LightningModule):
    def __init__(self, context: int = 64, steps: int = 64) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=False,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)  # built here, whole: sharded in configure_model
        ids = torch.zeros(1, context, dtype=torch.long)
        self.example_input_array = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # ONNX needs the mask
        self.train_data = TensorDataset(byte_windows(context, 16 * steps, seed=0))
        self.val_data = TensorDataset(byte_windows(context, 128, seed=1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # Lightning calls this hook again for `validate`/`test(ckpt_path=...)` after a fit: shard once (trial DP:
        # "fully_shard has already been applied")
        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        (window,) = batch
        logits = self.model(input_ids=window[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_data, batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fast", action="store_true", help="a smoke run: 2 epochs of 8 steps")
    parser.add_argument("--out", default="fsdp2_export")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    epochs, steps = (2, 8) if args.fast else (args.epochs, 64)
    pl.seed_everything(0, verbose=False)
    model = ByteLlama(steps=steps)
    out = pathlib.Path(args.out)
    pruning = IterativePruning(  # half the key/value head groups and MLP neurons, then compacted at export
        0.5, granularity="channel", importance="taylor", end_epoch=epochs - 1, export_path=out / "llama_int8.onnx"
    )
    qat = QuantizationAwareTraining(8, 8, start_epoch=epochs - 1)  # int8 weights and activations, last epoch
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, max_epochs=epochs,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        callbacks=[pruning, qat], logger=False, enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model)
    if trainer.global_rank == 0:
        print(f"\nval_loss {float(trainer.callback_metrics['val_loss']):.3f} after {epochs} epochs")
        print(f"exported: {out / 'llama_int8.onnx'}")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # On CPU (gloo) a worker thread can free the last collective's tensors while Python shuts down, which aborts
        # the finished run ("terminate called without an active exception"; 1 run in 10 here, pytorch/pytorch#179291,
        # also after destroy_process_group): leave once everything is written, without that teardown.
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
