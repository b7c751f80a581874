"""Hostile ``.lcz`` files with valid checksums: what an attacker can write, since a checksum is no signature."""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

from lightning_compress.export.container import CODEC_LZMA, FILTERS, FORMAT_VERSION, HEADER, MAGIC

FAST = [{"id": lzma.FILTER_LZMA2, "preset": 0, "lc": 0, "lp": 0, "pb": 0}]  # the reader decodes any preset


def compress(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=FAST)


def write(path: Path, payload: bytes, raw_len: int, version: int = FORMAT_VERSION) -> None:
    """A header that declares ``raw_len`` decompressed bytes, with a valid SHA-256, around ``payload``."""
    fields = HEADER.pack(MAGIC, version, CODEC_LZMA, 0, len(payload), raw_len, b"\0" * 32)[:-32]
    path.write_bytes(fields + hashlib.sha256(fields + payload).digest() + payload)


def raw_of(manifest: dict[str, Any], body: bytes) -> bytes:
    data = json.dumps(manifest).encode()
    return struct.pack("<I", len(data)) + data + body


def read(path: Path) -> tuple[dict[str, Any], bytes]:
    """The manifest and body of a genuine file (trusted: our own)."""
    data = path.read_bytes()
    raw = lzma.decompress(data[HEADER.size :], format=lzma.FORMAT_RAW, filters=FILTERS)
    (n,) = struct.unpack_from("<I", raw)
    return json.loads(raw[4 : 4 + n]), raw[4 + n :]


@lru_cache(maxsize=1)
def _zeros_block() -> bytes:
    return compress(bytes(64 << 20))[:-1]


def zeros_stream(nbytes: int) -> bytes:
    """Raw LZMA2 chunks (no end marker) that expand to ``nbytes`` zeros, from a few KiB."""
    full, rest = divmod(nbytes, 64 << 20)
    out = _zeros_block() * full if full else b""
    return out + (compress(bytes(rest))[:-1] if rest else b"")


def bomb(path: Path, prefix: bytes, expands_to: int, declared: int) -> None:
    """``prefix`` (e.g. a genuine manifest) followed by ``expands_to`` zeros, declaring ``declared`` bytes."""
    payload = compress(prefix)[:-1] + zeros_stream(expands_to) + b"\x00"
    write(path, payload, declared)
