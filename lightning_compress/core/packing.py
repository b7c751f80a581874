"""Compact encodings of sparse, low-bit tensors. Pure torch, vectorized.

* :func:`pack_bits` / :func:`unpack_bits`: a bool mask as 1 bit per entry.
* :func:`encode_gaps` / :func:`decode_gaps`: sorted positions as the gaps between them, one byte
  per gap below 255 and one extra 255-byte for every further 255 (gaps are small when the
  tensor is dense enough for a bitmask to lose; the file's entropy coder squeezes them further).
* :func:`pack_codes` / :func:`unpack_codes`: signed integer codes of 2, 4 or 8 bits, several per byte.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "code_container_bits",
    "decode_gaps",
    "encode_gaps",
    "pack_bits",
    "pack_codes",
    "stored_sparse",
    "unpack_bits",
    "unpack_codes",
]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Flattened bool mask -> uint8 bytes, little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(data: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a bool tensor."""
    if data.numel() * 8 < count:
        raise ValueError(f"bitmask of {data.numel()} bytes cannot hold {count} entries")
    bits = (data.reshape(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:count]


def encode_gaps(positions: Tensor) -> Tensor:
    """Strictly increasing int64 positions -> uint8 gap stream (first gap from -1)."""
    positions = positions.reshape(-1).to(torch.int64).cpu()
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(positions, prepend=torch.tensor([-1])) - 1  # >= 0
    extra = gaps // 255
    out = torch.full((int(gaps.numel() + extra.sum()),), 255, dtype=torch.uint8)
    ends = torch.cumsum(extra + 1, dim=0) - 1  # where each gap's final byte goes
    out[ends] = (gaps % 255).to(torch.uint8)
    return out


def decode_gaps(data: Tensor, count: int) -> Tensor:
    """Inverse of :func:`encode_gaps`; raises if the stream does not hold exactly ``count`` gaps."""
    data = data.reshape(-1).to(torch.int64)
    ends = (data != 255).nonzero().reshape(-1)
    if ends.numel() != count or (count and int(ends[-1]) != data.numel() - 1):
        raise ValueError(f"index stream holds {ends.numel()} positions, expected {count}")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    csum = torch.cumsum(data, dim=0)[ends]
    gaps = torch.diff(csum, prepend=torch.tensor([0]))
    return torch.cumsum(gaps + 1, dim=0) - 1


def code_container_bits(bits: int) -> int:
    """Storage width for ``bits``-wide codes: 2, 4 or 8."""
    if bits <= 2:
        return 2
    return 4 if bits <= 4 else 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Signed codes (each fits ``bits``) -> uint8 bytes, ``8 // container`` codes per byte."""
    width = code_container_bits(bits)
    flat = codes.reshape(-1).to(torch.int32).cpu()
    if width == 8:
        return flat.to(torch.int8).view(torch.uint8).clone()
    per_byte = 8 // width
    unsigned = (flat & ((1 << width) - 1)).to(torch.uint8)  # two's complement in `width` bits
    pad = (-unsigned.numel()) % per_byte
    if pad:
        unsigned = torch.cat([unsigned, torch.zeros(pad, dtype=torch.uint8)])
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return (unsigned.reshape(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``count`` signed codes as int8 (one byte per code: loading a layer's codes
    never costs more than the layer's element count in bytes)."""
    width = code_container_bits(bits)
    data = data.reshape(-1).cpu()
    if width == 8:
        if data.numel() < count:
            raise ValueError(f"code stream of {data.numel()} bytes cannot hold {count} codes")
        return data[:count].view(torch.int8).clone()
    per_byte = 8 // width
    if data.numel() * per_byte < count:
        raise ValueError(f"code stream of {data.numel()} bytes cannot hold {count} codes")
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    codes = ((data.reshape(-1, 1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:count].view(torch.int8)
    codes[codes >= 1 << (width - 1)] -= 1 << width  # two's complement in `width` bits
    return codes


def stored_sparse(tensor: Tensor) -> bool:
    """Whether the compressed format stores a floating-point tensor that is not quantized as positions and values:
    64 entries or more, under 60% of them nonzero (positions cost at most 1 bit per entry; values are saved only
    where nonzero)."""
    floating = tensor.is_floating_point() or tensor.is_complex()
    return floating and tensor.numel() >= 64 and float((tensor != 0).float().mean()) < 0.6
