"""Whether an exported graph's batch dimension is as dynamic as it is declared: one run at another batch size.

``export_onnx`` declares dimension 0 of every input and output dynamic, but a trace records what the forward did
with the example: a size read as a Python number, a branch taken on the data (a mixture of experts loops over the
experts the example's tokens reached) become constants of the graph. A trial's LLaVA graph ran at the example's
batch of 4, matching the model to 4.8e-7, and failed at 1 and 7 (a ``Split`` sized for 4). The graph is run by
onnxruntime at the example's batch and at another (the first sample alone; two copies where the example holds one)
and compared with the model at both; where it fails, drifts or returns other shapes, :func:`fixed_batch_note` says
so. The other batch is cut from the example: a branch the forward takes on the data is seen only where the first
sample takes the other way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.checks import first_line

__all__ = ["GraphCheck", "batch_size", "example_error", "graph_note", "max_error", "other_batch"]

_FIXED = (
    "the trace fixed what the forward did with the example's batch (a size read as a Python number, such as "
    "`int(x.shape[0])`, or a mixture of experts' loop over the experts its tokens reached), or dimension 0 is no "
    "batch (time-first inputs, a spiking network's steps: declare the batch's dimension in `dynamic_axes`, trial GL)."
)
_WRONG_QUANTIZED = 0.25  # at the example, an error above this share of the largest output is no rounding
_WRONG_FLOAT = 1e-2  # float32 rounding reaches 1e-2 of the output where a LayerNorm cancels a large offset (EU)
_DRIFT = 10.0  # the other batch's error, against the example's, above which the graph is said to compute otherwise
_FLOOR = 1e-3  # ... and above this share of its largest output (an int8 rounding away flips a step)


def batch_size(tensors: Sequence[Tensor]) -> int | None:
    """The example's batch: the first dimension of its first tensor of one dimension or more (``None``: none)."""
    return next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)


def other_batch(tensors: Sequence[Tensor], batch: int) -> tuple[Tensor, ...]:
    """The example at another batch size: each tensor whose first dimension is the example's ``batch`` cut to its
    first sample (or, where ``batch`` is 1, repeated twice); other tensors as they are."""

    def resized(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        return t[:1] if batch > 1 else torch.cat([t, t])

    return tuple(resized(t) for t in tensors)


@dataclass
class GraphCheck:
    """What :func:`graph_note` compares: the graph's inputs in order (``tensors``) and the model's output tensors on
    them (``expected``, flattened as the exporter flattens them), at the example's ``batch``; at another batch
    (:func:`other_batch`) where the model runs there (``others``, ``expected_others``); ``quantized``: whether the
    model holds fake quantizers that are on (the graph then rounds as onnxruntime's integer kernels do)."""

    tensors: Sequence[Tensor]
    expected: Sequence[Tensor]
    batch: int
    quantized: bool
    others: Sequence[Tensor] | None = None
    expected_others: Sequence[Tensor] | None = None
    skipped: str | None = None  # why the other batch was not compared (the model does not run there itself)
    names: Sequence[str] | None = None  # the graph's input name of each of ``tensors`` (the exporter drops unread ones)
    random: float = 0.0  # how far a second forward of the model on the example moved from the first (0: the same)


def graph_note(path: Path, check: GraphCheck) -> str | None:
    """Why the graph at ``path`` does not compute the model: at the example itself (beyond what rounding explains:
    a quarter of the largest output for a quantized model, a hundredth for a float one), or at another batch size
    (fails, returns other shapes, or drifts from the model by more than at the example). ``None`` where it does, or
    where it cannot be told (no onnxruntime, an input the exporter dropped, outputs that do not line up)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return check.skipped
    try:
        session = _session(path)
    except Exception as err:  # trial FT: Bamba's graph (an invalid Transpose) failed to load, and that was raised raw
        return (
            f"the graph does not load in onnxruntime ({first_line(err, 300)}): the exporter wrote an operation "
            "onnxruntime refuses. Keep the compressed file, or rewrite that operation in the forward."
        )
    names = [i.name for i in session.get_inputs()]
    feed = _feed(names, check, check.tensors)
    if feed is None:
        return check.skipped
    batch, other = check.batch, 1 if check.batch > 1 else 2
    try:
        at_example = session.run(None, feed)
    except Exception as err:  # trial FL: Performer's and Reformer's graphs failed on their own example, unsaid
        first = first_line(err, 300)
        split = "SplitToSequence" in str(err)  # trial FT: FastSpeech2Conformer's `Where` was blamed on a split
        return (
            f"the graph does not run on the example it was traced on (onnxruntime: {first}): the exporter converted "
            "an operation of the forward into one that fails at the very sizes it was traced at"
            + (" (a chunked or split attention: a `SplitToSequence` with a negative size)" if split else "")
            + ". Rewrite that operation in the forward (onnxruntime's message names its node), or keep the compressed "
            "file."
        )
    error = max_error(at_example, check.expected)
    scale = _largest(check.expected)
    wrong = (_WRONG_QUANTIZED if check.quantized else _WRONG_FLOAT) * scale + 1e-6
    if error is not None and error > wrong and check.random > 1e-6 * max(scale, 1.0):
        return (  # trial FL: Reformer's LSH attention draws new rotations on every forward; the exporter was blamed
            f"the graph's outputs on the example differ from the model's by {error:.3g} (of outputs up to "
            f"{scale:.3g}), but the model differs from itself too: two of its forwards on the example differ by "
            f"{check.random:.3g} (it draws random numbers in eval mode, as LSH attention does), so the graph could "
            "not be checked against it. Compare the graph with the model on your own data, with the model's "
            "randomness fixed where it has an option for that."
        )
    if error is not None and error > wrong and not names:
        return (  # trial FN: e3nn's layers run code they generate with torch.fx; the exporter was blamed for 7.28
            f"the graph's outputs on the example differ from the model's by {error:.3g} (of outputs up to "
            f"{scale:.3g}), and the graph reads none of the model's inputs: the tracer saw no operation depend on "
            "them (a forward that computes through code it generates or compiles itself, as e3nn's layers do), so "
            "the graph returns constants. Keep the compressed file, or export a model whose forward runs its "
            "operations in torch directly."
        )
    if error is not None and error > wrong:
        return (  # trial ET: `index_add_` with repeated indices, which the exporter converts as if they were not
            f"the graph's outputs on the example differ from the model's by {error:.3g} (of outputs up to "
            f"{scale:.3g}), more than {'its int8 rounding' if check.quantized else 'float rounding'} usually "
            "explains: the exporter may have converted an operation of the forward wrongly (torch's exporter warns "
            "of some, e.g. `index_add_` or an index with repeated values: 'does not support duplicated values'). "
            "Compare the graph with the model on your own data before serving it; rewrite such an operation "
            "(`scatter_add_` exports exactly), or keep the compressed file."
        )
    if check.others is None or check.expected_others is None:
        return check.skipped
    try:
        at_other = session.run(None, _feed(names, check, check.others))
    except Exception as err:
        first = first_line(err, 300)
        return (
            f"the graph runs at the example's batch of {batch} but fails at a batch of {other} ({first}): {_FIXED} "
            f"Serve it at a batch of {batch}, or make that size a tensor operation in the forward."
        )
    shapes = _shape_mismatch(at_other, check.expected_others)
    if shapes is not None:  # trial ER: `zeros(int(x.shape[0]), 1)` broadcast kept 4 rows at a batch of 1
        return (
            f"the graph runs at the example's batch of {batch}, but at a batch of {other} it returns {shapes}: "
            f"{_FIXED} Serve it at a batch of {batch}, or make that size a tensor operation in the forward."
        )
    error_other = max_error(at_other, check.expected_others)
    if error is None or error_other is None:
        return None
    scale = _largest(check.expected_others)
    if error_other <= max(_DRIFT * error, _FLOOR * scale):
        return None
    return (
        f"the graph matches the model at the example's batch of {batch} (max |difference| {error:.3g}) but not at a "
        f"batch of {other} ({error_other:.3g}, of outputs up to {scale:.3g}): {_FIXED} Serve it at a batch of "
        f"{batch}, or make that size a tensor operation in the forward."
    )


def example_error(path: Path, check: GraphCheck) -> tuple[float, float] | None:
    """How far the graph at ``path`` is from the model on the example: ``(largest error, largest output)``; ``None``
    where it cannot be told (no onnxruntime, a graph that does not load or run, outputs that do not line up)."""
    try:
        session = _session(path)
        feed = _feed([i.name for i in session.get_inputs()], check, check.tensors)
        if feed is None:
            return None
        got = session.run(None, feed)
    except Exception:  # no onnxruntime, or a graph that does not load or run
        return None
    error = max_error(got, check.expected)
    return None if error is None else (error, _largest(check.expected))


def _session(path: Path) -> Any:
    """An onnxruntime CPU session of the graph at ``path``, its log silenced (failures are said by the callers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(graph_inputs: list[str], check: GraphCheck, tensors: Sequence[Tensor]) -> dict[str, Any] | None:
    """``tensors`` (the example's, or the other batch's) as the graph's inputs, lined up by :func:`_read_inputs`."""
    read = _read_inputs(graph_inputs, check)
    if read is None:
        return None
    return {name: tensors[i].detach().cpu().numpy() for name, i in zip(graph_inputs, read, strict=True)}


def _read_inputs(graph_inputs: list[str], check: GraphCheck) -> list[int] | None:
    """Which of ``check.tensors`` each graph input is: by name where the graph kept only some (the exporter drops the
    inputs a forward never reads: trial FF's N-HiTS, whose batch went unchecked, unsaid), else by position; ``None``
    where they cannot be lined up."""
    given = list(check.names or [])
    if len(given) == len(check.tensors) and set(graph_inputs) <= set(given):
        return [given.index(name) for name in graph_inputs]
    return list(range(len(graph_inputs))) if len(graph_inputs) == len(check.tensors) else None


def _largest(outputs: Sequence[Tensor]) -> float:
    return max(
        (float(t.detach().float().abs().max()) for t in outputs if t.is_floating_point() and t.numel()), default=0.0
    )


def _shape_mismatch(got: Sequence[Any], expected: Sequence[Tensor]) -> str | None:
    """``"shape (4, 8) where the model returns (1, 8)"`` for the first output whose shape is not the model's."""
    if len(got) != len(expected):
        return None
    for value, want in zip(got, expected, strict=True):
        shape = tuple(getattr(value, "shape", ()))
        if shape != tuple(want.shape):
            return f"an output of shape {shape} where the model returns {tuple(want.shape)}"
    return None


def max_error(got: Sequence[Any], expected: Sequence[Tensor]) -> float | None:
    """The largest |difference| over the floating-point outputs; ``None`` where the outputs do not line up."""
    if len(got) != len(expected):
        return None
    largest = 0.0
    for value, want in zip(got, expected, strict=True):
        if not want.is_floating_point():
            continue
        reference = want.detach().float().cpu()
        actual = torch.as_tensor(value).float()
        if actual.shape != reference.shape:
            return None
        if reference.numel():
            difference = float((actual - reference).abs().max())
            if not math.isfinite(difference):
                return None
            largest = max(largest, difference)
    return largest
