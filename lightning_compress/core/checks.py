"""Argument checks: each error names the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["check_choice", "check_float", "check_int"]


def check_int(value: Any, argument: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"`{argument}` must be {kind}, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"`{argument}`={value} must be >= {minimum}.")
    return value


def check_choice(value: Any, argument: str, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}`={value!r} is not one of {tuple(choices)}.")
    return value


def check_float(value: Any, argument: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argument}` must be a float, got {type(value).__name__} ({value!r}).")
    if not value >= minimum:
        raise ValueError(f"`{argument}`={value} must be >= {minimum}.")
    return float(value)
