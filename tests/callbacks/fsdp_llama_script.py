"""Run by the FSDP2 tests: a tiny ``transformers`` Llama (grouped-query attention, tied embeddings) fine-tuned
with Taylor pruning and AdamW on 2 CPU processes, sharded per decoder layer (``fsdp2``) or not (``ddp``).

``python fsdp_llama_script.py OUT_DIR STRATEGY [channel|qat]`` dumps each rank's whole state, the pruning masks and
the final ``val_loss`` to ``OUT_DIR/STRATEGY_RANK.pt``. With ``channel``: half of the attention heads (whole
key/value groups) and MLP neurons are pruned instead, the compacted model is exported to ``OUT_DIR/STRATEGY.lcz``,
and the dump is ``OUT_DIR/STRATEGY-channel_RANK.pt``. With ``qat``: int8 quantization-aware training of every layer and
the tied embedding (its head shares the embedding's weight quantizer) from the first epoch, no pruning; the dump is
``OUT_DIR/STRATEGY-qat_RANK.pt``.
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, QuantizationAwareTraining
from lightning_compress.core.sharding import full

warnings.filterwarnings("ignore")


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            tie_word_embeddings=True,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(cfg)
        self.example_input_array = torch.zeros(1, 16, dtype=torch.long)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, i):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def validation_step(self, batch, i):
        (x,) = batch
        self.log("val_loss", self.model(input_ids=x, labels=x).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randint(0, 96, (64, 16), generator=g)), batch_size=8)

    def val_dataloader(self):
        g = torch.Generator().manual_seed(2)
        return DataLoader(TensorDataset(torch.randint(0, 96, (16, 16), generator=g)), batch_size=8)


def main(out, strategy, mode=""):
    pl.seed_everything(0, verbose=False)
    model = LM()
    made = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp"
    if mode == "qat":
        pruning = QuantizationAwareTraining(8, 8, start_epoch=0, include=["model.model.embed_tokens", "*"])
    elif mode == "channel":
        pruning = IterativePruning(
            0.5, granularity="channel", importance="taylor", end_epoch=2, export_path=f"{out}/{strategy}.lcz"
        )
    else:
        pruning = IterativePruning(0.7, importance="taylor", end_epoch=2)
    t = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=made,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[pruning],
    )
    t.fit(model)
    state = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    masks = pruning.state_dict()["pruner"]["masks"] if mode != "qat" else {}
    torch.save(
        {"state": state, "masks": masks, "val": float(t.callback_metrics["val_loss"])},
        f"{out}/{strategy}{'-' + mode if mode else ''}_{t.global_rank}.pt",
    )


if __name__ == "__main__":
    from tests.callbacks._exit import run_and_leave_the_group

    run_and_leave_the_group(main, sys.argv[1], sys.argv[2], *sys.argv[3:4])
