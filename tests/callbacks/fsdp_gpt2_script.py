"""Run by the FSDP2 tests: a tiny ``transformers`` GPT-2 (its layers are ``Conv1D``, weights stored (in, out)),
its transformers wrapped in a LightningModule, channel pruning (heads and MLP neurons) on 2 CPU processes,
sharded per block (``fsdp2``) or not (``ddp``).

``python fsdp_gpt2_script.py OUT_DIR STRATEGY`` writes the compacted model to ``OUT_DIR/STRATEGY.lcz`` and each
rank's masks and whole state to ``OUT_DIR/STRATEGY_RANK.pt``.
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning
from lightning_compress.core.sharding import full

warnings.filterwarnings("ignore")


class LM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            n_embd=48, n_layer=2, n_head=4, vocab_size=80, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        self.model = GPT2LMHeadModel(config)  # use_cache=True, its default: turned off while tracing
        self.example_input_array = torch.zeros(1, 16, dtype=torch.long)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.model.transformer.h:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, i):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randint(0, 80, (64, 16), generator=g)), batch_size=8)


def main(out: str, strategy: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = LM()
    made = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp"
    pruning = IterativePruning(0.5, granularity="channel", end_epoch=2, export_path=f"{out}/{strategy}.lcz")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=made, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning],
    )  # fmt: skip
    trainer.fit(model)
    masks = pruning.state_dict()["pruner"]["masks"]
    state = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    torch.save({"masks": masks, "state": state}, f"{out}/{strategy}_{trainer.global_rank}.pt")


if __name__ == "__main__":
    from tests.callbacks._exit import run_and_leave_the_group

    run_and_leave_the_group(main, sys.argv[1], sys.argv[2])
