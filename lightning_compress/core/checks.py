"""Argument checks: each error names the argument, the value and what is allowed."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeGuard

from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

__all__ = [
    "caller_level",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_module",
    "check_output_path",
    "check_path",
    "first_line",
    "is_integer",
    "is_lazy",
    "is_real",
]


def is_integer(value: object) -> TypeGuard[numbers.Integral]:
    """An integer: ``int`` or any ``numbers.Integral`` (a numpy integer from a sweep), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[numbers.Real]:
    """A real number: ``int``, ``float`` or any ``numbers.Real`` (numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value: Any, argument: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not is_integer(value):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"`{argument}` must be {kind}, got {type(value).__name__} ({value!r}).")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{argument}`={value} must be >= {minimum}.")
    return value


def check_choice(value: Any, argument: str, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}`={value!r} is not one of {tuple(choices)}.")
    return value


def check_float(value: Any, argument: str, *, minimum: float = 0.0, finite: bool = False) -> float:
    if not is_real(value):
        raise TypeError(f"`{argument}` must be a float, got {type(value).__name__} ({value!r}).")
    value = float(value)
    if not value >= minimum:
        raise ValueError(f"`{argument}`={value} must be >= {minimum}.")
    if finite and not math.isfinite(value):
        raise ValueError(f"`{argument}`={value} must be a finite number.")
    return float(value)


def check_bool(value: Any, argument: str, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        kind = "True, False or None" if optional else "True or False"
        raise TypeError(f"`{argument}` must be {kind}, got {type(value).__name__} ({value!r}).")
    return value


def is_lazy(tensor: object) -> bool:
    """A parameter or buffer of a lazy module (``nn.LazyLinear``, ...) before its first forward: no shape yet."""
    return isinstance(tensor, (UninitializedParameter, UninitializedBuffer))


def check_module(value: Any, argument: str = "model", *, materialized: bool = False) -> nn.Module:
    """An ``nn.Module``; ``materialized``: whose parameters and buffers hold values (none on the meta device)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{argument}` must be a torch.nn.Module, got {type(value).__name__}.")
    lazy = next((n for n, t in [*value.named_parameters(), *value.named_buffers()] if is_lazy(t)), None)
    if lazy is not None:
        raise ValueError(
            f"`{argument}` has parameters a lazy module has not created yet ({lazy!r}, ...: nn.LazyLinear, "
            "nn.LazyConv2d, ...): run one forward pass on an example batch first, so they get their shapes."
        )
    if materialized:
        meta = next((n for n, t in [*value.named_parameters(), *value.named_buffers()] if t.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"`{argument}` has tensors on the meta device ({meta!r}, ...): they hold no values. Materialize "
                "the model first (e.g. `model.to_empty(device='cpu')` and load its weights)."
            )
    return value


def check_path(value: Any, argument: str = "path", also: str = "") -> Path:
    """``value`` as a ``Path``; ``also`` names what else the caller takes (said in the ``TypeError``)."""
    if isinstance(value, (str, os.PathLike)) and not str(os.fspath(value)):
        raise ValueError(f"`{argument}` is an empty path: name a file.")
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"`{argument}` must be a file path (str or os.PathLike){also}, got {type(value).__name__} ({value!r})."
        )
    return Path(value)


def check_output_path(value: Any, argument: str = "path", *, create_parents: bool = False) -> Path:
    """A path a file can be written to: not a directory, in a writable directory (``create_parents``: one that
    exists or can be created)."""
    path = check_path(value, argument)
    if path.is_dir():
        raise ValueError(f"`{argument}`={str(path)!r} is a directory; name a file in it.")
    parent = path.parent
    if not parent.exists() and not create_parents:
        raise ValueError(f"`{argument}`={str(path)!r} cannot be written: its directory {str(parent)!r} does not exist.")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise OSError(f"{str(parent)!r} is not a directory")
        with tempfile.TemporaryFile(dir=parent):  # the one reliable test (permissions, read-only mounts, /proc)
            pass
    except OSError as err:
        raise ValueError(f"`{argument}`={str(path)!r} cannot be written: {err}.") from None
    return path


def caller_level() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the function calling this one name the first frame outside
    this package: the user's call of ``prune_`` or ``convert_to_qat`` (trial FD: the selection's warnings named
    ``core/functional.py``), whichever entry point reached the warning."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the function that warns: level 1
    level = 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("lightning_compress."):
        frame = frame.f_back
        level += 1
    return level


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err``'s message (its type's name where it has none), cut to ``limit`` characters: what a
    message quotes of another library's error (the rest may be a dump of a graph)."""
    text = _ANSI.sub("", str(err))  # a terminal's colour codes (torch's pickle errors are bold: trial GE)
    line = (text.strip().splitlines() or [type(err).__name__])[0]
    return line if limit is None else line[:limit]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
