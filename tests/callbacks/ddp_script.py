"""Run by the DDP tests: fit TinyModule with 2 CPU processes (gloo) and dump each rank's masks and state.

A job name is an importance (``magnitude``, ``taylor``, ``random``, ``noisy``), optionally prefixed with a
granularity (``channel-``, ``2:4-``) and followed by ``+qat-<scale>``, or ``qat-<scale>`` alone.
"""

import os
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_compress import CompressionMonitor, IterativePruning, QuantizationAwareTraining
from tests.conftest import TinyModule

warnings.filterwarnings("ignore")
warnings.filterwarnings("default", message=".*differs between processes")  # the guard job asserts it
warnings.filterwarnings("default", message=".*sync_dist=True.*")  # Lightning's advice: none of our logs draws it


class RankNoisyImportance:
    """|w| plus noise that differs on every rank: only a mask broadcast keeps ranks identical."""

    def score(self, name, weight):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(1000 + rank)
        return weight.detach().abs() + torch.rand(weight.shape, generator=g)


class RankLocalScore(TinyModule):
    """`val_score` logged without `sync_dist`: 1 on rank 0, 1 - sparsity on rank 1 (the guard read each rank's own
    value: rank 1 rolled back where rank 0 accepted, the models parted and the fit failed; trial BE)."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        sparse = sum(int((p == 0).sum()) for p in self.net.parameters()) / sum(p.numel() for p in self.net.parameters())
        self.log("val_score", 1.0 - rank * sparse)


def main(out_dir: str, importances: list[str]) -> None:
    for name in importances:
        pl.seed_everything(0, verbose=False)
        model = RankLocalScore() if name == "guard-ranklocal" else TinyModule()
        prune_part, _, qat_part = name.partition("+") if not name.startswith("qat-") else ("", "", name)
        callbacks: list[pl.Callback] = []
        pruning = None
        monitor = None
        if name == "guard-ranklocal":  # with a monitor of the same metric: it reads the guard's mean (trial BF)
            pruning = IterativePruning(0.8, start_epoch=0, end_epoch=3, monitor="val_score", max_drop=0.2)
            monitor = CompressionMonitor(monitor="val_score")
            callbacks += [pruning, monitor]
        elif name == "export":  # every process finds the file when fit returns (rank 1 returned before it was written)
            pruning = IterativePruning(0.8, start_epoch=0, end_epoch=3, export_path=f"{out_dir}/export.lcz")
            callbacks.append(pruning)
        elif name == "channel-qatfirst":  # QAT listed first: a deep copy of the module reached a Trainer (trial BJ)
            model.example_input_array = torch.zeros(1, 16)
            pruning = IterativePruning(0.5, granularity="channel", start_epoch=0, end_epoch=3,
                                       export_path=f"{out_dir}/compacted.lcz")  # fmt: skip
            callbacks += [QuantizationAwareTraining(4, 8, start_epoch=1), pruning]
        elif prune_part:
            granularity, _, prune_part = prune_part.rpartition("-")  # "channel-taylor", "2:4-noisy", "magnitude"
            importance = RankNoisyImportance() if prune_part == "noisy" else prune_part
            target = {"": 0.8, "channel": 0.5, "2:4": 0.5}[granularity]
            model.example_input_array = torch.zeros(1, 16)
            pruning = IterativePruning(
                target, importance=importance, start_epoch=0, end_epoch=3, granularity=granularity or "element"
            )
            callbacks.append(pruning)
        if qat_part == "qat-8da4w":  # int4 weights in groups of 8, int8 dynamic per-token activations
            callbacks.append(
                QuantizationAwareTraining(4, 8, group_size=8, activation_granularity="per_token", start_epoch=1)
            )
        elif qat_part == "qat-shift":  # power-of-two shifts searched on validation batches, logged per layer
            callbacks.append(QuantizationAwareTraining(4, 8, scale="power_of_two", shift_search=True, start_epoch=1))
        elif qat_part:
            callbacks.append(QuantizationAwareTraining(4, 8, scale=qat_part.removeprefix("qat-"), start_epoch=1))
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        trainer.fit(model)
        rank = trainer.global_rank
        torch.save(
            {
                "masks": pruning.masks if pruning else {},
                "decisions": [d.action for d in pruning.decisions] if pruning else [],
                "monitor": [monitor.summary["baseline"], monitor.summary["final"]] if monitor else [],
                "exported": os.path.exists(f"{out_dir}/export.lcz"),
                "report": pruning.export_report.file_bytes if pruning and pruning.export_report else None,
                "weights": {k: v.clone() for k, v in model.state_dict().items()},
            },
            f"{out_dir}/{name}_rank{rank}.pt",
        )


if __name__ == "__main__":
    from tests.callbacks._exit import run_and_leave_the_group

    run_and_leave_the_group(main, sys.argv[1], sys.argv[2].split(","))
