"""Calling a model the way Lightning does, and running it as a plain float model for tracing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .qat import quantizers

__all__ = ["call_model", "check_example_inputs", "eval_mode", "output_tensors", "plain_float", "without_cache"]


@contextlib.contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` meanwhile on every ``transformers`` config in ``model`` (a model wrapped in a
    LightningModule has its config one level down), so that it returns outputs, not caches; restored after."""
    cached: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if id(config) not in cached and getattr(config, "use_cache", None):
            cached[id(config)] = config
    for config in cached.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in cached.values():
            config.use_cache = True


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way Lightning calls it with ``example_input_array``, with caches off."""
    with without_cache(model):
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode; each module's own training flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def plain_float(model: nn.Module) -> Iterator[None]:
    """The float data flow in eval mode: fake quantizers off; everything restored afterwards."""
    saved = []
    for _, q in quantizers(model):
        saved.append((q, q.fake_quant_enabled, q.observer_enabled))
        q.fake_quant_enabled = False
        q.observer_enabled = False
    try:
        with eval_mode(model):
            yield
    finally:
        for q, fq, ob in saved:
            q.fake_quant_enabled = fq
            q.observer_enabled = ob


def check_example_inputs(
    model: nn.Module, example_inputs: Any, argument: str = "example_inputs", why: str = ""
) -> None:
    """Run ``model`` once on ``example_inputs`` (float, eval mode, no gradients) before anything traces it: inputs
    its ``forward`` does not take fail here with a ``ValueError`` naming ``argument``, not deep inside a tracer.

    ``why``: what the inputs are for, put before the message (e.g. the export path)."""
    try:
        with torch.no_grad(), plain_float(model):
            call_model(model, example_inputs)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{why}`{argument}` does not run through {type(model).__name__}'s forward ({type(err).__name__}: "
            f"{first}): pass what `forward` takes, with the shapes it expects (a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs)."
        ) from err


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model's output (nested tuples, lists, dicts and ``ModelOutput``s)."""
    flat: list[Tensor] = []
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            flat.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return flat
