"""What ``QuantizationAwareTraining`` checks when a fit resumes, or a model is evaluated, from a checkpoint: the
quantizer entries it holds against the layers and settings of this fit's callbacks, before any value is read."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import nn

from .._lightning import is_lightning_module_class
from ..checkpoint import saved_quantization
from ..core.checks import first_line
from ..core.qat import QuantConfig, check_quantizer_state, check_saved_scales, qat_modules
from ..core.wrappers import plain_name

__all__ = [
    "QAT_KEY_SUFFIX",
    "attached_trainer",
    "check_learned_resume",
    "check_resumed_layers",
    "check_saved_settings",
    "checkpoint_quantization",
    "quantized_keys",
    "read_checkpoint_quantization",
]

QAT_KEY_SUFFIX = ".weight_fake_quant.state"


def quantized_keys(state_dict: dict[str, Any]) -> bool:
    """Whether a model's state dict holds quantizer entries (a quantized checkpoint)."""
    return any(key.endswith(QAT_KEY_SUFFIX) for key in state_dict)


def attached_trainer(module: nn.Module) -> pl.Trainer | None:
    """The Trainer ``module`` is attached to (``None``: not a LightningModule, or not attached)."""
    if not is_lightning_module_class(type(module)):  # pytorch_lightning's too (neuralforecast's: trial FI)
        return None
    try:
        return cast(pl.Trainer, cast(Any, module).trainer)
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def checkpoint_quantization(trainer: pl.Trainer | None) -> list[tuple[QuantConfig, list[str]]]:
    """What the checkpoint ``trainer`` is loading records of its quantization (``[]``: nothing readable). Read
    memory-mapped: the model's load hook runs before the callbacks see the checkpoint."""
    return read_checkpoint_quantization(trainer)[0]


def read_checkpoint_quantization(trainer: pl.Trainer | None) -> tuple[list[tuple[QuantConfig, list[str]]], str]:
    """:func:`checkpoint_quantization`, and why nothing could be read where the file is one ``torch.load`` refuses
    (trial FF: pytorch-forecasting keeps objects in its hyperparameters, and the warning said the checkpoint recorded
    no settings); ``""`` otherwise. Called from the model's load hook while Lightning restores ``trainer.ckpt_path``,
    which it has loaded already: a file the safe loader refuses is one the Trainer was told to unpickle."""
    path = None if trainer is None else trainer.ckpt_path
    if path is None or not Path(path).is_file():
        return [], ""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # objects the safe loader refuses: the settings may be there
        # read from the model's load hook, while Lightning restores this very file: it has just unpickled it, which
        # it does only with the Trainer's `weights_only=False` (trial GE: chemprop keeps metric objects in its
        # hyperparameters; its 4-bit checkpoint was evaluated as 8-bit, with a warning that the settings were unread)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            return [], f"torch.load(weights_only=True) cannot read it ({first_line(err, 160)})"
    except Exception:  # another format (a distributed checkpoint's directory, a legacy file): this callback's
        return [], ""
    return saved_quantization(checkpoint), ""


def check_saved_settings(config: QuantConfig, layers: list[str], saved: list[tuple[QuantConfig, list[str]]]) -> None:
    """The model's quantizers hold the checkpoint's scales, ranges and flags: under other settings (bits, scale
    kind, groups, granularity) they would mean something else (a trial: 8-bit scales, loaded into 4-bit
    quantizers by a resume with `weight_bits=4` at the end of the run, clamped every weight: chance accuracy,
    while the warning said the callback started afresh). The observers' averaging constant may change."""
    mine = set(layers)
    for was_config, was_layers in saved:
        if not mine & set(was_layers):
            continue
        was, wanted = was_config.to_dict(), config.to_dict()
        differ = [k for k in wanted if k != "averaging_constant" and was.get(k) != wanted[k]]
        if differ:
            said = ", ".join(f"{k}={was.get(k)!r} (this callback: {wanted[k]!r})" for k in differ)
            raise ValueError(
                f"QuantizationAwareTraining: the checkpoint's quantizers of these layers were trained with {said}; "
                "their saved scales and ranges do not carry over to other settings. Resume with the settings "
                "of the run being resumed, or start a new fit from its weights (without `ckpt_path`)."
            )


def check_learned_resume(config: QuantConfig, state_key: str, layers: list[str], checkpoint: dict[str, Any]) -> None:
    """A learned-scale fit resumed from a checkpoint saved without such a callback: its optimizer state holds no
    learned scales (torch's own error came later, from the optimizer: "a parameter group that doesn't match the
    size"). A state under another key that quantized these layers (``include`` written otherwise) holds them
    (trial BJ)."""
    if (
        config.scale == "learned"
        and checkpoint.get("optimizer_states")
        and state_key not in checkpoint.get("callbacks", {})
        and not any(set(layers) & set(saved) for _, saved in saved_quantization(checkpoint))
    ):
        raise ValueError(
            "QuantizationAwareTraining(scale='learned'): the checkpoint was saved without this callback (no state "
            "under its key), so its optimizer state holds no learned scales and cannot be restored into an "
            "optimizer that trains them. Load its weights into the model and fit without `ckpt_path` to add "
            "learned-scale QAT, or resume with the callbacks the checkpoint was saved with."
        )


def check_resumed_layers(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, config: QuantConfig, layers: list[str]
) -> set[str]:
    """Check the weights a fit resumes from before any value is read: the layers they quantize are this fit's
    (Lightning's strict load failed with a raw list of unexpected keys, a trial), with this callback's settings
    (``config``, for its ``layers``), and their scales and quantizer state are ones a quantizer writes. Returns the
    layers the weights hold quantizer entries for."""
    saved = {k[len(prefix) : -len(QAT_KEY_SUFFIX)] for k in state_dict if k.endswith(QAT_KEY_SUFFIX)}
    # every name of a layer registered twice (`self.backbone = nn.Sequential(self.fc0)`), as the state dict has
    # them (a trial: the same callback's checkpoint was refused)
    quantized = {id(m) for _, m in qat_modules(module)}
    # plain names, as the state dict has them under activation checkpointing's wrappers (trial GD)
    named = [(plain_name(name), m) for name, m in module.named_modules(remove_duplicate=False)]
    mine = {name for name, m in named if id(m) in quantized}
    modules = dict(named)  # (a layer wrapped alone: its plain name is its wrapper's too, listed before it)
    quantizer_of = {name: id(cast(Any, modules[name]).weight_fake_quant) for name in mine}
    tied = {quantizer_of[n] for n in saved & mine}
    extra = sorted(n for n in mine - saved if quantizer_of[n] in tied)
    if saved and saved < mine and extra == sorted(mine - saved):
        raise ValueError(
            f"QuantizationAwareTraining: the checkpoint leaves {extra[:5]} float, tied to a layer it quantizes: it was "
            "written before layers tied to one weight shared its quantizer, and this version quantizes them together. "
            "Load it with `load_qat_checkpoint` (which converts as it was written) to evaluate it, or start the fit "
            "afresh."
        )
    if saved and saved != mine:
        raise ValueError(
            f"QuantizationAwareTraining: the checkpoint quantizes the layers {sorted(saved)[:5]}"
            f"{' ...' if len(saved) > 5 else ''}, this fit's QuantizationAwareTraining callbacks "
            f"{sorted(mine)[:5]}{' ...' if len(mine) > 5 else ''}: pass the `include`/`exclude` of the run being "
            "resumed (one callback per set of settings it used), or load it for inference with "
            "`load_qat_checkpoint`."
        )
    check_saved_settings(config, layers, checkpoint_quantization(attached_trainer(module)))  # before values are read
    check_saved_scales(state_dict, prefix)
    check_quantizer_state(module, state_dict, prefix)
    return saved
