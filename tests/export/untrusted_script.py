"""Run by ``test_untrusted.py`` in its own process: hostile files drawn by hypothesis, the peak RSS of each load.

Linux and glibc only (``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs`` resets the peak;
``malloc_trim``; the test sets ``MALLOC_MMAP_THRESHOLD_`` so large buffers are mapped and unmapped). Prints one
line per measured load; exits non-zero (hypothesis' falsifying example) when a load is not refused or
costs more than twice the model plus a fixed allowance for the allocator.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress import (
    CompressedFileError,
    QuantConfig,
    convert_to_qat,
    load_compressed,
    prune_,
    save_compressed,
)
from lightning_compress.core.qat import qat_modules, quantizers
from lightning_compress.export.records import max_manifest_bytes, max_raw_bytes
from tests.export import forge

SLACK = 16 << 20  # the LZMA window (8 MiB) and allocator noise around one load


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def extra_memory(load: Callable[[], object]) -> int:
    """Peak RSS during ``load()`` above the RSS before it (freed heap handed back first, so reuse hides nothing)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    load()
    return status("VmHWM") - before


def network() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 10)
    )


def quantized(model: nn.Module, config: QuantConfig, enable: bool = True) -> nn.Module:
    """``model`` fake-quantized with ``config`` (only observing, unless ``enable``), its ranges observed on one
    batch, in eval mode."""
    convert_to_qat(model, config)
    for _, q in quantizers(model):
        q.observer_enabled = True
    with torch.no_grad():
        model.train()(torch.randn(64, 1024, dtype=next(model.parameters()).dtype))
    for _, q in quantizers(model):
        q.fake_quant_enabled = enable
    return model.eval()


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    model_bytes = sum(t.numel() * t.element_size() for t in network().state_dict().values())
    bound = 2 * model_bytes + SLACK

    # genuine files: dense float (constant weights: stored raw like any dense tensor, compressed fast), and
    # pruned + int8 QAT
    dense = network()
    with torch.no_grad():
        for p in dense.parameters():
            p.fill_(0.5)
    save_compressed(dense, work / "dense.lcz")
    compressed = network()
    prune_(compressed, 0.9)
    save_compressed(quantized(compressed, QuantConfig(8, 8)), work / "qat.lcz")
    # dense int8 codes: every weight's code dequantized (it took 6.5x the model when whole layers were expanded)
    save_compressed(quantized(network(), QuantConfig(8, 8, quantize_bias=True)), work / "dense_qat.lcz")
    # bfloat16 and int4 groups of 32: the codes are unpacked, scaled and rounded to the model's dtype a block at a
    # time (whole layers as int32 codes, float32 values and group scales expanded to every element: 3.7-7.4x)
    save_compressed(quantized(network().bfloat16(), QuantConfig(8, None)), work / "bf16_qat.lcz")
    save_compressed(quantized(network(), QuantConfig(4, None, group_size=32)), work / "int4.lcz")
    save_compressed(quantized(network().bfloat16(), QuantConfig(4, None, group_size=32)), work / "bf16_int4.lcz")
    # groups of 2 (trial CE): as many float16 scales as half the weights, checked a block at a time (a whole float32
    # copy of them took the load to 3.5x the model)
    save_compressed(quantized(network(), QuantConfig(8, None, group_size=2)), work / "int8_g2.lcz")
    # the same, observed but not yet fake-quantized (trial CU): float weights beside a group scale per two of them, a
    # model half again as large once loaded (float16 scales); a view of the body held it whole to the end (2.9x)
    save_compressed(quantized(network(), QuantConfig(4, None, group_size=2), enable=False), work / "g2_float.lcz")
    save_compressed(
        quantized(network().bfloat16(), QuantConfig(4, None, group_size=2), enable=False), work / "bf16_g2_float.lcz"
    )
    genuine = ("dense", "qat", "dense_qat", "bf16_qat", "int4", "bf16_int4", "int8_g2", "g2_float", "bf16_g2_float")
    for name in genuine:
        fresh = network().bfloat16() if name.startswith("bf16") else network()
        extra = extra_memory(lambda name=name, fresh=fresh: load_compressed(fresh, work / f"{name}.lcz"))
        size = sum(t.numel() * t.element_size() for t in fresh.state_dict().values())  # as loaded: its quantizers too
        del fresh
        mib = f"+{extra / 2**20:.1f} MiB (model {size / 2**20:.1f} MiB, bound {(2 * size + SLACK) / 2**20:.1f})"
        print(f"genuine {name}: {mib}")
        assert extra <= 2 * size + SLACK, (name, extra, size)

    manifest, body = forge.read(work / "qat.lcz")
    prefix = forge.raw_of(manifest, b"")
    max_raw = max_raw_bytes(network())
    torch.manual_seed(1)
    snapshot = copy.deepcopy(network().state_dict())
    path = work / "hostile.lcz"
    refusals = []

    def forged(m: dict, b: bytes = body) -> None:
        raw = forge.raw_of(m, b)
        forge.write(path, forge.compress(raw), len(raw))

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(KINDS), data=st.data())
    def hostile(kind: str, data: st.DataObject) -> None:
        m = copy.deepcopy(manifest)
        records = m["tensors"]
        entry = records[data.draw(st.integers(0, len(records) - 1))]
        huge = st.integers(-(2**62), 2**62)
        if kind == "bomb after a genuine manifest":
            declared = len(prefix) + data.draw(st.sampled_from([len(body), 16, max_raw - len(prefix)]))
            forge.bomb(path, prefix, data.draw(st.integers(1 << 26, 1 << 31)), declared)
        elif kind == "bomb with a small declared size":
            forge.bomb(path, b"", data.draw(st.integers(1 << 26, 1 << 31)), data.draw(st.integers(0, 1 << 20)))
        elif kind == "declared size":
            forge.write(path, forge.compress(prefix + body), data.draw(st.integers(max_raw + 1, 2**64 - 1)))
        elif kind == "shape":
            entry["shape"] = data.draw(st.lists(huge, min_size=0, max_size=10))
            assume(entry["shape"] != records_of(manifest)[entry["name"]]["shape"])
            forged(m)
        elif kind == "count":
            entry["count"] = data.draw(huge)
            assume(entry["count"] != records_of(manifest)[entry["name"]].get("count"))
            entry.setdefault("coding", "gaps")
            entry["kind"] = "sparse" if entry["kind"] == "raw" else entry["kind"]
            forged(m)
        elif kind == "index stream":
            entry["position_bytes"] = data.draw(huge)
            assume(entry["position_bytes"] != records_of(manifest)[entry["name"]].get("position_bytes"))
            forged(m)
        elif kind == "sections":
            m["sections"] = data.draw(st.lists(huge, min_size=3, max_size=3))
            assume(m["sections"] != manifest["sections"])
            forged(m)
        elif kind == "quantizer buffer":
            layer = data.draw(st.sampled_from(["0", "2", "4", "5"]))
            shape = data.draw(st.lists(st.integers(2**20, 2**40), min_size=1, max_size=2))
            name = f"{layer}.weight_fake_quant.min_val"
            records.append({"name": name, "dtype": "float32", "shape": shape, "kind": "raw"})
            m["sections"][2] += 4
            forged(m, body + bytes(4))
        else:  # manifest length
            raw = data.draw(st.integers(1 << 20, 2**32 - 1)).to_bytes(4, "little") + b"{}"
            forge.write(path, forge.compress(raw), len(raw))

        torch.manual_seed(1)
        target = network()

        def load() -> None:
            try:
                load_compressed(target, path)
            except CompressedFileError as err:
                refusals.append(str(err))
            else:
                raise AssertionError(f"{kind}: a hostile file loaded")

        extra = extra_memory(load)
        assert extra <= bound, (kind, extra, bound)
        assert not qat_modules(target)
        assert all(torch.equal(snapshot[k], v) for k, v in target.state_dict().items()), kind
        print(f"refused ({kind}): +{extra / 2**20:.1f} MiB: {refusals[-1][-90:]}")

    hostile()
    print(f"{len(refusals)} hostile files refused within {bound / 2**20:.1f} MiB")
    many_small_layers(work)


def many_small_layers(work: Path) -> None:
    """A trial: for a model of 1,000 tiny layers (23 KiB) a 2 KiB file whose manifest was its whole allowance of
    ``{},{},...`` cost +381 MiB to refuse (the manifest was parsed before anything was counted): the JSON values are
    counted first now, and the allowance follows the model's names."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(1000)])
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    path = work / "values.lcz"
    head, tail = b'{"format": "lightning-compress", "version": 5, "tensors": [', b"{}]}"
    manifest = head + b"{}," * ((max_manifest_bytes(model) - len(head) - len(tail)) // 3) + tail
    raw = len(manifest).to_bytes(4, "little") + manifest
    forge.write(path, forge.compress(raw), len(raw))
    failures = []

    def load() -> None:
        try:
            load_compressed(model, path)
        except CompressedFileError as err:
            failures.append(str(err))

    extra = extra_memory(load)
    assert failures and "JSON values" in failures[0], failures
    assert extra <= 2 * size + SLACK, (extra, size)
    print(f"refused (a manifest of empty objects for 1,000 tiny layers): +{extra / 2**20:.1f} MiB: {failures[0][-90:]}")


def records_of(manifest: dict) -> dict[str, dict]:
    return {r["name"]: r for r in manifest["tensors"]}


KINDS = [
    "bomb after a genuine manifest",
    "bomb with a small declared size",
    "declared size",
    "shape",
    "count",
    "index stream",
    "sections",
    "quantizer buffer",
    "manifest length",
]

if __name__ == "__main__":
    main()
    sys.exit(0)
