"""Quantizer entries of a state dict about to be loaded (a resumed fit, ``load_qat_checkpoint``, a compressed file):
what a quantizer could have saved, checked before anything is loaded."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fake_quant import FakeQuantizer

__all__ = ["check_quantizer_state", "check_saved_scales", "check_scales"]


def _quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]


def check_scales(name: str, scale: Tensor, signed: bool = False) -> None:
    """Scales a quantizer can hold: finite floats and, unless ``signed``, at least float32's smallest normal number,
    which quantizers floor the scales they set at (a forged subnormal scale made every output NaN). ``signed``: a
    learned scale in training may cross zero (its quantizer uses ``|scale|``).

    Raises:
        ValueError: naming ``name`` and what its scales must be.
    """
    tiny = torch.finfo(torch.float32).tiny
    # a block at a time: group scales of groups of 2 are half as many as the weights (a whole float32 copy of them
    # took a trial's load past twice the model's size)
    blocks = scale.detach().reshape(-1).split(1 << 18) if scale.is_floating_point() else ()
    if not scale.is_floating_point() or not all(
        bool(torch.isfinite(b).all()) and (signed or not bool((b.float() < tiny).any())) for b in blocks
    ):
        need = "finite floats" if signed else f"finite floats of at least {tiny:.3g} (the smallest a quantizer sets)"
        raise ValueError(f"{name}: scales that are not all {need}.")


def check_saved_scales(state_dict: dict[str, Any], prefix: str) -> None:
    """Every quantizer scale in a state dict about to be loaded is finite (a trial: a NaN scale passed, and the first
    pruning event blamed the weights and gradients); its sign is checked with the model (learned scales may cross
    zero), by :func:`check_quantizer_state`."""
    for key, value in state_dict.items():
        if key.endswith("_fake_quant.scale") and isinstance(value, Tensor):
            _check_stored(key[len(prefix) :], value)
            check_scales(key[len(prefix) :], value, signed=True)


def check_quantizer_state(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> None:
    """The entries of ``model``'s quantizers in a state dict about to be loaded hold what a quantizer can: integer
    zero points inside its range, integer flags it knows, observed ranges that are numbers (a trial: a compressed
    file refused a zero point of 10^6, NaN ranges and unknown flags, which a checkpoint loaded and which then moved
    the outputs by up to 1.7).

    Raises:
        ValueError: naming the first entry that a quantizer could not have saved.
    """
    quantizers = _quantizers(model)
    for name, quantizer in quantizers:  # shapes first: nothing below reads a value the model could not hold
        for entry, current in [*quantizer.named_parameters(recurse=False), *quantizer.named_buffers(recurse=False)]:
            value = state_dict.get(f"{prefix}{name}.{entry}")
            if isinstance(value, Tensor) and value.shape != current.shape:
                raise ValueError(
                    f"{name}.{entry}: shape {tuple(value.shape)}, where the model's quantizer holds "
                    f"{tuple(current.shape)}: a checkpoint of another model, or a damaged one."
                )
            if isinstance(value, Tensor):
                _check_stored(f"{name}.{entry}", value)
    for name, quantizer in quantizers:
        key = f"{prefix}{name}."
        for entry in ("zero_point", "shift", "state"):
            value = state_dict.get(key + entry)
            if isinstance(value, Tensor) and (
                value.is_floating_point() or value.is_complex() or value.dtype is torch.bool
            ):
                raise ValueError(f"{name}.{entry}: a {value.dtype} tensor; a quantizer saves integers there.")
        flags = state_dict.get(key + "state")
        if isinstance(flags, Tensor) and bool(((flags.long() & ~quantizer.KNOWN_FLAGS) != 0).any() | (flags < 0).any()):
            raise ValueError(f"{name}.state: flags a quantizer does not have ({flags.flatten()[:4].tolist()}).")
        # the range the loaded flags give (trial DC: a file turning the signed flag on kept a zero point of 200)
        low, high = quantizer.qrange_of(int(flags)) if isinstance(flags, Tensor) else quantizer.qrange
        scale = state_dict.get(key + "scale")
        if isinstance(scale, Tensor):
            check_scales(f"{name}.scale", scale, signed=quantizer.mode == "learned")
        shift = state_dict.get(key + "shift")
        if isinstance(shift, Tensor) and not shift.is_floating_point() and bool((shift.abs() > 126).any()):
            raise ValueError(f"{name}.shift: shifts beyond ±126, outside float32's normal scales 2**-126..2**126.")
        if quantizer.mode == "power_of_two" and isinstance(scale, Tensor) and isinstance(shift, Tensor):
            _check_power_of_two(name, scale, shift)
        zero_point = state_dict.get(key + "zero_point")
        if isinstance(zero_point, Tensor) and bool((zero_point < low).any() or (zero_point > high).any()):
            raise ValueError(f"{name}.zero_point: zero points outside the quantizer's range {low}..{high}.")
        for bound in ("min_val", "max_val"):
            value = state_dict.get(key + bound)
            if isinstance(value, Tensor) and (not value.is_floating_point() or not bool(torch.isfinite(value).all())):
                raise ValueError(
                    f"{name}.{bound}: an observed range that is not a finite number (NaN, infinite or not floating "
                    "point)."
                )


def _check_power_of_two(name: str, scale: Tensor, shift: Tensor) -> None:
    """A power-of-two quantizer's scale is ``2**-shift``, as it sets it (rounded to its dtype): a trial's file
    with a scale of 0.3 beside a shift of 8 loaded, and its ONNX export wrote 0.3 where fixed point needs a power of
    two."""
    if scale.shape != shift.shape or scale.is_complex():
        return  # shapes were checked against the model's quantizer; a complex scale is refused by `check_scales`
    expected = torch.pow(2.0, -shift.float()).to(scale.dtype)
    if not torch.equal(scale, expected):
        raise ValueError(
            f"{name}.scale: {scale.flatten()[:4].tolist()} beside a shift of {shift.flatten()[:4].tolist()}; a "
            "power-of-two quantizer's scale is 2**-shift: the state is damaged or forged."
        )


def _check_stored(name: str, value: Tensor) -> None:
    """A quantizer entry holds its own values: a tensor expanded from fewer stored values (a stride-0 view, a few
    bytes in the file) is not what a quantizer saves, and reading it would allocate all its elements (a trial: a
    12 KB checkpoint took 7 GB)."""
    if value.numel() and value.untyped_storage().nbytes() < value.numel() * value.element_size():
        raise ValueError(
            f"{name}: {value.numel()} values stored in {value.untyped_storage().nbytes()} bytes (an expanded view); "
            "a quantizer saves each of its values: the checkpoint is damaged."
        )
