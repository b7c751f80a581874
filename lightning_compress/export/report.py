"""``CompressionReport``: what an export made of each layer, printable and a dict."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import Tensor, nn

from ..core.fake_quant import FakeQuantizer
from ..core.sharding import is_sharded

__all__ = ["CompressionReport", "LayerReport", "state_dict_bytes"]


@dataclass(frozen=True)
class LayerReport:
    """One compressed weight.

    Attributes:
        name: parameter name (``"features.0.weight"``).
        numel: entries.
        nonzero: entries stored (the rest are zero).
        bits: bits per stored value (32 for float).
        bytes_before: size as a dense tensor in its dtype.
        bytes_after: size of its encoding (positions, values, scales) before entropy coding.
        index_coding: ``"bitmask"``, ``"gaps"`` or ``"dense"``.
    """

    name: str
    numel: int
    nonzero: int
    bits: int
    bytes_before: int
    bytes_after: int
    index_coding: str

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer and total sizes of an exported model.

    Attributes:
        path: the file written or read.
        format: ``"lightning-compress"`` or ``"onnx"``.
        layers: one :class:`LayerReport` per compressed weight.
        file_bytes: size of the file on disk.
        baseline_bytes: size of ``torch.save(model.state_dict())`` of the same model in float (without the fake
            quantizers' scales and ranges, and without :attr:`unused`).
        unused: the state dict's entries left out of the baseline: those of modules the exported graph's forward
            does not read (an ONNX graph of a GAN's generator holds no discriminator; a trial's read 1.8x smaller
            for a float graph).
    """

    path: str
    format: str
    layers: list[LayerReport] = field(default_factory=list)
    file_bytes: int = 0
    baseline_bytes: int = 0
    unused: list[str] = field(default_factory=list)

    @classmethod
    def of_file(
        cls, path: Path, format: str, layers: list[LayerReport], model: nn.Module, unused: list[str] | None = None
    ) -> CompressionReport:
        """The report of ``path`` as it is on disk, against ``torch.save(model.state_dict())`` of the float model,
        without the entries named in ``unused``."""
        return cls(
            path=str(path),
            format=format,
            layers=layers,
            file_bytes=path.stat().st_size,
            baseline_bytes=state_dict_bytes(model, leave_out=unused or ()),
            unused=list(unused or []),
        )

    @property
    def compression_ratio(self) -> float:
        """``baseline_bytes / file_bytes``."""
        return self.baseline_bytes / self.file_bytes if self.file_bytes else 0.0

    @property
    def sparsity(self) -> float:
        """Zero fraction over the tensors the file stores compressed (its :attr:`layers`: quantized weights, and any
        tensor of 64 or more entries stored as positions and values, an all-zero bias too); a weight stored as it is
        is not among them. ``sparsity(model)`` gives the zero fraction of the weights pruning selects."""
        total = sum(layer.numel for layer in self.layers)
        return 1.0 - sum(layer.nonzero for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain Python values (JSON-serializable)."""
        out = asdict(self)
        for layer, entry in zip(self.layers, out["layers"], strict=True):
            entry["sparsity"] = layer.sparsity
        out["compression_ratio"] = self.compression_ratio
        out["sparsity"] = self.sparsity
        return out

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [23])  # the total's label
        lines = [
            f"{self.format} file {self.path}",
            f"{'layer':<{width}}  {'sparsity':>8}  {'bits':>4}  {'index':>7}  {'before':>12}  {'after':>12}",
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {100 * layer.sparsity:>7.1f}%  {layer.bits:>4}  {layer.index_coding:>7}  "
                f"{_size(layer.bytes_before):>12}  {_size(layer.bytes_after):>12}"
            )
        before = sum(layer.bytes_before for layer in self.layers)
        after = sum(layer.bytes_after for layer in self.layers)
        if self.layers:  # trial DB: a file without sparse or quantized layers printed a total of nothing
            lines.append(
                f"{'total of the rows above':<{width}}  {100 * self.sparsity:>7.1f}%  {'':>4}  {'':>7}  "
                f"{_size(before):>12}  {_size(after):>12}"
            )
        else:
            lines.append("(no weight is stored sparse or quantized)")
        ratio = self.compression_ratio
        # a ratio under 1.05 reads "1.0x smaller" or "0.9x smaller" for a file as large or larger (an ONNX export)
        relation = f"{ratio:.1f}x smaller" if ratio >= 1.05 else f"{1 / ratio:.2f}x its size" if ratio else "no file"
        sizes = f"file {_size(self.file_bytes)} vs torch.save(state_dict) {_size(self.baseline_bytes)}"
        lines.append(f"{sizes}: {relation}")
        if self.unused:
            shown = self.unused if len(self.unused) <= 4 else [*self.unused[:4], "..."]
            entries = "entry" if len(self.unused) == 1 else f"{len(self.unused)} entries"
            lines.append(f"(the state dict without the {entries} the forward does not read: {shown})")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts: sizing a ``torch.save`` costs no copy of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size


def _saved_bytes(state: dict[str, Any]) -> int:
    counter = _ByteCounter()
    torch.save(state, cast(IO[bytes], counter))
    return counter.count


def state_dict_bytes(model: nn.Module, leave_out: Iterable[str] = ()) -> int:
    """Size of ``torch.save(model.state_dict())`` of the float model, without the entries named in ``leave_out``:
    the baseline the ratio is computed against.
    The fake quantizers' scales, ranges and flags are left out: they are not in the model a user starts from (a
    trial: with them, a 20k-parameter Qwen2's file read 6.2x smaller than a float model it is 4.5x smaller than).
    The archive is named as a stream's (``archive/``): a file's is named after the file, a few bytes per tensor more
    or less."""
    quantizer_tensors = {
        id(t) for m in model.modules() if isinstance(m, FakeQuantizer) for t in [*m.parameters(), *m.buffers()]
    }
    state = model.state_dict(keep_vars=True)  # with its `_metadata`, as `torch.save` writes it (a trial: 1.5-3% off)
    left_out = set(leave_out)
    for key in [key for key, tensor in state.items() if id(tensor) in quantizer_tensors or key in left_out]:
        del state[key]
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # the quantizers' entries too (trial BX: 3.9% over the float model's on a Swinv2)
        names = [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer)]
        for key in [k for k in metadata if any(k == n or k.startswith(f"{n}.") for n in names)]:
            del metadata[key]
    # a DTensor counts whole (trial BU: FSDP2's baseline was one process's shards, a ratio of 2.72x for 5.30x): saved
    # as a one-element storage of its shape (the same header and record; alignment up to 63 bytes apart), plus the
    # rest of its data
    whole = {key: tensor for key, tensor in state.items() if is_sharded(tensor)}
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            continue  # a module's extra state (nequip's metrics: a dict), saved as it is
        state[key] = tensor.detach() if key not in whole else torch.zeros(1, dtype=tensor.dtype).expand(tensor.shape)
    rest = sum((t.numel() - 1) * t.element_size() for t in whole.values() if t.numel())
    return _saved_bytes(state) + rest
