"""Which LightningModule a module is: ``lightning.pytorch``'s, or the standalone ``pytorch_lightning`` package's (the
same classes under the older name; neuralforecast's models derive from it, and its Trainer runs these callbacks)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["is_lightning_module_class", "overrides"]

_PACKAGES = ("lightning.pytorch.", "pytorch_lightning.")


def _lightning_base(cls: type) -> type | None:
    """The ``LightningModule`` class ``cls`` derives from, of either package; ``None``: none."""
    return next(
        (base for base in cls.__mro__ if base.__name__ == "LightningModule" and base.__module__.startswith(_PACKAGES)),
        None,
    )


def is_lightning_module_class(cls: Any) -> bool:
    """Whether ``cls`` is a LightningModule class of ``lightning.pytorch`` or of ``pytorch_lightning``."""
    return isinstance(cls, type) and _lightning_base(cls) is not None


def overrides(hook: str, module: Any) -> bool:
    """Lightning's ``is_overridden(hook, module)``, also for a module of the ``pytorch_lightning`` package, for which
    Lightning's raises ``ValueError: Expected a parent`` (trial FI: QAT, the accuracy guard and channel pruning all
    failed so inside every neuralforecast fit)."""
    base = _lightning_base(type(module))
    return is_overridden(hook, module, parent=base) if base is not None else is_overridden(hook, module)
