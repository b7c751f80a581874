"""Reload a compacted ``transformers`` model that ``save_pretrained`` wrote.

``type(model).from_pretrained`` builds the sizes its config describes. When compaction left sizes
the config cannot describe (see :mod:`lightning_compress.core.model_config`), the config carries a
``lightning_compress`` entry and :func:`from_pretrained` rebuilds the original architecture, cuts it
to the recorded sizes and head counts, and lets ``transformers`` load the weights into it (its own
loader renames checkpoint keys, handles shards and tied weights, and reports what is missing).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..core.compact import mark_compacted
from ..core.model_config import CONFIG_KEY
from ..core.shrink import check_shapes, set_head_record, shrink_like

__all__ = ["from_pretrained"]

_QUANTIZER_KEY = "_fake_quant."


def _warn_if_quantized(directory: Path) -> None:
    """A QAT model's ``save_pretrained`` holds its fake quantizers' state, which ``from_pretrained`` builds no layer
    for: the model comes back float. Said, with what keeps the quantized model (a trial: transformers' own report of
    unexpected keys was the only sign, and the logits were 0.049 off)."""
    try:
        from safetensors import safe_open
    except ImportError:  # transformers installs it; without it there is nothing this can read
        return
    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as saved:
            keys += [key for key in saved.keys() if _QUANTIZER_KEY in key]  # noqa: SIM118 (not a dict)
    if keys:
        layers = sorted({key.split(_QUANTIZER_KEY)[0].rsplit(".", 1)[0] for key in keys})
        warnings.warn(
            f"{directory} holds the fake quantizers' state of a quantization-aware model ({len(keys)} entries, "
            f"layers {layers[:3]}{' ...' if len(layers) > 3 else ''}): `from_pretrained` builds float layers and "
            "leaves it out, so the model computes in float. To get the quantized model back, save it with "
            "`save_compressed` and load it with `load_compressed`, or `convert_to_qat` a fresh model with the same "
            "QuantConfig and `load_state_dict` the weights.",
            UserWarning,
            stacklevel=3,
        )


def from_pretrained(model_class: Any, directory: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`~lightning_compress.compact`.

    Args:
        model_class: the ``transformers`` class it was saved from (e.g. ``BertForSequenceClassification``).
        directory: the directory ``save_pretrained`` wrote.
        **kwargs: passed to ``model_class.from_pretrained`` (``torch_dtype`` included: the model has the loaded
            weights' dtypes).

    Returns:
        The model in eval mode, with the compacted sizes and the saved weights.

    Raises:
        TypeError: ``model_class`` is not a ``transformers`` model class.
        ValueError: the saved weights or head counts do not fit ``model_class``.
    """
    config_class: Any = getattr(model_class, "config_class", None)
    if not isinstance(model_class, type) or not callable(getattr(config_class, "from_pretrained", None)):
        raise TypeError(f"`model_class` must be a transformers model class, got {model_class!r}.")
    directory = Path(directory)
    config = config_class.from_pretrained(directory)
    _warn_if_quantized(directory)
    record = getattr(config, CONFIG_KEY, None)
    if record is None:
        return model_class.from_pretrained(directory, **kwargs)  # type: ignore[attr-defined]
    shapes: Any = record.get("shapes") if isinstance(record, dict) and record.get("compacted") is True else None
    if not isinstance(shapes, dict) or not all(
        isinstance(v, list) and all(type(n) is int and n > 0 for n in v) for v in shapes.values()
    ):
        raise ValueError(f"{directory}'s config has a bad `{CONFIG_KEY}` entry: {record!r}.")
    heads = record.get("heads", {})
    saved_as = getattr(config, "architectures", None) or []
    if saved_as and model_class.__name__ not in saved_as:
        raise ValueError(
            f"{directory} was saved from {saved_as[0]} (its config's `architectures`), and its compacted sizes are "
            f"recorded by that class's module names: pass `model_class`={saved_as[0]}, not {model_class.__name__}."
        )

    class Compacted(model_class):
        """The original architecture cut to the saved sizes as it is built, so transformers' loader fills it."""

        def __init__(self, config: Any, *args: Any, **inner: Any) -> None:
            super().__init__(config, *args, **inner)
            check_shapes(self, shapes)  # an entry shrink_like would skip is refused, not ignored
            shrink_like(self, shapes)
            set_head_record(self, heads)

    # named like the class: the loader picks its checkpoint key conversions by class name (GPT-NeoX saves
    # `lm_head` as `embed_out`; under another name the head would be left newly initialized)
    Compacted.__name__, Compacted.__qualname__ = model_class.__name__, model_class.__qualname__
    Compacted.__module__ = model_class.__module__
    try:
        loaded = Compacted.from_pretrained(directory, **kwargs)
    except RuntimeError as err:  # transformers refuses saved weights whose shapes differ from the recorded sizes
        raise ValueError(f"{directory}'s weights do not fit the sizes its config records: {err}") from err
    model = model_class(loaded.config)  # a plain instance of the class, with the same sizes and weights
    shrink_like(model, shapes)
    set_head_record(model, heads)
    state = loaded.state_dict()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in state and tensor.is_floating_point():  # the loaded dtypes (`torch_dtype`, kept-float32 layers)
            tensor.data = tensor.data.to(state[name].dtype)
    model.load_state_dict(state, strict=True)
    mark_compacted(model)
    return model.eval()
