"""The compression callbacks' settings as hyperparameters of every logger."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["log_settings"]


def log_settings(trainer: pl.Trainer, pl_module: pl.LightningModule, caller: Callback) -> None:
    """Log every compression callback's :meth:`compression_settings` as ``compress/<kind>/<name>`` (the second
    callback of a kind as ``compress/<kind>1/...``: two QAT callbacks on disjoint layers overwrote each other's
    values), in one set with the module's own hyperparameters, by the first compression callback only.

    TensorBoard's HParams view shows the first set a run logs: the callbacks log at ``on_fit_start``, before
    Lightning logs the module's hyperparameters, and a set of their own hid the module's from that view.
    """
    mine = [c for c in trainer.callbacks if callable(getattr(c, "compression_settings", None))]  # type: ignore[attr-defined]
    if not trainer.loggers or not mine or mine[0] is not caller:
        return
    values: dict[str, Any] = dict(pl_module.hparams_initial)
    seen: dict[str, int] = {}
    for callback in mine:
        kind, settings = callback.compression_settings()
        index = seen[kind] = seen.get(kind, -1) + 1
        values.update({f"compress/{kind}{index or ''}/{name}": _primitive(v) for name, v in settings.items()})
    for logger in trainer.loggers:
        logger.log_hyperparams(values)


def _primitive(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
