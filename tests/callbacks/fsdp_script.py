"""Run by the FSDP2 tests: fit a sharded TinyModule on 2 CPU processes (gloo), and dump each rank's state.

``python fsdp_script.py OUT_DIR STRATEGY JOB[,JOB...]`` with STRATEGY ``ddp`` or ``fsdp2`` (``ModelParallelStrategy``,
``fully_shard`` on every Linear in ``configure_model``, learned scales left whole). A job is:

* a QAT recipe: ``minmax``, ``power_of_two``, ``learned``, ``8da4w``, ``bias`` (power of two, int32 biases),
  ``shift`` (power of two with shift search),
  ``shift-root`` (the same with one ``fully_shard`` unit for all layers), ``learned-sharded`` (learned scales
  left to ``fully_shard``, which is refused), ``learned-sharded-act`` (the same with a 0-dim activation scale);
* a pruning recipe: ``prune-magnitude``, ``prune-taylor``, ``prune-random``, ``prune-layer``, ``prune-guard``,
  ``prune-rewind``, ``prune-regrow``, ``prune-2:4``, channel pruning to 50% of the hidden neurons ``prune-channel``
  (defaults: layer scope, magnitude), ``prune-channel-global`` (global scope, Taylor), ``prune-channel-random``,
  ``prune-channel-macs`` (a MACs budget), ``prune-channel-guard``; or ``both`` (pruning and QAT);
* then optionally ``+export`` (the ``export_path`` of the last callback writes ``STRATEGY-RECIPE.lcz``), ``+onnx``
  (the same with ``STRATEGY-RECIPE.onnx``), ``+late`` (``+onnx`` with a layer built in ``configure_model``),
  ``+bf16`` (``+onnx`` with ``precision="bf16-true"``),
  ``+fullckpt`` (full-state checkpoints every epoch in ``RECIPE-full/``) or ``+monitor`` (a
  ``CompressionMonitor`` logging to TensorBoard), and ``@resume`` (fit saving a distributed checkpoint every
  epoch, then resume the one of epoch 2 to 4 epochs).

The dump holds every tensor of the model whole (``full``), the pruning callback's state (whole masks) and the
final ``val_acc``, so DDP and FSDP2 runs compare directly.
"""

import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_compress import CompressionMonitor, IterativePruning, QuantizationAwareTraining, learned_scales, sparsity
from lightning_compress.core.sharding import full
from tests.conftest import TinyModule

warnings.filterwarnings("ignore")


class ShardedTiny(TinyModule):
    ignore_scales = True  # pass the learned scales to fully_shard's ignored_params, as the README says
    per_layer = True  # every Linear its own fully_shard unit (else only the Sequential around them)
    late_layer = False  # build a layer in configure_model (an export that rebuilds the module then cannot)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        if self.late_layer:
            self.head = torch.nn.Linear(4, 4)
        mesh = self.device_mesh["data_parallel"]
        whole = learned_scales(self) if self.ignore_scales else None  # LSQ step sizes stay whole and replicated
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear) and self.per_layer:
                fully_shard(layer, mesh=mesh, ignored_params=whole)
        fully_shard(self.net, mesh=mesh, ignored_params=whole)

    def on_validation_epoch_end(self) -> None:
        """Log the weights' density, a monitor that each pruning event lowers by its size."""
        weights = [full(layer.weight) for layer in self.net if isinstance(layer, torch.nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        self.log("val_density", 1.0 - zeros / sum(w.numel() for w in weights))


HIDDEN = 37  # odd: rows split 19/18 over two processes


def callbacks(recipe: str, export_path: str | None = None) -> list[pl.Callback]:
    """The recipe's callbacks; ``both`` is 90% magnitude pruning and 8da4w QAT in the same fit."""
    if recipe == "both":
        return [qat("prune-magnitude"), qat("8da4w", export_path)]
    return [qat(recipe, export_path)]


def qat(recipe: str, export_path: str | None = None) -> pl.Callback:
    if recipe.startswith("prune-"):
        kind = recipe.removeprefix("prune-")
        options = {
            "magnitude": {},
            "taylor": {"importance": "taylor"},
            "random": {"importance": "random", "seed": 3},
            "layer": {"scope": "layer"},
            # an event that prunes more than 35% of the weights at once is rolled back, its step halved
            "guard": {"monitor": "val_density", "max_drop": 0.35},
            # the layers in the root unit, which a validation forward leaves gathered: events between epochs
            "root": {"every_n_epochs": 1},
            "guard-root": {"monitor": "val_density", "max_drop": 0.35},
            "rewind": {"rewind_epoch": 0, "every_n_epochs": 1},
            "regrow": {"regrow": 0.2, "importance": "taylor"},
            "2:4": {"granularity": "2:4"},
            "channel": {"granularity": "channel"},
            "channel-global": {"granularity": "channel", "scope": "global", "importance": "taylor"},
            "channel-random": {"granularity": "channel", "importance": "random", "seed": 5},
            "channel-macs": {"granularity": "channel", "measure": "macs"},
            "channel-guard": {"granularity": "channel", "monitor": "val_density", "max_drop": 0.2},
        }[kind]
        target = 0.5 if kind == "2:4" or kind.startswith("channel") else 0.9
        return IterativePruning(target, start_epoch=0, end_epoch=3, export_path=export_path, **options)
    if recipe == "learned-sharded":  # per-channel learned weight scales only, left to fully_shard: refused
        return QuantizationAwareTraining(4, None, scale="learned", start_epoch=1)
    if recipe == "learned-sharded-act":  # and a 0-dim activation scale, which fully_shard itself refuses
        return QuantizationAwareTraining(4, 8, scale="learned", start_epoch=1)
    if recipe == "8da4w":  # int4 weights in groups of 8, int8 dynamic per-token activations
        return QuantizationAwareTraining(
            4, 8, group_size=8, activation_granularity="per_token", start_epoch=1, export_path=export_path
        )
    if recipe == "bias":  # fixed point with the biases on the accumulator's grid (int32 codes in the file)
        return QuantizationAwareTraining(
            4, 8, scale="power_of_two", quantize_bias=True, start_epoch=1, export_path=export_path
        )
    if recipe.startswith("shift"):  # power-of-two scales whose shifts are searched on validation batches
        return QuantizationAwareTraining(4, 8, scale="power_of_two", shift_search=True, start_epoch=1)
    return QuantizationAwareTraining(4, 8, scale=recipe, start_epoch=1, export_path=export_path)


def trainer(
    strategy: str,
    max_epochs: int,
    callbacks: list,
    dirpath: str | None = None,
    distributed: bool = True,
    logger: Any = False,
    precision: str = "32-true",
    num_sanity_val_steps: int = 0,
) -> pl.Trainer:
    """``distributed=False``: FSDP2 saves full-state checkpoints (one file) instead of directories."""
    made = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed)
        if strategy == "fsdp2"
        else "ddp"
    )
    if dirpath is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=made, max_epochs=max_epochs, logger=logger,
        enable_checkpointing=dirpath is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=num_sanity_val_steps, callbacks=callbacks, precision=precision,
    )  # fmt: skip


def sharded_tiny(recipe: str) -> ShardedTiny:
    model = ShardedTiny(hidden=HIDDEN)
    if "channel" in recipe:  # channel pruning traces the model
        model.example_input_array = torch.zeros(2, 16)
    model.per_layer = not recipe.endswith("-root")  # shift-root, prune-root: the layers share the Sequential's unit
    model.ignore_scales = not recipe.startswith("learned-sharded")
    return model


def main(out_dir: str, strategy: str, jobs: list[str]) -> None:
    for job in jobs:
        recipe, _, resume = job.partition("@")
        recipe, _, extra = recipe.partition("+")
        suffix = {"export": ".lcz", "onnx": ".onnx", "late": ".onnx", "bf16": ".onnx"}.get(extra)
        # `.lcz` exports go to a directory that does not exist yet (trial BU: FSDP2 failed after training)
        folder = f"{out_dir}/exports" if suffix == ".lcz" else out_dir
        export_path = f"{folder}/{strategy}-{recipe}{suffix}" if suffix else None
        pl.seed_everything(0, verbose=False)
        model = sharded_tiny(recipe)
        if extra in ("onnx", "late", "bf16"):
            model.example_input_array = torch.zeros(2, 16)
            model.late_layer = extra == "late"
        made = callbacks(recipe, export_path)
        if resume:
            pruned = any(isinstance(c, IterativePruning) for c in made)
            epochs = 4 if pruned else 2  # a pruning schedule is set by max_epochs
            trainer(strategy, epochs, made, dirpath=f"{out_dir}/{recipe}-ckpt").fit(model)
            pl.seed_everything(0, verbose=False)
            model = sharded_tiny(recipe)
            made = callbacks(recipe)
            fit = trainer(strategy, 4, made)
            fit.fit(model, ckpt_path=f"{out_dir}/{recipe}-ckpt/epoch=1.ckpt")
        elif extra == "monitor":  # CompressionMonitor with TensorBoard histograms and charts
            made.append(CompressionMonitor(monitor="val_acc"))
            # with Lightning's default sanity check: its forward left the root unit gathered, and the monitor's
            # size estimate read freed shard storage (trial BE: a segfault)
            tb = TensorBoardLogger(f"{out_dir}/{strategy}-tb")
            fit = trainer(strategy, 4, made, logger=tb, num_sanity_val_steps=2)
            fit.fit(model)
        elif extra == "fullckpt":  # full-state checkpoints, for the plain module
            fit = trainer(strategy, 4, made, dirpath=f"{out_dir}/{recipe}-full", distributed=False)
            fit.fit(model)
        else:
            fit = trainer(strategy, 4, made, precision="bf16-true" if extra == "bf16" else "32-true")
            fit.fit(model)
        state = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
        callback = made[0]
        if isinstance(callback, IterativePruning):
            pruning = callback.state_dict()  # every process: sharded masks are gathered whole
            state.update({f"pruning.{k}": v for k, v in pruning["pruner"]["masks"].items()})
            state["pruning.decisions"] = torch.tensor([d.action == "rollback" for d in callback.decisions])
            state["val_acc"] = fit.callback_metrics["val_acc"].detach().clone()
            state["sparsity"] = torch.tensor(sparsity(model))  # every process's shards counted
        report = getattr(made[-1], "export_report", None)
        if report is not None:  # the ratio's baseline: the whole float model (trial BU: one process's shards)
            state["report.baseline_bytes"] = torch.tensor(report.baseline_bytes)
        if extra == "monitor":
            summary = made[-1].summary
            state["monitor"] = torch.tensor([summary["sparsity"], summary["bytes"], summary["compression_ratio"]])
        torch.save(state, f"{out_dir}/{strategy}-{job}_rank{fit.global_rank}.pt")


if __name__ == "__main__":
    from tests.callbacks._exit import run_and_leave_the_group

    run_and_leave_the_group(main, sys.argv[1], sys.argv[2], sys.argv[3].split(","))
