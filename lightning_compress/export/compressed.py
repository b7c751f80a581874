"""A compressed file that is really smaller: ``save_compressed`` / ``load_compressed``.

Layout (little endian)::

    b"LCZ\\x89" | u16 format version | u8 codec (1 = lzma) | u8 reserved
    | u64 payload length | u64 raw length | 32-byte SHA-256 of the header fields and the payload | payload

The payload is ``lzma(u32 manifest length | manifest JSON | blobs)``. The manifest names every
entry of the model's ``state_dict`` with its shape and dtype. Weights of fake-quantized layers are
stored as their integer codes (packed 2/4/8 bits) at their nonzero positions, with the scales;
other floating tensors with many zeros as positions plus values; everything else as it is.
Positions are a bitmask or a gap stream, whichever is smaller for that tensor. Loading checks the
magic, version, lengths, checksum and architecture before anything touches the model.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.compact import COMPACTED_FLAG, resize_module
from ..core.packing import (
    code_container_bits,
    decode_gaps,
    encode_gaps,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)
from ..core.qat import FakeQuantizer, QuantConfig, convert_to_float, convert_to_qat, qat_modules
from ..core.quant import dequantize, quantize
from ..core.structure import is_depthwise, supported
from .report import CompressionReport, LayerReport

__all__ = ["FORMAT_VERSION", "CompressedFileError", "load_compressed", "save_compressed"]

MAGIC = b"LCZ\x89"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBBQQ32s")
_CODEC_LZMA = 1
# raw LZMA2 (our header carries lengths and a checksum); lc=0: the numeric streams have little byte context
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]
_QUANTIZER_MARKERS = (".weight_fake_quant.", ".input_fake_quant.")


class CompressedFileError(ValueError):
    """The file is not a readable lightning-compress file for this model."""


# ---------------------------------------------------------------------------------------------- save
_SECTIONS = ("positions", "codes", "data")  # similar bytes together: the entropy coder does better


class _Sections:
    def __init__(self) -> None:
        self.parts: dict[str, list[bytes]] = {name: [] for name in _SECTIONS}

    def add(self, section: str, data: bytes) -> int:
        self.parts[section].append(data)
        return len(data)

    def sizes(self) -> list[int]:
        return [sum(len(p) for p in self.parts[name]) for name in _SECTIONS]

    def joined(self) -> bytes:
        return b"".join(b"".join(self.parts[name]) for name in _SECTIONS)


def _raw(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _positions(mask: Tensor, sections: _Sections) -> tuple[str, int]:
    flat = mask.reshape(-1).cpu()
    bitmask = pack_bits(flat)
    gaps = encode_gaps(flat.nonzero().reshape(-1))
    coding, data = ("gaps", gaps) if gaps.numel() < bitmask.numel() else ("bitmask", bitmask)
    return coding, sections.add("positions", data.numpy().tobytes())


def _quantized_weights(model: nn.Module) -> dict[str, tuple[FakeQuantizer, str]]:
    """``{weight name: (its quantizer, layer name)}`` for layers whose fake quantization is on."""
    out = {}
    for name, layer in qat_modules(model):
        quantizer = layer.weight_fake_quant
        if isinstance(quantizer, FakeQuantizer) and quantizer.fake_quant_enabled:
            out[f"{name}.weight"] = (quantizer, name)
    return out


def _qat_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    layers = {}
    for name, layer in qat_modules(model):
        wq = layer.weight_fake_quant
        aq = layer.input_fake_quant
        assert isinstance(wq, FakeQuantizer)
        layers[name] = {
            "weight_bits": wq.bits,
            "activation_bits": aq.bits if isinstance(aq, FakeQuantizer) else None,
            "scale": wq.mode,
            "averaging_constant": wq.averaging_constant,
        }
    return layers


def save_compressed(model: nn.Module, path: str | Path) -> CompressionReport:
    """Write ``model`` to ``path`` in the compressed format and report the sizes.

    Fake-quantized weights are stored as integer codes, sparse tensors as positions and values;
    the model itself is not changed. Load with :func:`load_compressed`.
    """
    path = Path(path)
    state = model.state_dict()
    quantized = _quantized_weights(model)
    sections = _Sections()
    entries: list[list[Any]] = []
    layers: list[LayerReport] = []
    for name, tensor in state.items():
        tensor = tensor.detach()
        head = [name, str(tensor.dtype).split(".")[-1], list(tensor.shape)]
        if name in quantized:
            quantizer, layer_name = quantized[name]
            qmin, qmax = quantizer.qrange
            codes = quantize(tensor, quantizer.scale.detach(), quantizer.zero_point, qmin, qmax, quantizer.axis)
            nonzero = codes != 0
            count = int(nonzero.sum())
            coding, pos_bytes = _positions(nonzero, sections)
            code_bytes = sections.add(
                "codes", pack_codes(codes.reshape(-1)[nonzero.reshape(-1)], quantizer.bits).numpy().tobytes()
            )
            prefix = f"{layer_name}.weight_fake_quant."
            entries.append([*head, "q", count, coding, pos_bytes, quantizer.bits, quantizer.axis, qmin, qmax, prefix])
            after = pos_bytes + code_bytes + 4 * quantizer.scale.numel()
            layers.append(_layer_report(name, tensor, count, quantizer.bits, after, coding))
        elif tensor.is_floating_point() and tensor.numel() >= 64 and _worth_sparse(tensor):
            nonzero = tensor != 0
            count = int(nonzero.sum())
            coding, pos_bytes = _positions(nonzero, sections)
            value_bytes = sections.add("data", _raw(tensor.reshape(-1)[nonzero.reshape(-1)]))
            entries.append([*head, "s", count, coding, pos_bytes])
            layers.append(
                _layer_report(name, tensor, count, 8 * tensor.element_size(), pos_bytes + value_bytes, coding)
            )
        else:
            sections.add("data", _raw(tensor))
            entries.append([*head, "r"])
    manifest = {
        "format": "lightning-compress",
        "version": FORMAT_VERSION,
        "model": type(model).__name__,
        "qat_layers": _qat_layers(model),
        "compacted": bool(getattr(model, COMPACTED_FLAG, False)),
        "sections": sections.sizes(),
        "tensors": entries,
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    raw = struct.pack("<I", len(manifest_bytes)) + manifest_bytes + sections.joined()
    payload = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_FILTERS)
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, _CODEC_LZMA, 0, len(payload), len(raw), b"\0" * 32)[:-32]
    header = fields + hashlib.sha256(fields + payload).digest()  # the checksum covers the header too
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(header + payload)
    tmp.replace(path)  # never leave a half-written file under the final name
    return CompressionReport.of_file(path, "lightning-compress", layers, model)


def _worth_sparse(tensor: Tensor) -> bool:
    density = float((tensor != 0).float().mean())
    return density < 0.6  # positions cost at most 1 bit per entry; values are saved only where nonzero


def _layer_report(name: str, tensor: Tensor, nonzero: int, bits: int, after: int, coding: str) -> LayerReport:
    return LayerReport(
        name=name,
        numel=tensor.numel(),
        nonzero=nonzero,
        bits=bits,
        bytes_before=tensor.numel() * tensor.element_size(),
        bytes_after=after,
        index_coding=coding,
    )


# ---------------------------------------------------------------------------------------------- load
def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CompressedFileError(f"cannot read {path}: {err}") from err
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise CompressedFileError(f"{path} is not a lightning-compress file (bad magic or too short).")
    _, version, codec, _, payload_len, raw_len, digest = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CompressedFileError(
            f"{path} has format version {version}; this lightning-compress reads version {FORMAT_VERSION}."
        )
    if codec != _CODEC_LZMA:
        raise CompressedFileError(f"{path} uses unknown codec {codec}.")
    payload = data[_HEADER.size :]
    if len(payload) != payload_len:
        raise CompressedFileError(
            f"{path} is truncated or padded: payload {len(payload)} bytes, header says {payload_len}."
        )
    if hashlib.sha256(data[: _HEADER.size - 32] + payload).digest() != digest:
        raise CompressedFileError(f"{path} is corrupted: checksum mismatch.")
    try:
        raw = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_FILTERS)
    except lzma.LZMAError as err:
        raise CompressedFileError(f"{path} is corrupted: {err}") from err
    if len(raw) != raw_len or len(raw) < 4:
        raise CompressedFileError(f"{path} is corrupted: decompressed size mismatch.")
    (manifest_len,) = struct.unpack_from("<I", raw)
    try:
        manifest = json.loads(raw[4 : 4 + manifest_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompressedFileError(f"{path} is corrupted: unreadable manifest.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "lightning-compress":
        raise CompressedFileError(f"{path}: unknown manifest format.")
    return manifest, raw[4 + manifest_len :]


class _Reader:
    """Reads the sections front to back, in the order the entries were written."""

    def __init__(self, body: bytes, sizes: list[int]) -> None:
        if len(sizes) != len(_SECTIONS) or sum(sizes) != len(body) or min(sizes) < 0:
            raise CompressedFileError("section sizes do not match the file.")
        self.body = body
        starts = [0, sizes[0], sizes[0] + sizes[1]]
        self.cursor = dict(zip(_SECTIONS, starts, strict=True))
        self.end = {name: start + size for name, start, size in zip(_SECTIONS, starts, sizes, strict=True)}

    def take(self, section: str, nbytes: int) -> Tensor:
        start = self.cursor[section]
        if nbytes < 0 or start + nbytes > self.end[section]:
            raise CompressedFileError(f"the {section} section ends early.")
        self.cursor[section] = start + nbytes
        if nbytes == 0:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(self.body[start : start + nbytes]), dtype=torch.uint8)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CompressedFileError(f"unknown dtype {name!r} in the file.")
    return dtype


def _numel(shape: list[int]) -> int:
    numel = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise CompressedFileError(f"bad shape {shape} in the file.")
        numel *= d
    return numel


def _as(data: Tensor, dtype: torch.dtype, shape: list[int]) -> Tensor:
    return data.view(dtype).reshape(shape).clone()


def _mask(name: str, coding: str, data: Tensor, numel: int, count: int) -> Tensor:
    if coding == "bitmask":
        mask = unpack_bits(data, numel)
        if int(mask.sum()) != count:
            raise CompressedFileError(f"{name}: bitmask holds {int(mask.sum())} entries, expected {count}.")
        return mask
    if coding != "gaps":
        raise CompressedFileError(f"{name}: unknown index coding {coding!r}.")
    positions = decode_gaps(data, count)
    if count and int(positions[-1]) >= numel:
        raise CompressedFileError(f"{name}: position outside the tensor.")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    return mask


def _decode_all(manifest: dict[str, Any], body: bytes) -> dict[str, Tensor]:
    reader = _Reader(body, [int(n) for n in manifest["sections"]])
    tensors: dict[str, Tensor] = {}
    pending: list[tuple[list[Any], Tensor, Tensor]] = []  # quantized entries: need their scales, decoded later
    for entry in manifest["tensors"]:
        name, dtype_name, shape, kind = entry[0], entry[1], entry[2], entry[3]
        dtype = _dtype(dtype_name)
        numel = _numel(shape)
        element = torch.empty((), dtype=dtype).element_size()
        if kind == "r":
            tensors[name] = _as(reader.take("data", numel * element), dtype, shape)
            continue
        count, coding, pos_bytes = int(entry[4]), entry[5], int(entry[6])
        if not 0 <= count <= numel:
            raise CompressedFileError(f"{name}: {count} stored entries for {numel} elements.")
        mask = _mask(name, coding, reader.take("positions", pos_bytes), numel, count)
        if kind == "s":
            values = _as(reader.take("data", count * element), dtype, [count])
            out = torch.zeros(numel, dtype=dtype)
            out[mask] = values
            tensors[name] = out.reshape(shape)
        elif kind == "q":
            bits = int(entry[7])
            width = code_container_bits(bits)
            codes = unpack_codes(reader.take("codes", (count * width + 7) // 8), bits, count)
            pending.append((entry, mask, codes))
        else:
            raise CompressedFileError(f"{name}: unknown tensor kind {kind!r}.")
    for entry, mask, codes in pending:
        name, dtype_name, shape = entry[0], entry[1], entry[2]
        axis, prefix = entry[8], entry[11]
        scale = tensors.get(prefix + "scale")
        zero_point = tensors.get(prefix + "zero_point", torch.zeros((), dtype=torch.int32))
        if scale is None:
            raise CompressedFileError(f"{name}: its scale is missing from the file.")
        full = torch.zeros(_numel(shape), dtype=torch.int32)
        full[mask] = codes
        tensors[name] = dequantize(full.reshape(shape), scale, zero_point, axis).to(_dtype(dtype_name))
    return tensors


def _plain(keys: Any) -> list[str]:
    return [k for k in keys if not any(m in k for m in _QUANTIZER_MARKERS)]


def load_compressed(model: nn.Module, path: str | Path) -> CompressionReport:
    """Load a file written by :func:`save_compressed` into ``model`` (a fresh instance of the architecture).

    Fake-quant layers recorded in the file are put back (with their scales, zero points and
    activation ranges), so the eval-mode outputs equal those of the saved model.

    Raises:
        CompressedFileError: not such a file, unknown version, truncated, corrupted, or written for
            another architecture. The model is left exactly as it was.
    """
    path = Path(path)
    manifest, body = _read(path)
    try:
        tensors = _decode_all(manifest, body)
    except CompressedFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise CompressedFileError(f"{path} is corrupted: {err}") from err
    restore = _resize_like(model, tensors) if manifest.get("compacted") else None
    try:
        _check_architecture(model, tensors, path)
    except CompressedFileError:
        if restore is not None:
            restore()
        raise
    converted = _convert_like(model, manifest.get("qat_layers", {}))
    try:
        expected = model.state_dict()
        problems = [k for k in expected if k not in tensors] + [k for k in tensors if k not in expected]
        problems += [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
        if problems:
            raise CompressedFileError(f"{path} does not fit {type(model).__name__}: {sorted(problems)[:5]}")
        model.load_state_dict(tensors, strict=True)
    except Exception:
        if converted:
            convert_to_float(model)
        if restore is not None:
            restore()
        raise
    if restore is not None:
        setattr(model, COMPACTED_FLAG, True)
    layers = []
    for e in manifest["tensors"]:
        if e[3] == "r":
            continue
        t = tensors[e[0]]
        bits = int(e[7]) if e[3] == "q" else 8 * t.element_size()
        layers.append(LayerReport(e[0], t.numel(), int(e[4]), bits, t.numel() * t.element_size(), int(e[6]), e[5]))
    return CompressionReport.of_file(path, "lightning-compress", layers, model)


def _snapshot(module: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    state = dict(module.__dict__, _parameters=dict(module._parameters), _buffers=dict(module._buffers))
    return module, state


def _resize_like(model: nn.Module, tensors: dict[str, Tensor]) -> Callable[[], None]:
    """Shrink the Linear/Conv/BatchNorm layers of a fresh model to a compacted file's sizes.

    Returns a function that puts the original layers back (the model is never left half-loaded).
    """
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    for name, module in model.named_modules():
        weight = tensors.get(f"{name}.weight" if name else "weight")
        if weight is None or not supported(module) or getattr(module, "weight", None) is None:
            continue
        have = tuple(module.weight.shape)
        want = tuple(weight.shape)
        if have == want or len(have) != len(want) or any(w > h for w, h in zip(want, have, strict=True)):
            continue
        saved.append(
            (module, dict(module.__dict__, _parameters=dict(module._parameters), _buffers=dict(module._buffers)))
        )
        quantizer = getattr(module, "weight_fake_quant", None)
        if quantizer is not None:
            saved.append(
                (
                    quantizer,
                    dict(
                        quantizer.__dict__, _parameters=dict(quantizer._parameters), _buffers=dict(quantizer._buffers)
                    ),
                )
            )
        out_keep = torch.arange(want[0])
        in_keep = torch.arange(want[1]) if len(want) > 1 and not is_depthwise(module) else None
        resize_module(module, out_keep, in_keep)

    def restore() -> None:
        for module, state in saved:
            module.__dict__.update(state)

    return restore


def _check_architecture(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    mine = {k: v for k, v in model.state_dict().items() if k in set(_plain([k]))}
    theirs = {k: tensors[k] for k in _plain(tensors)}
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = sorted(k for k in set(mine) & set(theirs) if tuple(mine[k].shape) != tuple(theirs[k].shape))
    dtypes = sorted(k for k in set(mine) & set(theirs) if mine[k].dtype != theirs[k].dtype)
    if missing or extra or shapes or dtypes:
        details = []
        for label, keys in (
            ("missing in the file", missing),
            ("unknown to the model", extra),
            ("shape differs", shapes),
            ("dtype differs", dtypes),
        ):
            if keys:
                details.append(f"{label}: {keys[:5]}")
        raise CompressedFileError(
            f"{path} was written for another architecture than {type(model).__name__}: " + "; ".join(details)
        )


def _convert_like(model: nn.Module, layers: dict[str, dict[str, Any]]) -> bool:
    """Convert the layers the file has as fake-quant layers (if the model does not have them yet)."""
    present = {name for name, _ in qat_modules(model)}
    missing = {name: cfg for name, cfg in layers.items() if name not in present}
    if not missing:
        return False
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, cfg in missing.items():
        groups.setdefault(tuple(sorted(cfg.items())), []).append(name)
    for key, names in groups.items():
        config = QuantConfig(**dict(key))
        convert_to_qat(model, config, include=names)
    return True
