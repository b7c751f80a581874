"""The strategies the callbacks run under, and the collectives they use through them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .._lightning import overrides
from ..core.checks import check_choice, check_float, check_int

__all__ = [
    "StrategyCollectives", "check_choice", "check_float", "check_int", "check_strategy", "may_shard",
    "trained_max_epochs", "weight_averaging",
]  # fmt: skip


def sanity_check_is_a_baseline(trainer: Any) -> bool:
    """Whether the sanity check just run scores the model before training as a whole validation would: only when
    the Trainer was asked for every validation batch (``num_sanity_val_steps=-1``), the setting for a model trained
    before this fit. Lightning's default two batches never count, even on a validation set that has no more: the
    model they score has not trained yet, and a fit that trains it from scratch got its random start as the
    baseline, against which the guard accepted every drop (trial EG: 98.5% sparse at 39.8% accuracy, the baseline
    12.7%, with `max_drop`=0.02)."""
    asked_for_all = trainer.num_sanity_val_steps == float("inf")
    return asked_for_all and list(trainer.num_sanity_val_batches) == list(trainer.num_val_batches)


def built_late_note(pl_module: Any, what: str) -> str:
    """The likely cause, when ``what`` (a callback's work at ``setup``) found no layers or could not run the model:
    Lightning calls the callbacks' ``setup`` before the LightningModule's own ``setup`` and ``configure_model``, so
    layers built in either do not exist yet (trial EG: a head sized by the datamodule's class count, built in
    ``setup`` as Lightning documents, was refused as "select no weight" and as example inputs that do not run).
    Empty when the module overrides neither hook."""
    name = type(pl_module).__name__
    late = [f"{name}.{hook}" for hook in ("setup", "configure_model") if overrides(hook, pl_module)]
    if not late:
        return ""
    return (
        f" {what} at `setup`, before {' and '.join(late)} run (Lightning calls its callbacks first): layers built "
        "there do not exist yet. Build the layers in `__init__` (`configure_model` may still shard them)."
    )


@contextmanager
def noting_layers_built_late(pl_module: Any, what: str, only_if: str | None = None) -> Iterator[None]:
    """A ``ValueError`` raised inside gets :func:`built_late_note`'s likely cause appended (when the module builds
    layers in ``setup``/``configure_model``, and the message holds ``only_if`` when given)."""
    try:
        yield
    except ValueError as err:
        note = built_late_note(pl_module, what)
        if not note or (only_if is not None and only_if not in str(err)):
            raise
        raise ValueError(f"{err}{note}") from err


def check_strategy(trainer: Any, callback: str) -> None:
    """Refuse strategies the callback cannot run under: FSDP1 and DeepSpeed (FSDP2 through
    ``ModelParallelStrategy``, DDP and a single device are supported)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        fsdp2 = (
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` in configure_model"
        )
        raise ValueError(
            f"{callback} does not support {type(strategy).__name__}: it flattens or wraps the parameters, so "
            f"per-weight masks and fake-quant layers cannot attach to them. Use strategy='ddp', a single device or "
            f"FSDP2 ({fsdp2})."
        )


def runs_in_spawned_processes(trainer: Any) -> bool:
    """Whether the fit runs in processes the launcher starts (``strategy="ddp_spawn"``, ``"ddp_fork"``,
    ``"ddp_notebook"``) and hands back to the caller's model only its weights (Lightning loads them with
    ``strict=False``): a layer the callback converted, and the callback's own state, stay in those processes."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return callable(getattr(launcher, "update_main_process_results", None))


def weight_averaging(trainer: Any) -> list[Any]:
    """Lightning's weight-averaging callbacks in the fit (``StochasticWeightAveraging`` and the
    ``WeightAveraging`` family, e.g. ``EMAWeightAveraging``): they replace the trained weights with an average at
    the end of fit, and ``WeightAveraging`` also validates the average and averages buffers."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning before 2.6
        averaging: tuple[type, ...] = (StochasticWeightAveraging,)
    else:
        averaging = (StochasticWeightAveraging, WeightAveraging)
    return [c for c in getattr(trainer, "callbacks", []) if isinstance(c, averaging)]


def trained_max_epochs(trainer: Any) -> int | None:
    """The Trainer's ``max_epochs`` without the epoch ``StochasticWeightAveraging`` adds, for a model with
    BatchNorm, to recompute its statistics: no optimizer step runs in that epoch, so a schedule that ended there
    would never finish (its ``swa_end`` is the last epoch that trains)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is None or max_epochs < 0:
        return max_epochs
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, StochasticWeightAveraging):
            try:
                max_epochs = min(max_epochs, int(callback.swa_end) + 1)
            except (AttributeError, TypeError, OverflowError):  # before its setup, or unlimited epochs
                continue
    return max_epochs


def fast_dev_run_note(trainer: Any, fix: str = "give them no epoch arguments") -> str:
    """What to add to a refusal that Lightning's ``fast_dev_run`` caused (it sets ``max_epochs=1``): ``fix`` is what
    else makes the callback fit one short epoch (trial CT: an accuracy guard was told to drop its epoch arguments,
    which it did not have)."""
    if not getattr(trainer, "fast_dev_run", False):
        return ""
    return (
        " (Lightning's `fast_dev_run` runs one short epoch whatever `max_epochs` says: leave the compression "
        f"callbacks out of a fast_dev_run, or {fix}.)"
    )


def may_shard(trainer: Any) -> bool:
    """Whether ``configure_model`` may shard the parameters (FSDP2 through ``ModelParallelStrategy``): what needs
    the whole model (tracing channel groups) must then be done at ``setup``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


class StrategyCollectives:
    """:class:`~lightning_compress.core.collectives.Collectives` through ``trainer.strategy``."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def rank(self) -> int:
        return int(self.strategy.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.strategy.world_size)

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Reduced on the strategy's device (NCCL reduces CUDA tensors only), returned on ``tensor``'s."""
        if self.world_size == 1:
            return tensor
        return self.strategy.reduce(tensor.to(self.strategy.root_device), reduce_op=op).to(tensor.device)


def warn_if_saved_under_another_key(checkpoint: dict[str, Any], callback: Any) -> None:
    """Lightning restores a callback's state only under the same ``state_key``, which holds its arguments: a
    resume with changed arguments dropped the saved state without a word. Say so."""
    name = type(callback).__name__
    saved = [key for key in checkpoint.get("callbacks", {}) if str(key).startswith(name)]
    if saved and callback.state_key not in saved:
        rank_zero_warn(
            f"{name}: the checkpoint holds the state of {str(saved[0])[:300]}, saved with other arguments than this "
            f"one's ({callback.state_key}), so Lightning does not restore it: this {name} starts afresh. Pass the "
            "arguments of the run being resumed to continue it."
        )
