"""Reading a compressed file: :func:`load_compressed`, which treats it as untrusted input (see :mod:`.compressed`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import check_module, check_path
from ..core.compact import mark_compacted, stateless_norms_read_their_width
from ..core.model_config import record_sizes
from ..core.packing import (
    code_container_bits,
    decode_gaps,
    unpack_bits,
    unpack_codes,
)
from ..core.qat import FakeQuantizer, QuantConfig, check_quantizer_state, convert_listed, qat_modules
from ..core.quant import BIAS_RANGE, accumulator_scale, dequantize, scale_per_element
from ..core.quantizer_state import check_scales
from ..core.selection import stored_weight
from ..core.shrink import set_head_record, shrink_like
from ..core.tracing import call_model, forward_state_kept, like_model, output_tensors, plain_float, quiet_norm_widths
from ..core.wrappers import state_root, uncompiled
from .container import CompressedFileError, read_container
from .records import (
    SECTIONS,
    ArchitectureMismatch,
    TensorRecord,
    max_manifest_bytes,
    max_manifest_values,
    max_raw_bytes,
    plan,
)
from .report import CompressionReport, LayerReport
from .state_entries import tensor_entries

__all__ = ["load_compressed"]


def _from_planes(data: Tensor, element: int, version: int) -> Tensor:
    """Undo :func:`_planes` (files before format 4 store the bytes in order), into memory of its own: a view of the
    body (``contiguous()`` of a one-element tensor's planes is one) kept the whole body alive until the load ended
    (trial CU: a file of group scales of 2 then cost 2.9 times the model)."""
    if version < 4 or element == 1:
        return data.clone()
    return data.reshape(element, -1).t().clone(memory_format=torch.contiguous_format).reshape(-1)


class _Reader:
    """Hands out the sections front to back, in the order the records were written, without copying."""

    def __init__(self, body: bytearray, sizes: list[int]) -> None:
        self.view = memoryview(body)
        starts = [0, sizes[0], sizes[0] + sizes[1]]
        self.cursor = dict(zip(SECTIONS, starts, strict=True))

    def take(self, section: str, nbytes: int) -> Tensor:
        """``nbytes`` bytes as a uint8 tensor that shares the body's memory (sizes were checked by the plan)."""
        start = self.cursor[section]
        self.cursor[section] = start + nbytes
        if nbytes == 0:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(self.view[start : start + nbytes], dtype=torch.uint8)


def _mask(record: TensorRecord, data: Tensor) -> Tensor | None:
    """The record's positions as a flat bool mask (``None``: every position, a dense record); raises if the stream
    does not hold ``count`` of them."""
    if record.coding == "dense":
        return None
    if record.coding == "bitmask":
        mask = unpack_bits(data, record.numel)
        if int(mask.sum()) != record.count:
            found = int(mask.sum())
            raise CompressedFileError(f"{record.name}: bitmask holds {found} entries, expected {record.count}.")
        return mask
    positions = decode_gaps(data, record.count)
    if record.count and int(positions[-1]) >= record.numel:
        raise CompressedFileError(f"{record.name}: position outside the tensor.")
    mask = torch.zeros(record.numel, dtype=torch.bool)
    mask[positions] = True
    return mask


def _decode_all(records: list[TensorRecord], sizes: list[int], body: bytearray, version: int) -> dict[str, Tensor]:
    reader = _Reader(body, sizes)
    tensors: dict[str, Tensor] = {}
    pending: list[tuple[TensorRecord, Tensor | None, Tensor]] = []  # quantized: need their scales, decoded later
    biases: list[tuple[TensorRecord, Tensor]] = []  # int32 codes on a grid made of two scales, decoded later
    for record in records:
        dtype, element = record.torch_dtype, record.element_size
        if record.kind == "bias":
            biases.append((record, _from_planes(reader.take("data", record.numel * 4), 4, version).view(torch.int32)))
            continue
        if record.kind == "raw":
            data = _from_planes(reader.take("data", record.numel * element), element, version)
            tensors[record.name] = data.view(dtype).reshape(record.shape)
            continue
        if record.kind == "alias":
            continue  # filled in below, once every stored tensor is decoded
        mask = _mask(record, reader.take("positions", record.position_bytes))
        if record.kind == "sparse":
            values = _from_planes(reader.take("data", record.count * element), element, version).view(dtype)
            out = torch.zeros(record.numel, dtype=dtype)
            out[torch.ones(record.numel, dtype=torch.bool) if mask is None else mask] = values
            tensors[record.name] = out.reshape(record.shape)
        else:
            nbytes = (record.count * code_container_bits(record.bits) + 7) // 8
            pending.append((record, mask, reader.take("codes", nbytes)))  # packed, unpacked a block at a time
    for name, tensor in tensors.items():  # every quantizer's scale, before any is used
        if name.endswith("_fake_quant.scale"):
            _check_scale(name, tensor)
    for record, mask, codes in pending:
        zero_point = tensors.get(record.quantizer + "zero_point", torch.zeros((), dtype=torch.int32)).to(torch.int32)
        scale = tensors[record.quantizer + "scale"]
        tensors[record.name] = _dequantized(record, mask, codes, scale, zero_point).reshape(record.shape)
    for record, codes in biases:
        prefix = f"{record.layer}."
        scales = tensors[prefix + "weight_fake_quant.scale"], tensors[prefix + "input_fake_quant.scale"]
        if bool((codes < BIAS_RANGE[0]).any() or (codes > BIAS_RANGE[1]).any()):
            raise CompressedFileError(f"{record.name}: codes outside the int32 bias range.")
        grid = accumulator_scale(*scales, record.numel)
        tensors[record.name] = dequantize(codes, grid, torch.zeros((), dtype=torch.int32), axis=0)
    for record in records:
        if record.kind == "alias":
            tensors[record.name] = tensors[record.of]
    return tensors


def _check_ties(model: nn.Module, expected: dict[str, Tensor], tensors: dict[str, Tensor], path: Any) -> None:
    """Names ``model`` ties (one tensor, e.g. an output head sharing the input embedding) must hold one tensor in the
    file too: two different ones would both be written into it, the last one winning (a trial: an untied model's
    file loaded into a tied one without a word, its embedding lost)."""
    tied: dict[tuple[Any, ...], list[str]] = {}
    for name, value in expected.items():
        if value.numel():
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
            tied.setdefault(key, []).append(name)
    for names in tied.values():
        first = tensors[names[0]]
        for other in names[1:]:
            if tensors[other] is not first and not torch.equal(tensors[other], first):
                raise CompressedFileError(
                    f"{path} holds {names[0]!r} and {other!r} as two different tensors, but {type(model).__name__} "
                    "ties them (one tensor): the file was written from a model that does not tie them (e.g. "
                    "`tie_word_embeddings=False`). Build the model the same way."
                )


_CHUNK = 1 << 18  # elements dequantized at a time: a layer's temporaries stay a few MiB whatever its size


def _dequantized(record: TensorRecord, mask: Tensor | None, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``dequantize`` of the packed codes (``record.bits`` each) at their positions (``mask``; ``None``: all), flat,
    in the record's dtype, a block of rows at a time: the block's codes, scales and products are the only
    temporaries (the whole layer's would cost several times its size: unpacked codes, float32 products and group
    scales expanded to every element). Each value is rounded to the dtype as the whole float32 tensor would be."""
    out = torch.zeros(record.numel, dtype=record.torch_dtype)
    if not record.numel:
        return out
    rows = record.shape[0] if record.shape else 1
    row = record.numel // rows
    step = max(1, _CHUNK // max(1, row))
    used = 0
    for first in range(0, rows, step):
        last = min(rows, first + step)
        block = out[first * row : last * row]
        kept = None if mask is None else mask[first * row : last * row]
        count = block.numel() if kept is None else int(kept.sum())
        unpacked = _unpacked(codes, record.bits, used, count)
        if count and (int(unpacked.min()) < record.qmin or int(unpacked.max()) > record.qmax):
            raise CompressedFileError(
                f"{record.name}: codes outside its integer range {record.qmin}..{record.qmax} "
                f"({int(unpacked.min())}..{int(unpacked.max())} in rows {first}..{last - 1})."
            )
        values = unpacked.to(torch.int32).sub_(zero_point).float()  # (q - zp) * s
        used += count
        scales = _block_scales(scale, record.shape, record.axis, first, last)
        values.mul_(scales if kept is None else scales[kept])
        if kept is None:
            block.copy_(values)
        else:
            block[kept] = values.to(out.dtype)
    return out


def _unpacked(packed: Tensor, bits: int, start: int, count: int) -> Tensor:
    """Codes ``start:start + count`` of a packed stream, unpacked (int8) from the bytes that hold them only."""
    per_byte = 8 // code_container_bits(bits)
    skip = start % per_byte
    first, last = start // per_byte, (start + count + per_byte - 1) // per_byte
    return unpack_codes(packed[first:last], bits, skip + count)[skip:]


def _block_scales(scale: Tensor, shape: tuple[int, ...], axis: int | None, first: int, last: int) -> Tensor:
    """The scale of every element of rows ``first:last`` (along dimension 0) of a tensor of ``shape``, flat:
    :func:`scale_per_element` of those rows only."""
    if scale.dim() == 2 and axis is not None:  # (channels, groups) of a 2-d weight, groups along the other axis
        group = shape[1 - axis] // scale.shape[1]
        if axis == 0:
            return scale[first:last].float().repeat_interleave(group, dim=1).reshape(-1)
        return scale[:, torch.arange(first, last) // group].float().t().reshape(-1)
    every = scale_per_element(scale, shape, axis)  # an expanded view
    return every.reshape(1) if every.dim() == 0 else every[first:last].reshape(-1)


def _check_quantizer_state(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """The file's quantizer entries hold what a quantizer can (:func:`check_quantizer_state`): zero points in their
    quantizer's range (a forged one loaded, shifted every value it touches and broke `export_onnx`), observed ranges
    that are numbers (a NaN range loaded, and the next `calibrate` blamed the user's finite data), known flags."""
    try:
        check_quantizer_state(model, tensors)
    except ValueError as err:
        raise CompressedFileError(str(err)) from err


def _check_scale(name: str, scale: Tensor) -> None:
    """A file stores the step in use (``|scale|`` of a learned one): positive, as :func:`check_scales` says."""
    try:
        check_scales(name, scale)
    except ValueError as err:
        raise CompressedFileError(str(err)) from err


def load_compressed(model: nn.Module, path: str | Path, example_inputs: Any = None) -> CompressionReport:
    """Load a file written by :func:`save_compressed` into ``model`` (a fresh instance of the architecture).

    Fake-quant layers recorded in the file are put back (with their scales, zero points and
    activation ranges), so the eval-mode outputs equal those of the saved model. The file is
    treated as untrusted: its sizes are checked against ``model`` before anything is decompressed
    or allocated, so loading costs at most about twice the model's size in memory.

    A compacted file (channels removed by :func:`~lightning_compress.compact`) can only shrink layers, each one
    checked on its own. Whether the cut layers still fit together, and give outputs of the model's shapes, takes a
    forward pass: with example inputs, the model runs on them before and after loading, and a file whose sizes do
    not chain or that cut an output is refused.

    Args:
        model: a fresh instance of the saved architecture (uncompacted is fine: it is cut to the saved sizes).
        path: the file :func:`save_compressed` wrote.
        example_inputs: what ``model``'s forward takes (a tensor, a tuple of positional inputs or a dict of keyword
            inputs), to check a compacted file's sizes as above; floating-point inputs take the model's dtype
            (bfloat16 weights) and device. ``None``: the model's ``example_input_array`` if it has one (a
            LightningModule; if the model does not run on it, the check is skipped with a warning), else no check.

    Returns:
        What the file holds, layer by layer (:class:`CompressionReport`).

    Raises:
        CompressedFileError: not such a file, unknown version, truncated, corrupted, forged sizes,
            or written for another architecture. The model is left exactly as it was.
    """
    check_module(model)
    called = model  # the module whose forward takes the example inputs
    if example_inputs is None:
        example_inputs, argument = getattr(model, "example_input_array", None), "example_input_array"
    else:
        argument = "example_inputs"
    path = check_path(path)
    with uncompiled(state_root(model)) as plain:  # a wrapper's inner module (Fabric, torch.compile): plain names
        try:
            return _load(called, plain, path, example_inputs, argument)
        except CompressedFileError as err:  # what the file wrote may be in it: escaped and bounded (trial CV)
            raise CompressedFileError(_bounded(str(err))) from err.__cause__


_MESSAGE_LIMIT = 2000


def _bounded(message: str) -> str:
    """A refusal's message, whatever text of the file it quotes: one line (control characters and lone surrogates
    escaped: a key ending in a newline forged a log line, trial CV) of at most :data:`_MESSAGE_LIMIT` characters (a
    30,000-character key made a 30 KB message)."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[: 4 * _MESSAGE_LIMIT])  # surrogates too
    if len(line) <= _MESSAGE_LIMIT and len(message) <= 4 * _MESSAGE_LIMIT:
        return line
    return line[: _MESSAGE_LIMIT - 40] + f" ... ({len(message)} characters in all)"


def _load(called: nn.Module, model: nn.Module, path: Path, example_inputs: Any, argument: str) -> CompressionReport:
    planned: dict[str, Any] = {}

    def body_size(manifest: dict[str, Any], version: int) -> int:
        if manifest.get("version") != version:  # the byte layout follows the header's version
            said = repr(manifest.get("version"))[:40]
            raise CompressedFileError(f"{path} is corrupted: its header says format {version}, its manifest {said}.")
        try:
            planned["records"], planned["sizes"] = plan(model, manifest, version)
            planned["version"] = version
        except ArchitectureMismatch as err:
            raise CompressedFileError(f"{path} {err}") from err
        except CompressedFileError as err:
            raise CompressedFileError(f"{path} does not hold a valid model for {type(model).__name__}: {err}") from err
        return sum(planned["sizes"])

    manifest, body = read_container(
        path, max_raw_bytes(model), max_manifest_bytes(model), body_size, max_manifest_values(model)
    )
    records: list[TensorRecord] = planned["records"]
    try:
        tensors = _decode_all(records, planned["sizes"], body, planned["version"])
    except CompressedFileError as err:
        raise CompressedFileError(f"{path} is corrupted: {err}") from err
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CompressedFileError(f"{path} is corrupted: {err!r}") from err
    del body
    outputs = None
    if manifest.get("compacted") and example_inputs is not None:  # before anything changes
        example_inputs = like_model(example_inputs, model)
        try:
            outputs = _output_shapes(called, example_inputs)
        except Exception as err:
            said = (
                f"`{argument}` does not run through {type(called).__name__}'s forward before loading "
                f"({type(err).__name__}: {_first_line(err)})"
            )
            if argument == "example_inputs":
                raise ValueError(f"{said}: pass what `forward` takes.") from err
            warnings.warn(
                f"load_compressed: {said}, so whether the compacted sizes of {path} fit together is not checked "
                "(pass `example_inputs`).",
                UserWarning,
                stacklevel=3,
            )
    rollback = _Rollback(model)
    resized: list[str] = []  # the modules cut to the file's sizes, for the config's record

    def remember(name: str) -> None:
        rollback.remember(name)
        if not name.endswith("_fake_quant"):
            resized.append(name)

    converted_before = {f"{name}." for name, _ in qat_modules(model)}  # by the user, before this load
    try:
        if manifest.get("compacted"):
            try:
                shrink_like(model, {k: tuple(v.shape) for k, v in tensors.items()}, remember)
            except ValueError as err:  # e.g. a cut through a quantization group of a model already converted
                raise CompressedFileError(f"{path} holds sizes the model cannot take: {err}") from err
            try:
                set_head_record(model, manifest.get("heads", {}), rollback.remember)
            except ValueError as err:
                raise CompressedFileError(f"{path} holds bad head counts: {err}") from err
        try:
            _convert_like(model, manifest.get("qat_layers", {}), rollback, tensors)
        except (TypeError, ValueError) as err:  # e.g. the root module named as a layer: matches no module
            raise CompressedFileError(f"{path} holds bad quantization settings: {err}") from err
        try:
            _check_quantizer_state(model, tensors)
        except CompressedFileError as err:
            raise CompressedFileError(f"{path}: {err}") from err
        # entries that are not tensors (a module's extra state) are in no file: left as the model has them
        state = model.state_dict()
        expected = tensor_entries(state)
        unloaded = [k for k in expected if k not in tensors]
        problems = unloaded + [k for k in tensors if k not in expected]
        problems += [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
        if problems and unloaded == problems and all(_quantizer_of(k, converted_before) for k in problems):
            raise CompressedFileError(
                f"{path} holds no quantizer state for {type(model).__name__}'s fake-quant layers "
                f"({sorted(problems)[:3]} ...): the file was written from a model without them. Load it into a "
                "model not converted with `convert_to_qat`."
            )
        if problems:
            raise CompressedFileError(
                f"{path} was written for another architecture than {type(model).__name__}: {sorted(problems)[:5]}"
            )
        _check_ties(model, expected, tensors, path)
        if outputs is not None:  # the sizes are final: whether they chain needs no values
            _check_chain(called, example_inputs, outputs, path)
        _load_tensors(model, tensors, set(state) - set(expected), path)
        if outputs is not None:  # a stateless InstanceNorm holds no tensor the file records (MONAI's UNETR)
            stateless_norms_read_their_width(called, example_inputs)
    except Exception:
        rollback()
        raise
    if manifest.get("compacted"):
        mark_compacted(model)
        if resized:
            record_sizes(model, resized)
    layers = [_loaded_layer(r, tensors) for r in records if r.kind in ("sparse", "quantized")]
    del tensors
    return CompressionReport.of_file(path, "lightning-compress", layers, model)


def _output_shapes(model: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    """The shapes of ``model``'s outputs on ``inputs`` (float data flow, eval mode, no gradients)."""
    with torch.no_grad(), plain_float(model), forward_state_kept(model), quiet_norm_widths():
        return [tuple(t.shape) for t in output_tensors(call_model(model, inputs))]


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def _check_chain(model: nn.Module, inputs: Any, before: list[tuple[int, ...]], path: Path) -> None:
    """A compacted model runs on the inputs it ran on before loading, with outputs of the same shapes (a trial: a
    forged file cut the classifier from 10 classes to 5, and another cut a layer without its consumer)."""
    try:
        after = _output_shapes(model, inputs)
    except Exception as err:
        raise CompressedFileError(
            f"{path} holds compacted sizes that do not fit together: the model no longer runs on the example inputs "
            f"({type(err).__name__}: {_first_line(err)})."
        ) from err
    if after != before:
        raise CompressedFileError(
            f"{path} holds compacted sizes that change the model's outputs: shapes {before[:3]} became {after[:3]} "
            "(`compact` never cuts an output)."
        )


def _quantizer_of(key: str, layers: set[str]) -> bool:
    """Whether state entry ``key`` is a quantizer buffer of one of ``layers`` (prefixes ending in a dot)."""
    head, found, _ = key.partition("_fake_quant.")
    return bool(found) and any(head.startswith(layer) for layer in layers)


def _loaded_layer(record: TensorRecord, tensors: dict[str, Tensor]) -> LayerReport:
    """The layer as :func:`save_compressed` reported it: zeros stored densely counted as zeros, scales included."""
    bits = record.bits if record.kind == "quantized" else 8 * record.element_size
    bytes_before = record.numel * record.element_size
    nonzero = record.count if record.coding != "dense" else int(torch.count_nonzero(tensors[record.name]))
    if record.kind == "quantized":
        scale = tensors[record.quantizer + "scale"]
        stored = (record.count * code_container_bits(record.bits) + 7) // 8 + scale.numel() * scale.element_size()
    else:
        stored = record.count * record.element_size
    return LayerReport(
        record.name, record.numel, nonzero, bits, bytes_before, record.position_bytes + stored, record.coding
    )


class _Rollback:
    """Remembers modules (the object at each name and its attributes) so that a refused file changes nothing.

    Conversions replace module objects, resizing replaces their Parameters: undoing puts the original
    object back at its name with its original attributes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, tuple[nn.Module, dict[str, Any]]] = {}

    def remember(self, name: str) -> None:
        if name in self.saved:  # the first snapshot is the original
            return
        module = self.model.get_submodule(name)
        state = dict(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(state[key])
        self.saved[name] = (module, state)

    def __call__(self) -> None:
        for name, (module, state) in self.saved.items():
            module.__dict__.clear()
            module.__dict__.update(state)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module)


def _convert_like(
    model: nn.Module, layers: dict[str, dict[str, Any]], rollback: _Rollback, tensors: dict[str, Tensor]
) -> None:
    """Convert the layers the file has as fake-quant layers (if the model does not have them yet; the plan checked
    that those it has quantize as the file's do)."""
    present = {name for name, _ in qat_modules(model)}
    missing = {name: cfg for name, cfg in layers.items() if name not in present}
    for name in missing:
        rollback.remember(name)
    modules = dict(model.named_modules())
    weights = {id(stored_weight(modules[name])) for name in missing if not isinstance(modules[name], nn.Embedding)}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, cfg in missing.items():
        if isinstance(modules[name], nn.Embedding) and id(stored_weight(modules[name])) in weights:
            continue  # tied to a Linear head the file quantizes: converted with it, one weight quantizer for both
        groups.setdefault(tuple(sorted(cfg.items())), []).append(name)
    for key, names in groups.items():
        config = QuantConfig(**dict(key))
        # names are patterns to convert_to_qat: a module named "a*" must not also convert "ab" (never rolled back)
        convert_listed(model, config, names, layers)  # a file of an earlier version may leave a tied head float
    for name in missing:
        for child, quantizer in model.get_submodule(name).named_children():
            if isinstance(quantizer, FakeQuantizer):
                _like_file(quantizer, f"{name}.{child}", tensors)


def _like_file(quantizer: FakeQuantizer, name: str, tensors: dict[str, Tensor]) -> None:
    """A quantizer just made (in float32; int4 group scales in float16) with its floating tensors in the dtypes the file
    stores them in: those of the model it was saved from (trial EF: a `16-true` file reloaded held float32 scales and
    ranges, and saved again it grew)."""
    for entry, tensor in [*quantizer.named_parameters(recurse=False), *quantizer.named_buffers(recurse=False)]:
        stored = tensors.get(f"{name}.{entry}")
        if stored is None or not (stored.is_floating_point() and tensor.is_floating_point()):
            continue
        if stored.dtype != tensor.dtype:
            value = tensor.detach().to(stored.dtype)
            if isinstance(tensor, nn.Parameter):
                value = nn.Parameter(value, requires_grad=tensor.requires_grad)
            setattr(quantizer, entry, value)


def _load_tensors(model: nn.Module, tensors: dict[str, Tensor], kept: set[str], path: Path) -> None:
    """``load_state_dict`` of the file's tensors, strict but for ``kept``, the entries the model holds that are not
    tensors (a module's extra state: the file has none, the model keeps its own; trial GJ, GK)."""
    if not kept:
        model.load_state_dict(tensors, strict=True)
        return
    result = model.load_state_dict(tensors, strict=False)
    wrong = [k for k in result.missing_keys if k not in kept] + list(result.unexpected_keys)
    if wrong:  # the checks above compared every tensor's name: a model whose `state_dict` and loading disagree
        raise CompressedFileError(f"{path} does not load into {type(model).__name__}: {sorted(wrong)[:5]}")
