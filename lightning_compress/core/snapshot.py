"""A copy of a model's parameters and buffers to go back to: what the accuracy guard returns to when it rolls
an event back, so that the model is again the one an evaluation judged (:class:`JudgedModel`: the copy, the
evaluation's value, and how it crosses a checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .checks import is_integer, is_real
from .fake_quant import FakeQuantizer
from .sharding import is_sharded

__all__ = ["JudgedModel", "ModelSnapshot", "quantizer_flags"]


def quantizer_flags(model: nn.Module) -> list[int]:
    """Each fake quantizer's flags (on, observing, initialized), in module order: whether two moments of a model
    quantize alike."""
    return [int(m.state) for m in model.modules() if isinstance(m, FakeQuantizer)]


def flags_alike(then: list[int], now: list[int]) -> bool:
    """Whether quantizers whose flags were ``then`` compute as they did with ``now``: each has the flags it had, or
    quantized neither then nor now (observers that only calibrate pass values through)."""
    return len(then) == len(now) and all(
        a == b or not (FakeQuantizer.quantizes(a) or FakeQuantizer.quantizes(b)) for a, b in zip(then, now, strict=True)
    )


class ModelSnapshot:
    """Every parameter and buffer of ``model`` as they are now (this process's shards of sharded ones). The
    quantizers' scales and ranges go back only when their flags (fake quantization on, observing, initialized) are
    what they were: a rollback across the switch to fake quantization would otherwise restore quantizers that were
    off, with their default scale of 1, under a layer that now quantizes; there they keep their state, and the model
    is the judged one but for its quantizers (:meth:`restore` says which). Quantizers that only started observing
    (fake quantization off then and now) keep their ranges too: they do not change outputs."""

    def __init__(self, model: nn.Module) -> None:
        self._tensors: list[tuple[Tensor, Tensor]] = []
        self._names: list[str] = []  # each copied tensor's name, for a checkpoint
        self._persistent: list[bool] = []  # whether the model's state dict holds it (not a non-persistent buffer)
        in_state = set(model.state_dict(keep_vars=True))
        quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
        with torch.no_grad():
            self._quantizer_state = [  # the flags, then each scale, zero point and range as they are now
                (q, int(q.state), [(t, t.detach().clone()) for t in [*q.parameters(), *q.buffers()] if t is not flags])
                for q in quantizers
                for flags in [q.state]
            ]
        self.quantizer_flags = [flags for _, flags, _ in self._quantizer_state]  # as :func:`quantizer_flags` reads
        seen = {id(t) for q in quantizers for t in [*q.parameters(), *q.buffers()]}
        self._quantized: list[tuple[FakeQuantizer, Tensor]] = [  # (a weight's quantizer, the weight)
            (q, m.weight)
            for m in model.modules()
            if isinstance(q := getattr(m, "weight_fake_quant", None), FakeQuantizer) and isinstance(m.weight, Tensor)
        ]
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        with torch.no_grad():
            for name, tensor in named:
                if tensor is None or id(tensor) in seen:  # a tied parameter is copied once
                    continue
                seen.add(id(tensor))
                self._tensors.append((tensor, tensor.detach().clone()))
                self._names.append(name)
                self._persistent.append(name in in_state)

    @property
    def sharded(self) -> bool:
        """Whether it holds this process's shards of sharded tensors (FSDP2): a checkpoint cannot hold it."""
        return any(is_sharded(tensor) for tensor, _ in self._tensors)

    def state_dict(self) -> dict[str, Any]:
        """The copied values as CPU tensors, by name, and each quantizer's flags and values, in module order."""
        return {
            "tensors": {
                name: saved.cpu()
                for name, (_, saved), kept in zip(self._names, self._tensors, self._persistent, strict=True)
                if kept  # a non-persistent buffer (a cache) is the model's own, as in its state dict
            },
            "quantizers": [[flags, [saved.cpu() for _, saved in values]] for _, flags, values in self._quantizer_state],
        }

    def load_state_dict(self, state: Any) -> None:
        """Hold the values of a :meth:`state_dict` instead of the model's own (floats cast to the model's dtype;
        non-persistent buffers keep the model's values). Raises ``ValueError`` (nothing changed) when they are not this
        model's: other names, shapes, kinds of dtype or quantizers, or values that are not finite."""
        tensors = state.get("tensors") if isinstance(state, Mapping) else None
        quantizers = state.get("quantizers") if isinstance(state, Mapping) else None
        if not isinstance(tensors, Mapping) or not isinstance(quantizers, list):
            raise ValueError("holds no 'tensors' mapping and 'quantizers' list")
        names = [name for name, kept in zip(self._names, self._persistent, strict=True) if kept]
        if set(tensors) != set(names):
            unknown, missing = sorted(map(str, set(tensors) - set(names))), sorted(set(names) - set(tensors))
            raise ValueError(f"names other tensors than the model's (unknown {unknown[:3]}, missing {missing[:3]})")
        if len(quantizers) != len(self._quantizer_state):
            raise ValueError(f"holds {len(quantizers)} quantizers, the model {len(self._quantizer_state)}")
        pairs = [
            (name, saved, tensors[name])
            for name, (_, saved), kept in zip(self._names, self._tensors, self._persistent, strict=True)
            if kept
        ]
        flags = []
        for number, ((_, _, values), entry) in enumerate(zip(self._quantizer_state, quantizers, strict=True)):
            ok = isinstance(entry, list) and len(entry) == 2 and is_integer(entry[0]) and isinstance(entry[1], list)
            if not ok or len(entry[1]) != len(values):
                raise ValueError(f"quantizer {number} is not [flags, values] with {len(values)} values")
            flags.append(int(entry[0]))
            pairs += [(f"quantizer {number}", saved, value) for (_, saved), value in zip(values, entry[1], strict=True)]
        for name, saved, value in pairs:
            # another float dtype is cast, as a state dict's load casts it (trial CQ: a resume at `precision="64-true"`)
            alike = isinstance(value, Tensor) and (
                value.dtype == saved.dtype or (value.is_floating_point() and saved.is_floating_point())
            )
            if not isinstance(value, Tensor) or value.shape != saved.shape or not alike:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name!r} is {got}, the model's {saved.dtype} {tuple(saved.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name!r} holds values that are not finite")
        with torch.no_grad():
            for _, saved, value in pairs:
                saved.copy_(value)
        self._quantizer_state = [(q, f, values) for (q, _, values), f in zip(self._quantizer_state, flags, strict=True)]
        self.quantizer_flags = flags

    def quantizes_alike(self) -> bool:
        """Whether the model's quantizers would let :meth:`restore` give back exactly the copied model: each has the
        flags it had, or was off then and is off now."""
        return flags_alike(self.quantizer_flags, [int(q.state) for q, _, _ in self._quantizer_state])

    def restore(self) -> bool:
        """Write the saved values back, in place (the tensors the optimizer holds stay the same objects). When the
        quantizers' scales stay as they are, a weight whose quantizer takes its scale from it gets that scale again
        (eval mode does not recompute it).

        Returns whether the model now computes exactly what the copied one did: ``False`` when a quantizer's flags
        changed since (its scales and ranges were left as they are) and it quantizes now or did then. A quantizer
        off then and now (observers calibrating, fake quantization not yet on) passes values through: it keeps
        what it observed since, and the model is still the copied one."""
        same = [int(q.state) == flags for q, flags, _ in self._quantizer_state]
        exact = self.quantizes_alike()
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
            for (_, _, values), restore in zip(self._quantizer_state, same, strict=True):
                for tensor, saved in values if exact and restore else []:
                    tensor.copy_(saved)
            for quantizer, weight in [] if exact else self._quantized:
                # from its weight, as a training forward would (a sharded weight's next forward does it)
                own_scale = quantizer.fake_quant_enabled and quantizer.initialized and not quantizer.is_learned
                if own_scale and not is_sharded(weight):
                    quantizer.observe(weight)
        return exact


class JudgedModel:
    """The model as an evaluation judged it: a :class:`ModelSnapshot`, the value that evaluation gave (``None`` for
    a copy taken without one) and the clock (steps done) at which the model was last that one.

    A checkpoint saved right after the evaluation holds :meth:`record` only: after a resume, :meth:`adopt` takes the
    copy again from the model, which is still the judged one. One saved while an event awaits judgement holds the
    copy itself (:meth:`state_dict`; not of sharded tensors)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self.snapshot: ModelSnapshot | None = None
        self.value: float | None = None
        self.steps: int | None = None
        self.flags_then: list[int] | None = None  # a checkpoint's record of the judged model's quantizers, no copy
        self.trained_since = False  # an optimizer step ran since the copy was taken: a checkpoint must hold it

    @property
    def held(self) -> bool:
        return self.snapshot is not None

    @property
    def known_value(self) -> float | None:
        """The value of the evaluation whose model the copy holds (``None``: no copy, or one taken without one)."""
        return self.value if self.snapshot is not None else None

    def take(self, value: float | None, steps: int | None) -> None:
        """Copy the model now, as the evaluation that gave ``value`` saw it at ``steps``."""
        self.hold(ModelSnapshot(self._model), value)
        self.steps = steps

    def hold(self, snapshot: ModelSnapshot, value: float | None) -> None:
        """Hold a copy taken earlier (before an event no evaluation judged: ``value=None``)."""
        self.snapshot, self.value, self.flags_then, self.trained_since = snapshot, value, None, False

    def clear(self) -> None:
        self.snapshot, self.value = None, None

    def quantizes_alike(self) -> bool:
        """Whether quantization has not switched on or off since the judged evaluation, so that a rollback now would
        give back the model it judged. A resumed run without a copy reads the quantizers' flags of the checkpoint's
        :meth:`record` (:meth:`note_saved`); with neither (saved while an event awaited judgement): ``True``."""
        if self.snapshot is not None:
            return self.snapshot.quantizes_alike()
        return self.flags_then is None or flags_alike(self.flags_then, quantizer_flags(self._model))

    def note_saved(self, record: Mapping[str, Any] | None, flags: list[int] | None = None) -> None:
        """A checkpoint's :meth:`record` (``None``: it has none), or only :meth:`flags` (saved while an event awaited
        judgement): how the judged model's quantizers stood."""
        saved = flags if record is None else record["quantizers"]
        self.flags_then = None if saved is None else [int(f) for f in saved]

    def flags(self) -> list[int] | None:
        """How the judged model's quantizers stood (``None``: not known), for a checkpoint saved while an event awaits
        judgement: a resumed run's next event then still waits for an evaluation of the model quantized (trial CI: a
        joined event ran in the batch quantization switched on, and the validation judged both with it)."""
        return list(self.snapshot.quantizer_flags) if self.snapshot is not None else self.flags_then

    def state_dict(self) -> dict[str, Any] | None:
        """The copy, its value and clock, for a checkpoint the model moved away from it by (``None``: no copy, or one
        of sharded tensors)."""
        if self.snapshot is None or self.snapshot.sharded:
            return None
        return {"value": self.value, "steps": self.steps, "snapshot": self.snapshot.state_dict()}

    def parse(self, state: Any) -> tuple[ModelSnapshot, float | None, int | None]:
        """A :meth:`state_dict` read against this model, nothing held yet (:meth:`hold_parsed`); ``ValueError`` with
        the reason when it is not this model's or is damaged."""
        if not isinstance(state, Mapping):
            raise ValueError(f"is a {type(state).__name__}, not a mapping")
        value, steps = state.get("value"), state.get("steps")
        if not (value is None or (is_real(value) and math.isfinite(float(value)))):
            raise ValueError(f"has 'value' {value!r}, not a finite number or None")
        if not (steps is None or is_integer(steps)):
            raise ValueError(f"has 'steps' {steps!r}, not an integer or None")
        snapshot = ModelSnapshot(self._model)
        snapshot.load_state_dict(state.get("snapshot"))
        return snapshot, None if value is None else float(value), None if steps is None else int(steps)

    def hold_parsed(self, parsed: tuple[ModelSnapshot, float | None, int | None]) -> None:
        """Hold a copy :meth:`parse` read: the model has trained since it (a checkpoint saves it again)."""
        snapshot, value, steps = parsed
        self.hold(snapshot, value)
        self.steps, self.trained_since = steps, True

    def restore(self) -> bool:
        """Write the copy back; whether the model is now exactly the judged one (``False`` without a copy)."""
        return self.snapshot is not None and self.snapshot.restore()

    def record(self) -> dict[str, Any] | None:
        """Primitives for a checkpoint: the value, the quantizers' flags and the clock (``None`` without a value)."""
        if self.snapshot is None or self.value is None:
            return None
        return {"value": self.value, "quantizers": list(self.snapshot.quantizer_flags), "steps": self.steps}

    def adopt(self, record: Mapping[str, Any], steps: int) -> bool:
        """Take the copy from the model as it is now, with a saved :meth:`record`'s value, when the model is still
        that one: nothing trained after it (the clock is ``steps``) and the quantizers stand as they did."""
        if record.get("steps") is not None and int(record["steps"]) != steps:
            return False  # steps trained after that evaluation
        if quantizer_flags(self._model) != [int(flags) for flags in record["quantizers"]]:
            return False
        self.take(float(record["value"]), steps)
        return True
