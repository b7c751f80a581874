"""The manifest of a ``.lcz`` file: one named record per tensor, checked against the model before any allocation.

A record says how one ``state_dict`` entry is stored: ``"raw"`` (as it is), ``"sparse"`` (positions
of the nonzeros and their values), ``"quantized"`` (positions and integer codes; the scale is
another entry) or ``"bias"`` (int32 codes on the layer's accumulator grid, its weight scale times its
input scale, both other entries; format 5). :func:`plan` checks a whole manifest against the model
the file is loaded into: names, dtypes and shapes, every count, index stream and code stream, and the
section lengths, so that a file cannot make the reader allocate more than the model itself holds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.layers import registered_names
from ..core.packing import code_container_bits
from ..core.qat import FakeQuantizer, QuantConfig, qat_modules, quantizable
from ..core.quant import int_range
from ..core.selection import stored_weight
from .container import CompressedFileError
from .state_entries import tensor_entries

__all__ = [
    "SECTIONS",
    "ArchitectureMismatch",
    "TensorRecord",
    "max_manifest_bytes",
    "max_manifest_values",
    "max_raw_bytes",
    "plan",
]

SECTIONS = ("positions", "codes", "data")  # similar bytes together: the entropy coder does better
KINDS = ("raw", "sparse", "quantized", "alias", "bias")
_V1_KINDS = {"r": "raw", "s": "sparse", "q": "quantized"}
_QUANTIZER = re.compile(r"^(?P<layer>.+)\.(?P<role>weight|input)_fake_quant\.(?P<buffer>[A-Za-z_]+)$")
_QUANTIZER_BUFFERS = ("scale", "zero_point", "shift", "min_val", "max_val", "state")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # a quantizer's dtype follows model.to()
_QUANTIZER_DTYPES = {"scale": _FLOATS, "min_val": _FLOATS, "max_val": _FLOATS, "zero_point": (torch.int32,)}
_QUANTIZER_DTYPES |= {"shift": (torch.int32,), "state": (torch.int32,)}
# a quantizer holds a few buffers per layer: per output channel at most, scalars for activations
_PER_LAYER_SLACK = 64


class ArchitectureMismatch(CompressedFileError):
    """The file is well formed but holds another architecture's tensors."""


@dataclass(frozen=True)
class TensorRecord:
    """How one ``state_dict`` entry is stored.

    Attributes:
        name: the ``state_dict`` key.
        dtype: torch dtype name (``"float32"``).
        shape: the tensor's shape.
        kind: ``"raw"``, ``"sparse"``, ``"quantized"``, or ``"alias"``: the same tensor as the entry
            ``of`` names (a tied Parameter, stored once).
        count: stored (nonzero) entries (sparse and quantized).
        coding: ``"bitmask"`` or ``"gaps"``: how the positions are stored; ``"dense"`` (quantized only):
            every code is stored, no positions.
        position_bytes: length of the positions in the positions section.
        bits: code width (quantized).
        axis: the output-channel axis of per-channel scales (``0``; ``1`` for a ``transformers`` Conv1D),
            ``None`` per tensor (quantized).
        qmin, qmax: the integer range (quantized).
        quantizer: prefix of the quantizer entries that hold the scale (``"fc.weight_fake_quant."``).
        of: the entry an alias repeats.
        layer: the layer whose quantizers give a bias record's grid (``"fc"`` for ``"fc.bias"``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    count: int = 0
    coding: str = ""
    position_bytes: int = 0
    bits: int = 0
    axis: int | None = None
    qmin: int = 0
    qmax: int = 0
    quantizer: str = ""
    of: str = ""
    layer: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CompressedFileError(f"{shown(self.name)}: unknown dtype {shown(self.dtype)} in the file.")
        return dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "kind": self.kind}
        if self.kind == "alias":
            out["of"] = self.of
        elif self.kind == "bias":
            out["layer"] = self.layer
        elif self.kind != "raw":
            out.update(count=self.count, coding=self.coding, position_bytes=self.position_bytes)
        if self.kind == "quantized":
            out.update(bits=self.bits, axis=self.axis, qmin=self.qmin, qmax=self.qmax, quantizer=self.quantizer)
        return out

    @classmethod
    def from_json(cls, entry: Any, version: int) -> TensorRecord:
        """A record from the manifest, strictly typed (format 1 stored positional lists)."""
        if version == 1:
            entry = _from_v1(entry)
        if not isinstance(entry, dict):
            raise CompressedFileError(f"bad tensor record {str(entry)[:80]!r} in the file.")
        fields = dict(entry)
        name, dtype, shape, kind = fields.get("name"), fields.get("dtype"), fields.get("shape"), fields.get("kind")
        if not isinstance(name, str) or not isinstance(dtype, str) or kind not in KINDS:
            raise CompressedFileError(f"bad tensor record {str(entry)[:80]!r} in the file.")
        if kind == "bias" and version < 5:
            raise CompressedFileError(f"{shown(name)}: a bias record in a format {version} file.")
        if set(fields) != set(_FIELDS[kind]):
            raise CompressedFileError(f"{shown(name)}: a {kind} record with fields {sorted(fields)} in the file.")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise CompressedFileError(f"{shown(name)}: bad shape {str(shape)[:80]} in the file.")
        fields["shape"] = tuple(shape)
        for key in ("count", "position_bytes", "bits", "qmin", "qmax"):
            if key in fields and not _is_int(fields[key]):
                raise CompressedFileError(f"{shown(name)}: bad {key} {repr(fields[key])[:80]} in the file.")
        for key in ("coding", "quantizer", "of", "layer"):
            if key in fields and not isinstance(fields[key], str):
                raise CompressedFileError(f"{shown(name)}: bad {key} {str(fields[key])[:80]!r} in the file.")
        axis = fields.get("axis")
        if axis is not None and not (_is_int(axis) and axis in (0, 1)):  # trial DC: 0.0 == 0 reached `shape[0.0]`
            raise CompressedFileError(f"{shown(name)}: bad axis {repr(fields['axis'])[:80]} in the file.")
        return cls(**fields)


_FIELDS = {
    "raw": ("name", "dtype", "shape", "kind"),
    "alias": ("name", "dtype", "shape", "kind", "of"),
    "bias": ("name", "dtype", "shape", "kind", "layer"),
    "sparse": ("name", "dtype", "shape", "kind", "count", "coding", "position_bytes"),
    "quantized": (
        "name",
        "dtype",
        "shape",
        "kind",
        "count",
        "coding",
        "position_bytes",
        "bits",
        "axis",
        "qmin",
        "qmax",
        "quantizer",
    ),
}


def shown(text: str, limit: int = 120) -> str:
    """A string read from a file, as a message shows it: quoted and escaped (a newline or a lone surrogate in a name
    forged lines or broke ``print(err)``), and cut at ``limit`` characters (a trial: a 60,000-character name in a
    60 KB message)."""
    more = len(text) - limit
    return repr(text[:limit]) + (f" (+{more} characters)" if more > 0 else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_v1(entry: Any) -> Any:
    """Format 1: ``[name, dtype, shape, kind, count, coding, position_bytes, bits, axis, qmin, qmax, prefix]``."""
    if not isinstance(entry, list) or len(entry) < 4 or not isinstance(entry[3], str) or entry[3] not in _V1_KINDS:
        return entry
    kind = _V1_KINDS[entry[3]]
    out = dict(zip(_FIELDS[kind], entry, strict=False))
    out["kind"] = kind
    return out


# ---------------------------------------------------------------------------------------------- bounds
def _layers_with_weights(model: nn.Module) -> dict[str, Tensor]:
    weights = {name: stored_weight(module) for name, module in model.named_modules(remove_duplicate=False)}
    return {name: w for name, w in weights.items() if isinstance(w, Tensor) and w.dim() >= 2}  # no parametrization run


def second_names(model: nn.Module) -> dict[str, str]:
    """Names of modules registered under more than one name (``self.backbone`` also ``self.model[0]``), each
    mapped to the module's first name: the file stores their entries once, under the first."""
    return {name: names[0] for names in registered_names(model).values() for name in names[1:]}


def first_name(name: str, second: dict[str, str]) -> str | None:
    """The state-dict entry ``name`` under the first name of a module registered twice that holds it (a quantizer
    inside such a layer too); ``None`` when no module on its path is registered twice."""
    if not second:
        return None
    depth = max(n.count(".") for n in second) + 1  # no deeper prefix can be a module's name: a forged name of
    parts = name.split(".", depth)  # 30,000 dots was joined once per dot (trial DC: seconds per file)
    for cut in range(min(depth, len(parts) - 1), 0, -1):
        prefix = ".".join(parts[:cut])
        first = second.get(prefix)
        if first is not None:
            rest = name[len(prefix) + 1 :]
            return f"{first}.{rest}" if first else rest
    return None


def _same_module_entry(record: TensorRecord, second: dict[str, str]) -> bool:
    """Whether an alias record names an entry of a module registered twice by its entry under the first name."""
    return record.of is not None and record.of == first_name(record.name, second)


def _tied_quantizer(record: TensorRecord, layers: dict[str, Tensor]) -> bool:
    """Whether an alias record names a weight quantizer's buffer by the same buffer of another layer of the same
    weight (a tied output head and its embedding share one quantizer: ``core/qat_ties.py``)."""
    found, of = _QUANTIZER.match(record.name), _QUANTIZER.match(record.of or "")
    if found is None or of is None or found["role"] != "weight" or of["role"] != "weight":
        return False
    mine, theirs = layers.get(found["layer"]), layers.get(of["layer"])
    return found["buffer"] == of["buffer"] and mine is not None and mine is theirs


def _manifest_names(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The names a file for ``model`` can record: its state entries, every quantizer buffer its layers can hold (a
    float model loads a QAT file), and the layers."""
    layers = list(_layers_with_weights(model))
    buffers = [f"{layer}.{role}_fake_quant.{buffer}" for layer in layers for role in ("weight", "input") for buffer in
               _QUANTIZER_BUFFERS]  # fmt: skip
    return list(model.state_dict()), buffers, layers


def max_manifest_bytes(model: nn.Module) -> int:
    """The longest manifest a file for ``model`` can have: a record names its tensor up to three times (an alias, a
    quantizer) beside about a hundred bytes of fields (a quantizer buffer's record: its name and about sixty), and
    each layer has its quantization settings and heads (twice as many bytes as a file needs)."""
    entries, buffers, layers = _manifest_names(model)
    return (
        65536
        + sum(3 * len(name) + 192 for name in entries)
        + sum(2 * len(name) + 128 for name in buffers)
        + sum(len(layer) + 384 for layer in layers)
    )


def max_manifest_values(model: nn.Module) -> int:
    """The most JSON values (commas and brackets) a manifest for ``model`` can hold: a record has at most about 20,
    a quantizer buffer's about 10, a layer's settings and heads about 20. Checked before parsing: a few KiB of
    ``{},{},...`` would otherwise build millions of Python objects."""
    entries, buffers, layers = _manifest_names(model)
    return 4096 + 24 * len(entries) + 12 * len(buffers) + 32 * len(layers)


def _quantizer_shapes(weight: Tensor, role: str, buffer: str, settings: dict[str, Any]) -> list[tuple[int, ...]]:
    """The shapes one quantizer buffer may have, by the settings the file gives its layer: a weight's scale per
    tensor, per output channel (either axis of the first two: a ``transformers`` Conv1D's is the second) or per group
    of ``group_size`` input weights of each channel; an input's scale, and every other buffer, one value. Checked
    before anything is decompressed (trial CU: group scales for every layer, whatever the file quantized, and of any
    shape up to one per two weights, let a hostile file cost 3.4 times a bfloat16 model before its refusal)."""
    if buffer != "scale":
        return [()]
    if role != "weight":
        return [(), (1,)]
    shapes: list[tuple[int, ...]] = [(), *((int(d),) for d in weight.shape[:2])]
    group = settings.get("group_size")
    size = group if isinstance(group, int) and not isinstance(group, bool) else 0
    if size >= 2 and weight.dim() == 2:
        rows, columns = (int(d) for d in weight.shape)
        shapes += [(rows, columns // size), (columns, rows // size)]
    return shapes


def _fits(shape: tuple[int, ...], allowed: list[tuple[int, ...]], compacted: bool) -> bool:
    """``shape`` is one of ``allowed``, or, in a compacted file, one of them cut (no dimension larger)."""
    return any(
        shape == a or (compacted and len(shape) == len(a) and all(s <= b for s, b in zip(shape, a, strict=True)))
        for a in allowed
    )


def max_raw_bytes(model: nn.Module) -> int:
    """The most decompressed bytes a file for ``model`` can need: its tensors, quantizers and manifest.

    Every stored form of a tensor is at most its dense size (positions are chosen only when they
    make it smaller), and quantizer buffers are per output channel at most.
    """
    state = sum(t.numel() * t.element_size() for t in tensor_entries(model.state_dict()).values())
    layers = _layers_with_weights(model)
    quantizers = sum(
        8 * len(_QUANTIZER_BUFFERS) * (max(1, *w.shape[:2]) + _PER_LAYER_SLACK) + 2 * (w.numel() // 2)
        for w in layers.values()
    )  # per-channel buffers of any dtype, and float16 group scales
    return 4 + max_manifest_bytes(model) + state + quantizers


def layer_settings(layer: nn.Module) -> dict[str, Any]:
    """A fake-quant layer's :class:`QuantConfig` fields, as the manifest records them."""
    wq = layer.weight_fake_quant
    aq = layer.input_fake_quant
    assert isinstance(wq, FakeQuantizer)
    settings = {
        "weight_bits": wq.bits,
        "activation_bits": aq.bits if isinstance(aq, FakeQuantizer) else None,
        "scale": wq.mode,
        "averaging_constant": wq.averaging_constant,
    }
    if wq.groups:  # the LLM recipe's fields, written only when used (older readers know the rest)
        weight = cast(Tensor, layer.weight)
        settings["group_size"] = int(weight.shape[1 - wq.channel_axis]) // wq.groups
    if isinstance(aq, FakeQuantizer) and aq.per_token:
        settings["activation_granularity"] = "per_token"
    if layer.quantize_bias:
        settings["quantize_bias"] = True
    return settings


def _check_converted_alike(model: nn.Module, layers: Any) -> None:
    """A layer the model has converted already must quantize as the file's does: the file's codes and scales mean
    nothing on another grid (an 8-bit file loaded into a 4-bit layer took its scales and computed on 4 bits,
    silently). Checked before the file's shapes, which such a model may also fail, for the clearer reason."""
    if not isinstance(layers, dict):
        return  # `_check_qat_layers` refuses it
    for name, layer in qat_modules(model):
        cfg = layers.get(name)
        try:
            same = not isinstance(cfg, dict) or QuantConfig(**layer_settings(layer)) == QuantConfig(**cfg)
        except (TypeError, ValueError):
            continue  # unreadable settings: `_check_qat_layers` names them
        if not same:
            raise ArchitectureMismatch(
                f"was written from another quantization: the model's fake-quant layer {name!r} quantizes with "
                f"{layer_settings(layer)}, the file with {cfg}; load into a fresh model (the file converts it) or "
                "one converted with the file's settings."
            )


# ---------------------------------------------------------------------------------------------- the plan
def plan(model: nn.Module, manifest: dict[str, Any], version: int) -> tuple[list[TensorRecord], list[int]]:
    """Check every record of ``manifest`` against ``model``; return the records and the section sizes.

    Raises :class:`CompressedFileError` for anything a file written for this model could not contain:
    unknown names or dtypes, shapes that differ (or, for a compacted file, exceed the model's),
    quantizer buffers larger than a layer's channels, counts larger than a tensor, index and code
    streams of impossible lengths, sections that do not add up, unreadable quantization settings.
    """
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise CompressedFileError("the manifest has no tensor list.")
    records = [TensorRecord.from_json(entry, version) for entry in entries]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise CompressedFileError("the file stores a tensor twice.")
    compacted = manifest.get("compacted", False)
    if not isinstance(compacted, bool):
        raise CompressedFileError(f"bad `compacted` flag {repr(compacted)[:80]} in the file.")
    if manifest.get("heads") and not compacted:  # only compaction sets head counts: they would set nothing
        raise CompressedFileError(
            "the file holds head counts but no compacted model: a file `save_compressed` never wrote."
        )
    qat_layers = manifest.get("qat_layers", {})
    _check_converted_alike(model, qat_layers)
    _check_names(model, records, compacted, qat_layers)
    _check_qat_layers(model, qat_layers)
    by_name = {r.name: r for r in records}
    position = {r.name: i for i, r in enumerate(records)}
    sizes = dict.fromkeys(SECTIONS, 0)
    for i, record in enumerate(records):
        element = record.element_size
        if record.kind == "raw":
            sizes["data"] += record.numel * element
            continue
        if record.kind == "bias":
            _check_bias(record, by_name, qat_layers)
            sizes["data"] += record.numel * 4  # int32 codes
            continue
        if record.kind == "alias":
            target = by_name.get(record.of)
            if target is None or target.kind == "alias" or position[target.name] >= i:
                raise CompressedFileError(
                    f"{record.name}: an alias of {shown(record.of)}, which is not stored before it."
                )
            if (target.dtype, target.shape) != (record.dtype, record.shape):
                raise CompressedFileError(f"{record.name}: an alias of {shown(record.of)} with another dtype or shape.")
            continue
        sizes["positions"] += _check_positions(record)
        if record.kind == "sparse":
            sizes["data"] += record.count * element
        else:
            _check_quantized(record, by_name)
            layer = record.quantizer.removesuffix(".weight_fake_quant.")
            if layer in qat_layers and qat_layers[layer].get("weight_bits") != record.bits:
                raise CompressedFileError(
                    f"{record.name}: {record.bits}-bit codes for a layer the file quantizes to "
                    f"{qat_layers[layer].get('weight_bits')!r} bits."
                )
            sizes["codes"] += (record.count * code_container_bits(record.bits) + 7) // 8
    declared = manifest.get("sections")
    if not isinstance(declared, list) or [int(n) if _is_int(n) else -1 for n in declared] != list(sizes.values()):
        raise CompressedFileError(
            f"section sizes do not match the file: {str(declared)[:80]} declared, {list(sizes.values())} recorded."
        )
    return records, list(sizes.values())


def _check_names(model: nn.Module, records: list[TensorRecord], compacted: bool, qat_layers: Any) -> None:
    quantized = qat_layers if isinstance(qat_layers, dict) else {}  # not a dict: `_check_qat_layers` refuses it
    mine = tensor_entries(model.state_dict())  # (extra state: in no file)
    layers = _layers_with_weights(model)
    second = second_names(model)
    missing = sorted(set(mine) - {r.name for r in records} - _quantizer_keys(mine))
    extra, shapes, dtypes, kinds, unquantized = [], [], [], [], []
    dtype_pairs: set[tuple[str, str]] = set()  # (in the file, in the model) of model tensors whose dtype differs
    floating = 0  # model tensors of a floating dtype the file holds
    for record in records:
        have = mine.get(record.name)
        if have is None:
            found = _QUANTIZER.match(record.name)
            weight = layers.get(found["layer"]) if found else None
            settings = quantized.get(found["layer"]) if found else None
            if settings is None and found is not None:  # a layer registered twice: its settings under its first name
                first = _QUANTIZER.match(first_name(record.name, second) or "")
                settings = quantized.get(first["layer"]) if first else None
            if found is None or weight is None or found["buffer"] not in _QUANTIZER_BUFFERS:
                extra.append(record.name)
            elif not isinstance(settings, dict):  # a quantizer's state comes with its layer's settings
                unquantized.append(record.name)
            elif not _fits(
                record.shape, _quantizer_shapes(weight, found["role"], found["buffer"], settings), compacted
            ):
                shapes.append(record.name)  # only a scale is per channel or group; the other buffers are scalars
            elif record.torch_dtype not in _QUANTIZER_DTYPES[found["buffer"]] or (
                record.torch_dtype.is_floating_point and record.torch_dtype.itemsize > max(4, weight.element_size())
            ):  # float64 scales for a float32 layer: `model.to()` gives quantizers the weights' dtype (a trial:
                dtypes.append(record.name)  # int4 group scales in float64 took 63 MiB to load a 16 MiB model)
            elif record.kind != "raw" and not (
                record.kind == "alias" and (_same_module_entry(record, second) or _tied_quantizer(record, layers))
            ):
                kinds.append(record.name)  # a quantizer buffer is written whole: its scale is read before aliases
            continue
        floating += int(have.is_floating_point())
        if record.torch_dtype != have.dtype:
            dtypes.append(record.name)
            dtype_pairs.add((str(record.torch_dtype), str(have.dtype)))
        if record.shape == tuple(have.shape):
            continue
        # compaction keeps at least one channel of each dimension it cuts (a trial: a layer of 0 channels loaded, and
        # the first forward failed)
        shrunk = len(record.shape) == have.dim() and all(
            0 < a <= b or a == b for a, b in zip(record.shape, have.shape, strict=True)
        )
        if not (compacted and shrunk):
            shapes.append(record.name)
    if missing or extra or shapes or dtypes or kinds or unquantized:
        details = []
        for label, keys in (
            ("missing in the file", missing),
            ("unknown to the model", extra),
            ("shape differs", shapes),
            ("dtype differs", dtypes),
            ("a quantizer buffer not stored whole", kinds),
            ("quantizer state of a layer the file does not quantize", unquantized),
        ):
            if keys:
                details.append(f"{label}: [{', '.join(shown(k) for k in sorted(keys)[:5])}]")
        whole_model = len(dtypes) == floating > 1 and len(dtype_pairs) == 1  # every float tensor: a model dtype
        if whole_model and not (missing or extra or shapes or kinds or unquantized):
            written, held = next(iter(dtype_pairs))
            raise ArchitectureMismatch(
                f"holds {written} tensors where {type(model).__name__} has {held} ({sorted(dtypes)[:3]} ...): the "
                f"file was written from a {written} model"
                + {
                    "torch.bfloat16": " (e.g. `precision='bf16-true'`)",
                    "torch.float16": " (e.g. `precision='16-true'`)",
                }.get(written, "")
                + f". Convert the fresh model first (`model.to({written})`), then load."
            )
        raise ArchitectureMismatch(
            f"was written for another architecture than {type(model).__name__}: " + "; ".join(details)
        )


def _quantizer_keys(state: dict[str, Tensor]) -> set[str]:
    return {k for k in state if _QUANTIZER.match(k)}


def _check_qat_layers(model: nn.Module, layers: Any) -> None:
    if not isinstance(layers, dict):
        raise CompressedFileError("bad `qat_layers` in the file.")
    modules = dict(model.named_modules())
    for name, cfg in layers.items():
        module = modules.get(name)
        if module is None or not quantizable(module):
            raise CompressedFileError(
                f"the file quantizes {shown(name)}, which is not a Linear/Conv layer of the model."
            )
        if not isinstance(cfg, dict):
            raise CompressedFileError(f"bad quantization settings for {shown(name)} in the file.")
        try:
            QuantConfig(**cfg)
        except (TypeError, ValueError) as err:
            raise CompressedFileError(
                f"bad quantization settings for {shown(name)} in the file: {shown(str(err))}"
            ) from err


def _check_positions(record: TensorRecord) -> int:
    numel, count, nbytes = record.numel, record.count, record.position_bytes
    if not 0 <= count <= numel:
        raise CompressedFileError(f"{record.name}: {count} stored entries for {numel} elements.")
    if record.coding == "bitmask":
        if nbytes != (numel + 7) // 8:
            raise CompressedFileError(f"{record.name}: a bitmask of {nbytes} bytes for {numel} elements.")
    elif record.coding == "dense":  # every entry stored in order, no positions (quantized codes)
        if nbytes != 0 or count != numel or record.kind != "quantized":
            raise CompressedFileError(f"{record.name}: a dense record with {count} of {numel} entries.")
    elif record.coding == "gaps":
        # one byte per position, plus one per 255 skipped entries; written only when shorter than a bitmask
        if not count <= nbytes < (numel + 7) // 8 or (count == 0 and nbytes != 0):
            raise CompressedFileError(f"{record.name}: an index stream of {nbytes} bytes for {count} positions.")
    else:
        raise CompressedFileError(f"{record.name}: unknown index coding {shown(record.coding)}.")
    return nbytes


def _check_quantized(record: TensorRecord, by_name: dict[str, TensorRecord]) -> None:
    layer = record.name.removesuffix(".weight")
    if record.quantizer != f"{layer}.weight_fake_quant." or layer == record.name:
        raise CompressedFileError(f"{record.name}: bad quantizer {shown(record.quantizer)} in the file.")
    if not 2 <= record.bits <= 8:
        raise CompressedFileError(f"{record.name}: {record.bits}-bit codes are outside 2..8.")
    lowest, highest = int_range(record.bits, True)
    if not lowest <= record.qmin < record.qmax <= highest:
        raise CompressedFileError(f"{record.name}: integer range [{record.qmin}, {record.qmax}] in the file.")
    scale = by_name.get(record.quantizer + "scale")
    if scale is None:
        raise CompressedFileError(f"{record.name}: its scale is missing from the file.")
    axis = record.axis
    if axis is not None and axis >= len(record.shape):
        raise CompressedFileError(f"{record.name}: axis {axis} of a {len(record.shape)}-d tensor in the file.")
    grouped = len(scale.shape) == 2  # (channels, groups) along the other axis of a 2-d weight
    if grouped and (
        axis is None
        or len(record.shape) != 2
        or scale.shape[0] != record.shape[axis]
        or scale.shape[1] < 1
        or record.shape[1 - axis] % scale.shape[1]
    ):
        raise CompressedFileError(f"{record.name}: group scales of shape {scale.shape} for {record.shape}.")
    if not grouped and scale.numel != (1 if axis is None else record.shape[axis]):
        raise CompressedFileError(f"{record.name}: {scale.numel} scales for axis {record.axis}.")


def _check_bias(record: TensorRecord, by_name: dict[str, TensorRecord], qat_layers: dict[str, Any]) -> None:
    """A bias stored as codes: the float32 bias of a layer the file quantizes with ``quantize_bias``, whose weight
    scale (per channel or per tensor) and input scale (per tensor) are stored whole in the file."""
    layer = record.layer
    if not layer or record.name != f"{layer}.bias" or len(record.shape) != 1 or record.dtype != "float32":
        raise CompressedFileError(
            f"{record.name}: a bias record of layer {shown(layer)}, shape {record.shape} in the file."
        )
    if qat_layers.get(layer, {}).get("quantize_bias") is not True:
        raise CompressedFileError(f"{record.name}: stored as codes, but the file does not quantize {layer!r}'s bias.")
    weight = by_name.get(f"{layer}.weight_fake_quant.scale")
    source = by_name.get(f"{layer}.input_fake_quant.scale")
    if weight is None or source is None or weight.kind != "raw" or source.kind != "raw":
        raise CompressedFileError(f"{record.name}: the scales of its grid are not stored whole in the file.")
    if len(weight.shape) > 1 or weight.numel not in (1, record.numel) or source.numel != 1:
        raise CompressedFileError(
            f"{record.name}: a grid from scales of shapes {weight.shape} and {source.shape} for {record.shape}."
        )
