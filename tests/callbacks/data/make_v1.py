"""How pruning_v1_*.ckpt / *_final.pt were made: run at commit 95a3c57 (the callback's state format 1, before
IterativePruner) as ``PYTHONPATH=<that checkout> python tests/callbacks/data/make_v1.py <out dir>``."""

import pathlib
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import IterativePruning
from tests.conftest import TinyModule, trainer

out = pathlib.Path(sys.argv[1])
CASES = {
    "steps": dict(target_sparsity=0.9, importance="taylor", start_epoch=1, end_epoch=5, regrow=0.1),
    "guard": dict(target_sparsity=0.8, start_epoch=0, end_epoch=4, monitor="val_acc", max_drop=0.05),
}
for name, kwargs in CASES.items():
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    pruning = IterativePruning(**kwargs)
    ckpt = ModelCheckpoint(dirpath=out / name, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer(max_epochs=6, callbacks=[pruning, ckpt], enable_checkpointing=True).fit(model)
    state = torch.load(out / name / "epoch=2.ckpt", weights_only=False)
    assert any(v.get("version") == 1 for v in state["callbacks"].values() if isinstance(v, dict))
    (out / name / "epoch=2.ckpt").rename(out / f"pruning_v1_{name}.ckpt")
    torch.save(
        {"masks": pruning.masks, "decisions": [d.action for d in pruning.decisions]},
        out / f"pruning_v1_{name}_final.pt",
    )
