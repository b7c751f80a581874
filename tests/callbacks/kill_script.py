"""Run by test_kill.py: a fit with both callbacks that resumes from last.ckpt and can be killed anywhere."""

import pathlib
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import IterativePruning, QuantizationAwareTraining
from tests.conftest import TinyModule

warnings.filterwarnings("ignore")


class Ready(Callback):
    def on_train_start(self, trainer, pl_module):
        print(f"READY {time.time()}", flush=True)

    def on_train_end(self, trainer, pl_module):
        print(f"END {time.time()}", flush=True)


def main(workdir: str) -> None:
    root = pathlib.Path(workdir)
    last = root / "ckpt" / "last.ckpt"
    pl.seed_everything(0, verbose=False)
    model = TinyModule(n=2048, optimizer="adam")
    pruning = IterativePruning(0.85, importance="taylor", start_epoch=1, end_epoch=8, every_n_steps=8)
    callbacks = [
        pruning,
        QuantizationAwareTraining(8, 8, start_epoch=5),
        ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1, filename="{epoch}"),
        Ready(),
    ]
    trainer = pl.Trainer(
        max_epochs=10,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(model, ckpt_path=last if last.exists() else None)
    torch.save({"masks": pruning.masks, "state": model.state_dict()}, root / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1])
