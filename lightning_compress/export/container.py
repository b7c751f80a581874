"""The byte container of a ``.lcz`` file: header, checksum, and LZMA streamed under a hard cap.

Layout (little endian)::

    b"LCZ\\x89" | u16 format version | u8 codec (1 = lzma) | u8 reserved
    | u64 payload length | u64 raw length | 32-byte SHA-256 of the header fields and the payload | payload

The payload is raw LZMA2 of ``u32 manifest length | manifest JSON | body``. A file is untrusted
input: :func:`read_container` never holds more than the caller's budget of decompressed bytes. It
checks the declared sizes first, then the checksum (streamed), then decompresses the manifest
alone (at most the caller's manifest budget) and lets the caller check it against the model, and
only then decompresses the body, at most as many bytes as the manifest accounts for. A file that
declares more than the budget is refused after its manifest, before its body: a file of another
model is then refused for how it differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "CompressedFileError", "read_container", "write_container"]

MAGIC = b"LCZ\x89"
FORMAT_VERSION = 5  # 3: tied tensors stored once (alias records), dense int codes, int4 group scales;
# 4: floating-point data stored byte plane by byte plane; 5: biases on their accumulator's grid as int32 codes
READABLE_VERSIONS = (1, 2, 3, 4, 5)
HEADER = struct.Struct("<4sHBBQQ32s")
CODEC_LZMA = 1
# raw LZMA2 (our header carries lengths and a checksum); lc=0: the numeric streams have little byte context.
# The dictionary is also the decoder's window, held in memory while reading: 8 MiB (format 1 used 64 MiB).
_DICT = {1: 64 << 20, 2: 8 << 20, 3: 8 << 20, 4: 8 << 20, 5: 8 << 20}
FILTERS = [
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": _DICT[4], "lc": 0, "lp": 0, "pb": 0}
]
_CHUNK = 1 << 20
_PREFIX = struct.Struct("<I")


class CompressedFileError(ValueError):
    """The file is not a readable lightning-compress file for this model."""


def write_container(path: Path, manifest: dict[str, Any], body: bytes) -> None:
    """Write ``manifest`` and ``body`` to ``path`` atomically (a temporary file, then a rename)."""
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    raw = _PREFIX.pack(len(manifest_bytes)) + manifest_bytes + body
    payload = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=FILTERS)
    fields = HEADER.pack(MAGIC, FORMAT_VERSION, CODEC_LZMA, 0, len(payload), len(raw), b"\0" * 32)[:-32]
    header = fields + hashlib.sha256(fields + payload).digest()  # the checksum covers the header too
    with replacing(path) as tmp:
        tmp.write_bytes(header + payload)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path`` to write, renamed to ``path`` when the block ends (removed if it fails):
    never a half-written file under the final name, and never a file of the user's (``<name>.tmp``) taken over.
    Created like any new file (the umask applies)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_container(
    path: Path,
    max_raw: int,
    max_manifest: int,
    body_size: Callable[[dict[str, Any], int], int],
    max_values: int | None = None,
) -> tuple[dict[str, Any], bytearray]:
    """Read ``path``: its manifest, then its body, never decompressing more than ``max_raw`` bytes.

    Args:
        path: the file.
        max_raw: the most decompressed bytes a file for this model can need (the caller derives it
            from the model); a file that declares more is refused before anything is decompressed.
        max_manifest: the longest manifest accepted.
        max_values: the most JSON values (commas and brackets) the manifest may hold, counted before it is parsed
            (``None``: not counted).
        body_size: checks the parsed manifest (given the file's format version) against the model
            and returns the exact body length it accounts for; raises :class:`CompressedFileError`.

    Raises:
        CompressedFileError: unreadable, damaged, or sizes that do not add up or exceed the caps.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the open until a writer came
            raise CompressedFileError(f"{path} is not a regular file.")
        size = info.st_size
        with path.open("rb") as f:
            header = f.read(HEADER.size)
            if len(header) < HEADER.size or header[:4] != MAGIC:
                raise CompressedFileError(f"{path} is not a lightning-compress file (bad magic or too short).")
            _, version, codec, _, payload_len, raw_len, digest = HEADER.unpack(header)
            if version not in READABLE_VERSIONS:
                raise CompressedFileError(
                    f"{path} has format version {version}; this lightning-compress reads versions "
                    f"{list(READABLE_VERSIONS)}."
                )
            if codec != CODEC_LZMA:
                raise CompressedFileError(f"{path} uses unknown codec {codec}.")
            if size - HEADER.size != payload_len:
                raise CompressedFileError(
                    f"{path} is truncated or padded: payload {size - HEADER.size} bytes, header says {payload_len}."
                )
            too_large = None  # said after the manifest, which names the tensors that differ (a trial: a genuine
            # file of a wider model, or of another dtype, read as a forged size)
            if raw_len > max_raw:
                too_large = f"declares {raw_len} decompressed bytes; a file for this model needs at most {max_raw}"
            elif payload_len > max_raw + max_raw // 64 + 65536:  # LZMA never expands data by that much
                too_large = f"has a {payload_len}-byte payload, too large for this model"
            _check_digest(f, header[: HEADER.size - 32], digest, path)
            f.seek(HEADER.size)
            stream = _CappedStream(f, raw_len, path, _decoder_filters(version, raw_len))
            try:
                (manifest_len,) = _PREFIX.unpack(stream.read(_PREFIX.size))
                if manifest_len > min(max_manifest, raw_len - _PREFIX.size):
                    raise CompressedFileError(f"{path} declares a {manifest_len}-byte manifest, more than allowed.")
                manifest = _parse(stream.read(manifest_len), path, max_values)
            except CompressedFileError:
                if too_large:  # no manifest to say more: the size is what is wrong
                    raise CompressedFileError(f"{path} {too_large}. Refused before decompressing.") from None
                raise
            expected = body_size(manifest, version)  # refuses a file of another model, saying how it differs
            if too_large:
                raise CompressedFileError(f"{path} {too_large}. Refused before decompressing its data.")
            if expected != raw_len - _PREFIX.size - manifest_len:
                raise CompressedFileError(
                    f"{path} is corrupted: the manifest accounts for {expected} bytes of data, the header for "
                    f"{raw_len - _PREFIX.size - manifest_len}."
                )
            body = stream.read(expected)
            stream.check_end()
    except OSError as err:
        raise CompressedFileError(f"cannot read {path}: {err}") from err
    return manifest, body


def _decoder_filters(version: int, raw_len: int) -> list[dict[str, Any]]:
    """A window as large as the writer's, but never larger than the data (no match reaches further back)."""
    window = min(_DICT[version], max(4096, 1 << max(0, raw_len - 1).bit_length()))
    return [{"id": lzma.FILTER_LZMA2, "dict_size": window, "lc": 0, "lp": 0, "pb": 0}]


def _check_digest(f: IO[bytes], fields: bytes, digest: bytes, path: Path) -> None:
    sha = hashlib.sha256(fields)
    while chunk := f.read(_CHUNK):
        sha.update(chunk)
    if sha.digest() != digest:
        raise CompressedFileError(f"{path} is corrupted: checksum mismatch.")


def _parse(data: bytes | bytearray, path: Path, max_values: int | None = None) -> dict[str, Any]:
    if max_values is not None:
        values = data.count(b",") + data.count(b"{") + data.count(b"[")
        if values > max_values:  # each one a Python object: refused before building them
            raise CompressedFileError(
                f"{path}: its manifest holds {values} JSON values; a file for this model holds at most {max_values}."
            )
    try:
        manifest = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON, and a 5,000-digit int
        raise CompressedFileError(f"{path} is corrupted: unreadable manifest.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "lightning-compress":
        raise CompressedFileError(f"{path}: unknown manifest format.")
    return manifest


class _CappedStream:
    """Decompresses on demand, in chunks, and never past ``limit`` bytes in all."""

    def __init__(self, f: IO[bytes], limit: int, path: Path, filters: list[dict[str, Any]]) -> None:
        self.f = f
        self.left = limit
        self.path = path
        self.decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
        self.exhausted = False  # the file has no more input (every call then makes no progress)

    @property
    def stuck(self) -> bool:
        return self.decompressor.eof or (self.exhausted and self.decompressor.needs_input)

    def _more(self, wanted: int) -> bytes:
        d = self.decompressor
        if self.stuck:
            return b""
        try:
            if d.needs_input:
                chunk = self.f.read(_CHUNK)
                self.exhausted = not chunk
                return d.decompress(chunk, max_length=wanted) if chunk else b""
            return d.decompress(b"", max_length=wanted)
        except lzma.LZMAError as err:
            raise CompressedFileError(f"{self.path} is corrupted: {err}") from err

    def read(self, n: int) -> bytearray:
        """Exactly ``n`` bytes into one preallocated buffer, or :class:`CompressedFileError`."""
        if n > self.left:
            raise CompressedFileError(f"{self.path} is corrupted: decompressed size mismatch.")
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            data = self._more(min(n - got, _CHUNK))  # small pieces: no second copy of the body
            if not data:
                if self.stuck:
                    raise CompressedFileError(f"{self.path} is corrupted: decompressed size mismatch (ends early).")
                continue
            view[got : got + len(data)] = data
            got += len(data)
        self.left -= n
        return out

    def check_end(self) -> None:
        """The stream must end exactly at the declared size: one more byte means a forged size."""
        while not self.stuck:
            if self._more(1):
                raise CompressedFileError(
                    f"{self.path} is corrupted: decompressed size mismatch (the data expands past its declared size)."
                )
        if not self.decompressor.eof:
            raise CompressedFileError(f"{self.path} is corrupted: the compressed stream does not end.")
        if self.decompressor.unused_data or self.f.read(1):
            raise CompressedFileError(f"{self.path} is corrupted: bytes follow the end of the compressed stream.")
