"""Loading checkpoints written with the compression callbacks, without the callbacks."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
import torch

from ._lightning import is_lightning_module_class
from .core.checks import check_path, first_line
from .core.qat import QuantConfig, check_quantizer_state, check_saved_scales, convert_listed

__all__ = ["load_qat_checkpoint", "saved_quantization"]

M = TypeVar("M", bound=pl.LightningModule)


_QUANTIZER_STATE = ".weight_fake_quant.state"  # a fake-quant layer's entry in a state dict


def _built(module_class: type[M], checkpoint_path: Any, start: int | None, **kwargs: Any) -> M:
    """``module_class.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)``; a class whose override passes
    ``weights_only`` itself (chemprop's ``MPNN`` passes ``weights_only=False``: trial GE, a `TypeError` of multiple
    values, unexplained) is called without it, the file having been read with the caller's setting already."""
    try:
        return module_class.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    except TypeError as err:
        if "multiple values for keyword argument 'weights_only'" not in str(err):
            raise
    if start is not None:  # an open file: read again from where it started
        cast(Any, checkpoint_path).seek(start)
    return module_class.load_from_checkpoint(
        checkpoint_path, strict=False, **{k: v for k, v in kwargs.items() if k != "weights_only"}
    )


def load_qat_checkpoint(
    module_class: type[M],
    checkpoint_path: str | Path,
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    **kwargs: Any,
) -> M:
    """Load a checkpoint saved during quantization-aware training, ready for inference.

    One line, no callback, no Trainer::

        model = load_qat_checkpoint(MyModule, "epoch=9.ckpt")

    The module is built as ``module_class.load_from_checkpoint`` would build it (hyperparameters,
    ``kwargs``), its layers are converted to the fake-quant layers recorded in the checkpoint, the
    full state (weights, scales, zero points, shifts, on/off flags) is loaded strictly, and the
    model is returned in eval mode: its outputs are what the quantized model computes.

    Args:
        module_class: the LightningModule class the checkpoint was saved from.
        checkpoint_path: a path, or an open binary file.
        map_location: where the tensors are loaded (as ``torch.load``'s; default ``"cpu"``).
        weights_only: read the file with ``torch.load``'s safe loader (tensors and primitive types only; the
            default). ``False`` unpickles any object, which runs code the file names: only for a checkpoint you
            trust whose hyperparameters hold objects (pytorch-forecasting keeps its normalizers and loss there).
        **kwargs: passed to the module's constructor over the saved hyperparameters.

    Raises:
        TypeError: ``module_class`` is not a LightningModule class, ``checkpoint_path`` is not a path or file, or
            ``weights_only`` is not a bool.
        ValueError: the safe loader cannot read the checkpoint (``weights_only=True``), the checkpoint holds
            no ``QuantizationAwareTraining`` state, or one that does not fit
            ``module_class`` or that quantizers could not have saved (a damaged checkpoint).
    """
    if not is_lightning_module_class(module_class):  # lightning.pytorch's or pytorch_lightning's
        raise TypeError(
            f"`module_class` must be a LightningModule subclass (the class, not an instance), got {module_class!r}."
        )
    if not isinstance(weights_only, bool):
        raise TypeError(f"`weights_only` must be a bool, got {weights_only!r}.")
    if not callable(getattr(checkpoint_path, "read", None)):
        checkpoint_path = check_path(checkpoint_path, "checkpoint_path", " or an open binary file")
        if checkpoint_path.is_dir():  # a trial: ModelParallelStrategy's default, told only "not a file"
            raise ValueError(
                f"`checkpoint_path`={str(checkpoint_path)!r} is a folder: a distributed checkpoint (shards, as "
                "ModelParallelStrategy writes by default). load_qat_checkpoint reads one file: train with "
                "`ModelParallelStrategy(save_distributed_checkpoint=False)`, or convert the folder to one file first."
            )
        if not checkpoint_path.is_file():
            raise ValueError(f"`checkpoint_path`={str(checkpoint_path)!r} is not a file.")
    tell, seek = getattr(checkpoint_path, "tell", None), getattr(checkpoint_path, "seek", None)
    start = tell() if callable(tell) and callable(seek) else None
    try:
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        first = first_line(err, 160)
        raise ValueError(  # trial FF: pytorch-forecasting's checkpoints keep objects in their hyperparameters
            f"{checkpoint_path} cannot be read by torch.load(weights_only=True) ({first}): it holds objects, not "
            "only tensors. If you trust the file, pass `weights_only=False` (unpickling runs code the file names)."
        ) from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(
            f"{checkpoint_path} is not a Lightning checkpoint: it has no `state_dict` mapping names to tensors "
            f"(found {type(state).__name__})."
        )
    saved = saved_quantization(checkpoint)
    if not saved and any(key.endswith(_QUANTIZER_STATE) for key in state):
        raise ValueError(  # a trial: it pointed to `load_from_checkpoint`, which failed on the quantizer entries
            f"{checkpoint_path} holds fake-quant layers but no QuantizationAwareTraining state (saved with "
            "`save_weights_only=True`?): the settings they were trained with (bits, scale kind) are not in it. "
            "Evaluate it with `trainer.validate(model, ckpt_path=...)` beside a QuantizationAwareTraining callback "
            "with the run's settings, or save whole checkpoints."
        )
    if not saved:
        raise ValueError(
            f"{checkpoint_path} holds no QuantizationAwareTraining state; load it with "
            f"{module_class.__name__}.load_from_checkpoint instead."
        )
    _check_disjoint(saved, checkpoint_path)
    with warnings.catch_warnings():  # the quantizer entries: loaded strictly just below, once the layers exist
        warnings.filterwarnings("ignore", message=".*Found keys that are not in the model state dict.*")
        if start is not None and callable(seek):  # an open file: read again from where it started
            seek(start)
        try:
            model = _built(module_class, checkpoint_path, start, map_location=map_location, weights_only=weights_only,
                           **kwargs)  # fmt: skip
        except RuntimeError as err:  # torch's size mismatch: weights of another width
            said = " ".join(str(err).split())[:300]  # torch's message spans lines
            raise ValueError(f"{checkpoint_path} does not fit {module_class.__name__}: {said}") from err
        except TypeError as err:
            if "required" not in str(err) or "argument" not in str(err):
                raise
            raise TypeError(  # trial FS: pytorch-tabular's models take their config objects, which it does not save
                f"{module_class.__name__} cannot be built from the checkpoint's hyperparameters ({first_line(err, 200)}"
                "): pass the arguments it lacks to load_qat_checkpoint as keywords, as to `load_from_checkpoint`, e.g. "
                "`load_qat_checkpoint(MyModule, path, config=...)`."
            ) from err
    for config, layers in saved:  # every QuantizationAwareTraining callback's layers (disjoint), with its settings
        convert_listed(model, config, layers)
    try:
        check_saved_scales(state, "")  # not finite and positive: the checkpoint is damaged
        check_quantizer_state(model, state)
    except ValueError as err:
        raise ValueError(f"{checkpoint_path}: {err}") from err
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:  # a quantizer keeps its fresh state for a missing entry: the model would compute in float
        raise ValueError(
            f"{checkpoint_path} lacks {len(missing)} entries of the quantized model ({missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}): its quantizers' state is incomplete, so the model would not "
            "compute what the quantized one did."
        )
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ValueError(
            f"{checkpoint_path} holds {len(unexpected)} entries {module_class.__name__} does not have "
            f"({[k[:60] for k in unexpected[:3]]}{' ...' if len(unexpected) > 3 else ''}): a checkpoint of another "
            "model, or a damaged one."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_disjoint(saved: list[tuple[QuantConfig, list[str]]], path: Any) -> None:
    """Each layer is quantized by one callback: two states that name the same layer contradict each other (a trial:
    the second, 4-bit, state was dropped without a word)."""
    seen: dict[str, QuantConfig] = {}
    for config, layers in saved:
        for name in layers:
            if name in seen:
                raise ValueError(
                    f"{path} holds two QuantizationAwareTraining states that both quantize {name!r} ({seen[name]} "
                    f"and {config}): the checkpoint is damaged."
                )
            seen[name] = config


def saved_quantization(checkpoint: dict[str, Any]) -> list[tuple[QuantConfig, list[str]]]:
    """``(settings, layer names)`` of every ``QuantizationAwareTraining`` callback whose state a Lightning checkpoint
    holds (layers converted by then only)."""
    callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    found = []
    for key, state in callbacks.items() if isinstance(callbacks, dict) else []:
        if not (str(key).startswith("QuantizationAwareTraining") and isinstance(state, dict) and state.get("layers")):
            continue
        if state.get("version") != 1:
            raise ValueError(
                f"the checkpoint's QuantizationAwareTraining state has version {repr(state.get('version'))[:40]}, "
                "not 1 (the only one written so far); the checkpoint is damaged or from a newer release."
            )
        layers, config = state["layers"], state.get("config")
        if not (isinstance(layers, list) and all(isinstance(name, str) for name in layers)):
            raise ValueError(f"the checkpoint's QuantizationAwareTraining state has layers={str(layers)[:80]}: a list "
                             "of layer names is saved; the checkpoint is damaged.")  # fmt: skip
        try:
            if not isinstance(config, dict):
                raise TypeError(f"a dict is saved, not {type(config).__name__}")
            found.append((QuantConfig(**config), list(layers)))
        except (TypeError, ValueError) as err:  # not a dict, an unknown setting, a value out of range
            raise ValueError(
                f"the checkpoint's QuantizationAwareTraining state has settings {str(config)[:120]} that are not "
                f"a QuantConfig's ({err}); the checkpoint is damaged."
            ) from err
    return found
