"""Writing a compressed file: :func:`save_compressed` (the format: :mod:`.compressed`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.checks import check_module, check_output_path
from ..core.collectives import TorchDistributed
from ..core.compact import is_compacted
from ..core.heads import head_record
from ..core.packing import (
    code_container_bits,
    encode_gaps,
    pack_bits,
    pack_codes,
    stored_sparse,
)
from ..core.qat import FakeQuantizer, qat_modules, quantizers
from ..core.quant import BIAS_RANGE, dequantize, fake_quantize, quantize
from ..core.selection import stored_weight
from ..core.sharding import full, is_sharded, model_class_name
from ..core.wrappers import state_root, uncompiled
from .container import FORMAT_VERSION, write_container
from .records import (
    SECTIONS,
    TensorRecord,
    first_name,
    layer_settings,
    second_names,
)
from .report import CompressionReport, LayerReport, state_dict_bytes
from .state_entries import tensor_state

__all__ = ["save_compressed"]


class _Sections:
    def __init__(self) -> None:
        self.parts: dict[str, list[bytes]] = {name: [] for name in SECTIONS}

    def add(self, section: str, data: bytes) -> int:
        self.parts[section].append(data)
        return len(data)

    def sizes(self) -> list[int]:
        return [sum(len(p) for p in self.parts[name]) for name in SECTIONS]

    def joined(self) -> bytes:
        return b"".join(b"".join(self.parts[name]) for name in SECTIONS)


def _planes(t: Tensor) -> bytes:
    """A tensor's bytes one byte plane after the other (all first bytes, then all second bytes, ...).

    Floats of one tensor share their sign and exponent bytes, which then sit together for the entropy coder
    (format 4; about 7-10% off the floating-point data of small models: BatchNorm, biases, scales).
    """
    flat = t.detach().contiguous().cpu().reshape(-1)
    if flat.is_floating_point():  # -0.0 + 0.0 is +0.0: a zero is stored alike however a mask made it (FSDP2, DDP)
        flat = flat + 0
    return flat.view(torch.uint8).reshape(-1, flat.element_size()).t().contiguous().numpy().tobytes()


def _position_stream(mask: Tensor) -> tuple[str, Tensor]:
    """The smaller of a bitmask and a gap stream for the positions of ``mask``: ``(coding, bytes)``."""
    flat = mask.reshape(-1).cpu()
    bitmask = pack_bits(flat)
    gaps = encode_gaps(flat.nonzero().reshape(-1))
    return ("gaps", gaps) if gaps.numel() < bitmask.numel() else ("bitmask", bitmask)


def _positions(mask: Tensor, sections: _Sections) -> tuple[str, int]:
    coding, data = _position_stream(mask)
    return coding, sections.add("positions", data.numpy().tobytes())


def _quantized_weights(model: nn.Module) -> dict[str, tuple[FakeQuantizer, str]]:
    """``{weight name: (its quantizer, layer name)}`` for layers whose fake quantization is on.

    Two kinds of fake-quant layers keep their weights in float in the file, with a warning, so that it still
    reloads the model exactly:

    * a weight quantizer that never ran (the model reads the layer's weight without calling the layer, as
      ``transformers``' Mamba does with ``conv1d``) holds no scale: the model computes with the float weight;
    * a weight tied to a layer that is not quantized (one that stores it the other way round, as ``transformers``'
      Conv1D; tied layers stored alike share one quantizer, and their codes are stored once): the float layer reads
      the float values, and the quantized one recomputes its codes from them.
    """
    qat = dict(qat_modules(model))
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = stored_weight(module)  # a parametrization is not run (trial DH: spectral_norm's `_u` changed)
        if isinstance(weight, Tensor):
            owners.setdefault(id(weight), []).append((name, module))
        for attr, param in module.named_parameters(recurse=False):  # a module multiplying it under another name
            if attr != "weight":  # (trial FL: Reformer's tied head keeps the embedding's weight as `tensor`)
                owners.setdefault(id(param), []).append((f"{name}.{attr}" if name else attr, module))
    out, idle, tied = {}, [], {}
    for name, layer in qat.items():
        quantizer = layer.weight_fake_quant
        if not isinstance(quantizer, FakeQuantizer) or not quantizer.fake_quant_enabled:
            continue  # the layer itself under another name (a module registered twice) is no float use
        floats = [n for n, m in owners.get(id(layer.weight), []) if n not in qat and m is not layer]
        if floats:
            tied[name] = floats
        elif quantizer.initialized:  # a learned scale too reads its weight at its first forward (trial DI: one saved
            # before it held 1.0 and the file's weights were zero)
            out[f"{name}.weight"] = (quantizer, name)
        else:
            idle.append(name)
    if idle:
        warnings.warn(
            f"save_compressed: {idle[:5]}{' ...' if len(idle) > 5 else ''} are fake-quant layers whose forward never "
            "ran in training (a branch the data did not take, or the model reads their weights directly), so their "
            "weights have no scale and the model computes with them in float: the file stores them in float. `exclude` "
            "them from QAT to silence this.",
            UserWarning,
            stacklevel=4,  # save_compressed -> _save -> here
        )
    if tied:
        warnings.warn(
            f"save_compressed: {list(tied)[:5]} are quantized, but their weights are also used in float by "
            f"{[n for floats in tied.values() for n in floats][:5]} (tied weights): the file stores them in float, so "
            "that both uses reload exactly, and they take float size. Untie the weights to store codes (a tied "
            "layer stored the other way round, as transformers' Conv1D, cannot share the quantizer and stays float), "
            "or `exclude` the layer from QAT to silence this.",
            UserWarning,
            stacklevel=4,  # save_compressed -> _save -> here
        )
    return out


def _same_coding(first: tuple[FakeQuantizer, str] | None, second: tuple[FakeQuantizer, str] | None) -> bool:
    """Whether two entries of one tensor are stored alike: both in float, or both coded by one weight quantizer
    (layers tied to one weight share it)."""
    if first is None or second is None:
        return first is second
    return first[0] is second[0]


def _biases_on_grid(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """``{bias name: (layer name, grid)}`` for float32 biases the model puts on their accumulator's grid now."""
    out = {}
    for name, layer in qat_modules(model):
        grid = cast(Any, layer).bias_grid()
        bias = getattr(layer, "bias", None)
        if name and grid is not None and isinstance(bias, Tensor) and bias.dtype == torch.float32:
            out[f"{name}.bias"] = (name, grid.detach().cpu())  # a model that is one layer keeps its bias in float
    return out


def _bias_codes(bias: Tensor, grid: Tensor) -> Tensor | None:
    """The int32 codes of ``bias`` on ``grid``, if the reloaded bias (codes times grid) is what the layer adds
    now and stays so when fake-quantized again; ``None`` (store it as it is) otherwise."""
    zero = torch.zeros((), dtype=torch.int32)
    bias = bias.detach().cpu().float()
    codes = quantize(bias, grid, zero, *BIAS_RANGE, axis=0)
    values = dequantize(codes, grid, zero, axis=0)
    in_use = fake_quantize(bias, grid, zero, *BIAS_RANGE, axis=0)
    again = fake_quantize(values, grid, zero, *BIAS_RANGE, axis=0)
    return codes if torch.equal(values, in_use) and torch.equal(again, values) else None


def _qat_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: layer_settings(layer) for name, layer in qat_modules(model)}


def save_compressed(model: nn.Module, path: str | Path) -> CompressionReport:
    """Write ``model`` to ``path`` in the compressed format and report the sizes.

    Fake-quantized weights are stored as integer codes, sparse tensors as positions and values;
    the model itself is not changed. Load with :func:`load_compressed`.

    A model sharded by FSDP2 (``fully_shard``) is saved whole: call this on every process (its weights are
    gathered, so each process holds the whole model for a moment); process 0 writes the file, and every
    process gets the same report.
    """
    check_module(model, materialized=True)
    path = check_output_path(path)
    with uncompiled(state_root(model)) as plain:  # a wrapper's inner module (Fabric, torch.compile): plain names
        return _save(plain, path)


def _save(model: nn.Module, path: Path) -> CompressionReport:
    quantized = _quantized_weights(model)
    biases = _biases_on_grid(model)
    sections = _Sections()
    records: list[TensorRecord] = []
    layers: list[LayerReport] = []
    state = tensor_state(model, model.state_dict())
    _check_storable(state)
    sharded = any(is_sharded(t) for t in state.values())
    state = {name: full(tensor) for name, tensor in state.items()}  # under FSDP2: gathered on every process
    for qname, q in quantizers(model):  # learned scales are stored as the step size in use
        state[f"{qname}.scale"] = q.effective_scale().detach()
    _check_finite(model, state)
    stored: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}  # tied tensors: stored once
    registered_twice = second_names(model)
    for name, tensor in state.items():
        tensor = tensor.detach()
        head: dict[str, Any] = {"name": name, "dtype": str(tensor.dtype).split(".")[-1], "shape": tuple(tensor.shape)}
        first = first_name(name, registered_twice)
        if first is not None:  # a module's entries under its second name: those under its first
            records.append(TensorRecord(**head, kind="alias", of=first))
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in stored and _same_coding(quantized.get(name), quantized.get(stored[key])):
            records.append(TensorRecord(**head, kind="alias", of=stored[key]))  # tied: codes too (core/qat_ties.py)
            continue
        stored.setdefault(key, name)
        if name in quantized:
            quantizer, layer_name = quantized[name]
            qmin, qmax = quantizer.qrange
            axis = quantizer.channel_axis if quantizer.per_channel else None  # per channel or per group
            if quantizer.groups:
                codes = quantize(tensor, quantizer.expanded_scale(tensor.shape), quantizer.zero_point, qmin, qmax)
            else:
                codes = quantize(tensor, quantizer.effective_scale().detach(), quantizer.zero_point, qmin, qmax, axis)
            nonzero = codes != 0
            count = nonzero_codes = int(nonzero.sum())
            container = code_container_bits(quantizer.bits)
            coding, stream = _position_stream(nonzero)
            if stream.numel() + (count * container + 7) // 8 >= (codes.numel() * container + 7) // 8:
                nonzero = torch.ones_like(nonzero)  # dense codes are smaller than positions + nonzero codes
                count, coding, pos_bytes = codes.numel(), "dense", 0
            else:
                pos_bytes = sections.add("positions", stream.numpy().tobytes())
            code_bytes = sections.add(
                "codes", pack_codes(codes.reshape(-1)[nonzero.reshape(-1)], quantizer.bits).numpy().tobytes()
            )
            records.append(
                TensorRecord(
                    **head,
                    kind="quantized",
                    count=count,
                    coding=coding,
                    position_bytes=pos_bytes,
                    bits=quantizer.bits,
                    axis=axis,
                    qmin=qmin,
                    qmax=qmax,
                    quantizer=f"{layer_name}.weight_fake_quant.",
                )
            )
            after = pos_bytes + code_bytes + quantizer.scale.numel() * quantizer.scale.element_size()
            # the report counts zero codes whether the file stores them densely or not
            layers.append(_layer_report(name, tensor, nonzero_codes, quantizer.bits, after, coding))
        elif name in biases and (bias_codes := _bias_codes(tensor, biases[name][1])) is not None:
            sections.add("data", _planes(bias_codes))
            records.append(TensorRecord(**head, kind="bias", layer=biases[name][0]))
        elif stored_sparse(tensor):
            nonzero = tensor != 0
            count = int(nonzero.sum())
            coding, pos_bytes = _positions(nonzero, sections)
            value_bytes = sections.add("data", _planes(tensor.reshape(-1)[nonzero.reshape(-1)]))
            records.append(TensorRecord(**head, kind="sparse", count=count, coding=coding, position_bytes=pos_bytes))
            layers.append(
                _layer_report(name, tensor, count, 8 * tensor.element_size(), pos_bytes + value_bytes, coding)
            )
        else:
            sections.add("data", _planes(tensor))
            records.append(TensorRecord(**head, kind="raw"))
    manifest = {
        "format": "lightning-compress",
        "version": FORMAT_VERSION,
        "model": model_class_name(model),
        "qat_layers": _qat_layers(model),
        "compacted": is_compacted(model),
        "heads": head_record(model),
        "sections": sections.sizes(),
        "tensors": [r.to_json() for r in records],
    }
    if not sharded:
        write_container(path, manifest, sections.joined())
        return CompressionReport.of_file(path, "lightning-compress", layers, model)
    group = TorchDistributed()
    size = torch.zeros(1, dtype=torch.int64)
    if group.rank == 0:
        write_container(path, manifest, sections.joined())
        size[0] = path.stat().st_size
    size = group.all_reduce(size, "sum")  # the other processes learn the file's size
    return CompressionReport(
        path=str(path), format="lightning-compress", layers=layers, file_bytes=int(size.item()),
        baseline_bytes=state_dict_bytes(model),
    )  # fmt: skip


def _check_storable(state: dict[str, Any]) -> None:
    """Entries the file can hold: dense (strided) tensors. Anything else is named before a byte is written."""
    for name, value in state.items():
        if value.layout != torch.strided:
            raise TypeError(
                f"save_compressed stores dense tensors, but the state dict entry {name!r} is a {value.layout} "
                "tensor; register it dense (`.to_dense()`) or as a non-persistent buffer."
            )


def _check_finite(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Refuse weights or quantizer state that are not finite (a diverged fit), before a byte is written: the file would
    hold them, and loading it would call it corrupted (trial ED: a BERT whose float16 AdamW diverged was written "51x
    smaller"). Buffers outside the quantizers may hold infinities on purpose (attention masks)."""
    quantizer_prefixes = tuple(f"{name}." for name, _ in quantizers(model))
    checked = {name for name, _ in model.named_parameters()}
    bad = [
        name
        for name, tensor in state.items()
        if (name in checked or name.startswith(quantizer_prefixes))
        and tensor.is_floating_point()
        and not bool(tensor.isfinite().all())
    ]
    if bad:
        raise ValueError(
            f"save_compressed: {model_class_name(model)} holds NaN or infinite values in {bad[:5]}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ": the fit diverged (in float16, `precision='16-true'`, an optimizer's `eps=1e-8` rounds to 0). "
            "Nothing was written."
        )


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
