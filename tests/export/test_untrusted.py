"""Untrusted ``.lcz`` files: forged sizes are refused before anything large is allocated.

Every file here has a valid SHA-256 (anyone can compute one). The memory bound itself is measured
in a subprocess (``untrusted_script.py``), where the peak RSS of each load can be read alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress import CompressedFileError, QuantConfig, load_compressed, save_compressed
from lightning_compress.core.qat import qat_modules
from tests.conftest import child_env
from tests.export import forge
from tests.export.helpers import Net, compressed_net, inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcz") / "m.lcz"
    save_compressed(compressed_net(), path)
    return forge.read(path)


def refused(path: Path, match: str) -> None:
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(model, path)
    assert not qat_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def record(manifest, name):
    return next(r for r in manifest["tensors"] if r["name"] == name)


def test_a_decompression_bomb_after_a_genuine_manifest_is_cut_at_the_declared_size(tmp_path, genuine):
    manifest, body = genuine
    prefix = forge.raw_of(manifest, b"")
    forge.bomb(tmp_path / "b.lcz", prefix, expands_to=1 << 30, declared=len(prefix) + len(body))
    refused(tmp_path / "b.lcz", "expands past its declared size")


def test_a_bomb_that_declares_a_tiny_size_is_refused(tmp_path):
    forge.bomb(tmp_path / "b.lcz", b"", expands_to=1 << 30, declared=16)
    refused(tmp_path / "b.lcz", "unreadable manifest|size mismatch")


def test_a_declared_size_larger_than_the_model_is_refused_before_decompressing(tmp_path):
    forge.write(tmp_path / "d.lcz", forge.compress(b"\0" * 64), raw_len=1 << 40)
    refused(tmp_path / "d.lcz", "declares 1099511627776 decompressed bytes")


def test_a_huge_manifest_length_is_refused(tmp_path):
    raw = (2**31).to_bytes(4, "little") + b"{}"
    forge.write(tmp_path / "m.lcz", forge.compress(raw), raw_len=len(raw))
    refused(tmp_path / "m.lcz", "manifest, more than allowed")


def test_aliases_are_checked_in_linear_time(tmp_path):
    """A trial: a 9 KB file of 12,000 quantizer-buffer records and 2,000 aliases took 20.7 s to refuse (each alias
    looked its target up with `list.index`)."""
    import time

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(1000)])
    buffers = {"scale": "float32", "zero_point": "int32", "shift": "int32", "min_val": "float32",
               "max_val": "float32", "state": "int32"}  # fmt: skip
    records = [
        {"name": f"{i}.{role}_fake_quant.{buffer}", "dtype": dtype, "shape": [], "kind": "raw"}
        for i in range(1000)
        for role in ("weight", "input")
        for buffer, dtype in buffers.items()
    ]
    body = bytes(4 * len(records) + 24)
    records += [{"name": "0.weight", "dtype": "float32", "shape": [2, 2], "kind": "raw"},
                {"name": "0.bias", "dtype": "float32", "shape": [2], "kind": "raw"}]  # fmt: skip
    for i in range(1, 1000):
        records.append({"name": f"{i}.weight", "dtype": "float32", "shape": [2, 2], "kind": "alias", "of": "0.weight"})
        records.append({"name": f"{i}.bias", "dtype": "float32", "shape": [2], "kind": "alias", "of": "0.bias"})
    manifest = {"format": "lightning-compress", "version": 5, "model": "Sequential", "qat_layers": {},
                "compacted": False, "heads": {}, "sections": [0, 0, len(body)], "tensors": records}  # fmt: skip
    path = forged(tmp_path, manifest, body)
    start = time.perf_counter()
    with pytest.raises(CompressedFileError):
        load_compressed(model, path)
    assert time.perf_counter() - start < 5.0  # 20 s before; well under a second now


def forged(tmp_path: Path, manifest, body: bytes) -> Path:
    path = tmp_path / "f.lcz"
    raw = forge.raw_of(manifest, body)
    forge.write(path, forge.compress(raw), len(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: record(m, "fc1.weight").update(shape=[2**31, 2**31]), r"shape differs: \['fc1.weight'\]"),
        (lambda m: record(m, "fc1.weight").update(shape=[-1, 512]), "bad shape"),
        (lambda m: record(m, "fc1.weight").update(shape=[2] * 9), "bad shape"),
        (lambda m: record(m, "fc1.weight").update(count=10**9), "stored entries for 32768 elements"),
        (lambda m: record(m, "fc1.weight").update(count=-5), "stored entries"),
        (lambda m: record(m, "fc1.weight").update(position_bytes=10**9), "index stream of"),
        (lambda m: record(m, "fc1.weight").update(coding="zip"), "unknown index coding"),
        (lambda m: record(m, "fc1.weight").update(dtype="float64"), r"dtype differs: \['fc1.weight'\]"),
        (lambda m: record(m, "fc1.weight").update(dtype="os.system"), "unknown dtype"),
        (lambda m: record(m, "fc1.weight").update(bits=16), "outside 2..8"),
        (lambda m: record(m, "fc1.weight").update(axis=0.0), r"bad axis 0\.0"),  # trial DC: a TypeError escaped
        (lambda m: record(m, "fc1.weight").update(axis=False), r"bad axis False"),
        (lambda m: record(m, "fc1.weight").update(kind="pickle"), "bad tensor record"),
        (lambda m: m["tensors"].append(dict(record(m, "fc2.bias"))), "stores a tensor twice"),
        (lambda m: m["tensors"].append({**record(m, "fc2.bias"), "name": "evil"}), "unknown to the model"),
        (
            lambda m: m["tensors"].append(
                {"name": "fc1.weight_fake_quant.min_val", "dtype": "float32", "shape": [10**8], "kind": "raw"}
            ),
            r"shape differs: \['fc1.weight_fake_quant.min_val'\]",
        ),
        (  # a [N, 1] zero point broadcast against the codes: N x count before any refusal (4 GB from 35 KB)
            lambda m: m["tensors"].append(
                {"name": "fc1.weight_fake_quant.zero_point", "dtype": "int32", "shape": [4096, 1], "kind": "raw"}
            ),
            r"shape differs: \['fc1.weight_fake_quant.zero_point'\]",
        ),
        (  # a 1-byte dtype torch cannot copy: load_state_dict failed after writing other tensors in place
            lambda m: record(m, "fc2.input_fake_quant.state").update(dtype="bits8"),
            r"dtype differs: \['fc2.input_fake_quant.state'\]",
        ),
        (  # a scale stored as an alias was looked up before aliases are filled in: a bare KeyError
            lambda m: record(m, "fc2.weight_fake_quant.scale").update(kind="alias", of="fc1.input_fake_quant.scale"),
            r"not stored whole: \['fc2.weight_fake_quant.scale'\]",
        ),
        (lambda m: m.update(sections=[0, 0, 10**12]), "section sizes do not match"),
        (lambda m: m.update(compacted="yes"), "bad `compacted` flag"),
        (  # session 19 left it: accepted, and it set nothing
            lambda m: m.update(heads={"fc1": {"num_heads": 2}}),
            "holds head counts but no compacted model",
        ),
        (lambda m: m["qat_layers"].update(bn={"weight_bits": 8}), "'bn', which is not a Linear/Conv"),
        (lambda m: m["qat_layers"]["fc1"].update(weight_bits=64), "bad quantization settings for 'fc1'"),
        (  # trial AL: settings and range said 6 bits, and the 8-bit codes loaded off the layer's grid
            lambda m: (
                m["qat_layers"]["fc1"].update(weight_bits=6),
                record(m, "fc1.weight").update(bits=6, qmin=-32, qmax=31),
            ),
            r"fc1.weight: codes outside its integer range -32..31 \(-\d+..\d+ in rows 0..",
        ),
        (lambda m: m["qat_layers"]["fc1"].update(evil=1), "bad quantization settings for 'fc1'"),
        (  # trial CU: quantizer buffers of layers the file left float filled the allowance, refused only once decoded
            lambda m: m["qat_layers"].pop("fc2"),
            r"quantizer state of a layer the file does not quantize: \['fc2.input_fake_quant.max_val'",
        ),
        (  # per-channel settings: one scale per output channel, not the group allowance of one per two weights
            lambda m: record(m, "fc1.weight_fake_quant.scale").update(
                shape=[math.prod(record(m, "fc1.weight")["shape"]) // 2]
            ),
            r"shape differs: \['fc1.weight_fake_quant.scale'\]",
        ),
    ],
)
def test_every_size_in_the_manifest_is_checked_against_the_model(tmp_path, genuine, edit, match):
    manifest, body = copy.deepcopy(genuine[0]), genuine[1]
    edit(manifest)
    refused(forged(tmp_path, manifest, body), match)


def test_names_from_the_file_are_quoted_escaped_and_cut_in_messages(tmp_path, genuine):
    """Trial CU: a forged name went into the message raw: a lone surrogate broke `print(err)`, a newline forged a log
    line, and a 60,000-character name made a 60 KB message."""
    manifest, body = copy.deepcopy(genuine[0]), genuine[1]
    manifest["tensors"].append({"name": "\ud800 ok\nINFO " + "x" * 60_000, "dtype": "float32", "shape": [-1]})
    manifest["tensors"][-1]["kind"] = "raw"
    with pytest.raises(CompressedFileError) as err:
        load_compressed(Net(), forged(tmp_path, manifest, body))
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    assert r"'\ud800 ok\nINFO xxx" in message and "(+59890 characters)" in message
    message.encode("utf-8")  # printable anywhere


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["qat_layers"]["fc1"].update({"x\nINFO: file verified OK" + "y" * 30_000: 1}),
        lambda m: m.update(compacted=True, heads={"\nINFO " + "z" * 50_000: {"num_heads": 1}}),
        lambda m: record(m, "fc1.weight").update(count="9\n" * 25_000),
        lambda m: m.update(compacted="\n" * 50_000),
        lambda m: m.update(version="v\n" * 25_000),
    ],
)
def test_every_refusal_is_one_bounded_line_whatever_the_file_says(tmp_path, genuine, edit):
    """Trial CV: a settings key, a head-count name and values went into messages raw or whole (a forged log line,
    messages of 30-50 KB)."""
    manifest, body = copy.deepcopy(genuine[0]), genuine[1]
    edit(manifest)
    with pytest.raises(CompressedFileError) as err:
        load_compressed(Net(), forged(tmp_path, manifest, body))
    message = str(err.value)
    assert "\n" not in message and len(message) <= 2000, message[:300]


def test_a_file_of_a_wider_model_is_refused_for_its_shapes_not_its_size(tmp_path):
    """Trial CU: a genuine file of a wider model, or of a float64 copy, read as a forged size ("declares N
    decompressed bytes"); the manifest, read first, says which tensors differ. Nothing past it is decompressed."""
    wide = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    save_compressed(wide, tmp_path / "wide.lcz")
    save_compressed(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double(), tmp_path / "f64.lcz")
    narrow = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(CompressedFileError, match=r"another architecture than Sequential: shape differs: \['0.bias'"):
        load_compressed(narrow, tmp_path / "wide.lcz")
    with pytest.raises(CompressedFileError, match=r"holds torch.float64 tensors where Sequential has torch.float32"):
        load_compressed(narrow, tmp_path / "f64.lcz")
    forge.write(tmp_path / "zeros.lcz", forge.compress(b"\0" * 64), raw_len=1 << 40)  # no manifest: the size is said
    with pytest.raises(CompressedFileError, match="declares 1099511627776 decompressed bytes"):
        load_compressed(narrow, tmp_path / "zeros.lcz")


def test_a_manifest_number_too_long_for_python_is_refused(tmp_path, genuine):
    manifest, body = genuine
    text = json.dumps(manifest)[:-1] + ', "x": ' + "9" * 5000 + "}"  # int() refuses over 4,300 digits
    raw = struct.pack("<I", len(text)) + text.encode() + body
    forge.write(tmp_path / "n.lcz", forge.compress(raw), len(raw))
    refused(tmp_path / "n.lcz", "unreadable manifest")


def test_a_file_that_names_the_root_module_as_a_quantized_layer_is_refused(tmp_path):
    """Converting the root module matches no module: a plain ValueError escaped instead of ours."""
    save_compressed(torch.nn.Linear(8, 4), tmp_path / "q.lcz")
    manifest, body = forge.read(tmp_path / "q.lcz")
    manifest["qat_layers"] = {"": {"weight_bits": 8, "activation_bits": 8}}
    bare = torch.nn.Linear(8, 4)
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(CompressedFileError, match="bad quantization settings: `include` pattern ''"):
        load_compressed(bare, forged(tmp_path, manifest, body))
    assert type(bare) is torch.nn.Linear and all(torch.equal(before[k], v) for k, v in bare.state_dict().items())


def test_a_compacted_file_may_not_grow_a_layer(tmp_path, genuine):
    manifest, body = copy.deepcopy(genuine[0]), genuine[1]
    manifest["compacted"] = True
    record(manifest, "fc2.bias").update(shape=[11])
    refused(forged(tmp_path, manifest, body), r"shape differs: \['fc2.bias'\]")
    record(manifest, "fc2.bias").update(shape=[0])  # trial AL: a layer of no channels loaded, its forward failed
    refused(forged(tmp_path, manifest, body), r"shape differs: \['fc2.bias'\]")


def test_an_index_stream_that_points_outside_the_tensor(tmp_path, genuine):
    manifest, body = genuine
    entries = manifest["tensors"]
    entry = record(manifest, "fc1.weight")
    assert entry["coding"] == "gaps"
    length, count = entry["position_bytes"], entry["count"]
    # same length and count as the genuine stream, so every size adds up, but the gaps run past the tensor
    stream = b"\xff" * (length - count) + b"\xfe" * count
    start = sum(r.get("position_bytes", 0) for r in entries[: entries.index(entry)])
    body = body[:start] + stream + body[start + length :]
    refused(forged(tmp_path, manifest, body), "position outside the tensor")


def test_format_1_files_still_load():
    fresh = Net()
    load_compressed(fresh, Path(__file__).parent / "data" / "format_v1.lcz")
    expected = compressed_net(0.9)
    torch.testing.assert_close(fresh.eval()(inputs()), expected(inputs()), atol=1e-6, rtol=0)


def test_loading_any_file_costs_at_most_twice_the_model_in_memory():
    """Hypothesis draws bombs, huge shapes and inconsistent counts; the peak RSS of each load is read alone."""
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "untrusted_script.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "refused" in result.stdout and "genuine" in result.stdout


def test_a_refused_compacted_file_leaves_the_fresh_model_at_its_sizes(tmp_path):
    """The reader shrinks a fresh model to a compacted file's sizes; a refusal after that puts every layer back."""
    from lightning_compress import QuantConfig, compact, convert_to_qat, prune_
    from lightning_compress.core.qat import quantizers

    torch.manual_seed(0)
    small = Net().eval()
    prune_(small, 0.5, granularity="channel", example_inputs=inputs(4))
    compact(small, inputs(4))
    convert_to_qat(small, QuantConfig(8, 8), include=["fc1"])
    for _, q in quantizers(small):
        q.observer_enabled = True
    small.train()(inputs())
    for _, q in quantizers(small):
        q.fake_quant_enabled = True
    save_compressed(small.eval(), tmp_path / "c.lcz")
    assert load_compressed(Net(), tmp_path / "c.lcz")  # genuine: loads into a fresh, uncompacted Net
    manifest, body = forge.read(tmp_path / "c.lcz")
    assert manifest["compacted"] and small.conv.out_channels < 8
    manifest["qat_layers"]["fc2"] = manifest["qat_layers"]["fc1"]  # converts fc2, whose quantizers the file lacks
    refused(forged(tmp_path, manifest, body), r"another architecture than Net: \['fc2.input_fake_quant")


def test_format_2_files_still_load():
    """Written by the code at commit 95a3c57 (format 2): ``save_compressed(compressed_net(0.9, QuantConfig(4, 8)))``."""
    from lightning_compress import QuantConfig

    fresh = Net()
    load_compressed(fresh, Path(__file__).parent / "data" / "format_v2.lcz")
    expected = compressed_net(0.9, QuantConfig(4, 8))
    torch.testing.assert_close(fresh.eval()(inputs()), expected(inputs()), atol=1e-6, rtol=0)


def test_format_3_files_still_load():
    """Written by the code at commit 8c8c296 (format 3, bytes in order): ``save_compressed(compressed_net(0.9))``."""
    fresh = Net()
    load_compressed(fresh, Path(__file__).parent / "data" / "format_v3.lcz")
    expected = compressed_net(0.9)
    torch.testing.assert_close(fresh.eval()(inputs()), expected(inputs()), atol=1e-6, rtol=0)


def test_format_4_stores_floating_point_data_by_byte_planes_and_is_smaller_than_format_3(tmp_path):
    model = compressed_net(0.9)
    save_compressed(model, tmp_path / "m.lcz")
    manifest, body = forge.read(tmp_path / "m.lcz")
    assert manifest["version"] >= 4
    first = manifest["tensors"][[r["kind"] for r in manifest["tensors"]].index("raw")]
    tensor = model.state_dict()[first["name"]]
    data = body[sum(manifest["sections"][:2]) :]  # the data section starts with the first raw record
    planes = tensor.contiguous().view(torch.uint8).reshape(-1, tensor.element_size()).t()
    assert data[: tensor.numel()] == bytes(planes[0].tolist())  # all first bytes, then all second bytes, ...
    assert (tmp_path / "m.lcz").stat().st_size < (Path(__file__).parent / "data" / "format_v3.lcz").stat().st_size
    fresh = Net()
    load_compressed(fresh, tmp_path / "m.lcz")
    raw = [r["name"] for r in manifest["tensors"] if r["kind"] in ("raw", "sparse")]
    assert raw and all(torch.equal(model.state_dict()[k], fresh.state_dict()[k]) for k in raw)  # bit for bit
    torch.testing.assert_close(fresh.eval()(inputs()), model(inputs()), atol=1e-6, rtol=0)


def test_format_4_files_still_load():
    """Written by the code at commit b9fcc9b (format 4): ``save_compressed(compressed_net(0.9))``."""
    fresh = Net()
    load_compressed(fresh, Path(__file__).parent / "data" / "format_v4.lcz")
    expected = compressed_net(0.9)  # calibrated anew: another torch's float sums may move a range by an ulp
    torch.testing.assert_close(fresh.eval()(inputs()), expected(inputs()), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def genuine_bias(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcz") / "b.lcz"
    save_compressed(compressed_net(config=QuantConfig(8, 8, quantize_bias=True)), path)
    return forge.read(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["qat_layers"]["fc1"].pop("quantize_bias"), "does not quantize 'fc1''s bias"),
        (lambda m: record(m, "fc1.bias").update(layer="fc2"), "a bias record of layer 'fc2'"),
        (lambda m: record(m, "fc1.bias").update(layer=5), "bad layer"),
        (lambda m: record(m, "fc1.bias").update(dtype="float64"), r"dtype differs: \['fc1.bias'\]"),
        (lambda m: m["tensors"].remove(record(m, "fc1.input_fake_quant.scale")), "not stored whole|missing"),
        (lambda m: record(m, "fc1.input_fake_quant.scale").update(shape=[2]), r"shape differs|grid from scales"),
        (lambda m: m["qat_layers"]["fc1"].update(activation_bits=None), "bad quantization settings for 'fc1'"),
    ],
)
def test_a_forged_bias_record_is_refused(tmp_path, genuine_bias, edit, match):
    manifest, body = copy.deepcopy(genuine_bias[0]), genuine_bias[1]
    edit(manifest)
    refused(forged(tmp_path, manifest, body), match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["qat_layers"]["fc1"].update(averaging_constant=10**400), "bad quantization settings for 'fc1'"),
        (lambda m: m.update(tensors=[["fc1.weight", "float32", [4, 4], ["q"]]]), "bad tensor record"),
        (lambda m: m.update(tensors=[["fc1.weight", "float32", [4, 4], {}]]), "bad tensor record"),
    ],
)
def test_values_python_cannot_compare_or_convert_are_refused_as_a_bad_file(tmp_path, genuine_bias, edit, match):
    """A trial: an integer too large for a float raised `OverflowError`, a format-1 record whose kind was a list or
    an object `TypeError` (unhashable), instead of `CompressedFileError`."""
    manifest, body = copy.deepcopy(genuine_bias[0]), genuine_bias[1]
    edit(manifest)
    refused(forged(tmp_path, manifest, body), match)
    with pytest.raises(ValueError, match=r"`averaging_constant`=1000.* must be in \(0, 1\]"):
        QuantConfig(8, 8, averaging_constant=10**400)


def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    """A trial: `load_compressed` on a FIFO waited forever for a writer."""

    fifo = tmp_path / "pipe.lcz"
    os.mkfifo(fifo)
    refused(fifo, "is not a regular file")
    refused(tmp_path, "is not a regular file")


def test_a_bias_record_in_a_format_4_file_is_refused(tmp_path, genuine_bias):
    manifest, body = copy.deepcopy(genuine_bias[0]), genuine_bias[1]
    manifest["version"] = 4
    raw = forge.raw_of(manifest, body)
    forge.write(tmp_path / "v4.lcz", forge.compress(raw), len(raw), version=4)
    refused(tmp_path / "v4.lcz", "a bias record in a format 4 file")


def test_a_header_version_that_disagrees_with_the_manifest_is_refused(tmp_path, genuine_bias):
    """A format-5 file relabelled as format 3 was decoded in another byte order and loaded as a NaN model."""
    manifest, body = genuine_bias
    raw = forge.raw_of(manifest, body)
    forge.write(tmp_path / "v3.lcz", forge.compress(raw), len(raw), version=3)
    refused(tmp_path / "v3.lcz", "its header says format 3, its manifest 5")


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, 1e-40])
def test_scales_that_are_not_finite_positive_normal_numbers_are_refused(tmp_path, value, monkeypatch):
    """A trial: a forged subnormal scale (1e-40; a quantizer floors scales at 1.18e-38) loaded, and every output was
    NaN. Forged: a quantizer uses its scale at no less than that floor, and saving refuses a NaN one."""
    import lightning_compress.export.save as save_module

    model = compressed_net(0.9, QuantConfig(8, 8, quantize_bias=True))
    quantizer = model.fc1.input_fake_quant
    forged = torch.full_like(quantizer.scale, value)
    monkeypatch.setattr(quantizer, "effective_scale", lambda: forged)
    monkeypatch.setattr(save_module, "_check_finite", lambda model, state: None)
    save_compressed(model, tmp_path / "bad.lcz")
    refused(
        tmp_path / "bad.lcz", r"fc1.input_fake_quant.scale: scales that are not all finite floats of at least 1.18e"
    )


@pytest.mark.parametrize("quantizer", ["weight_fake_quant", "input_fake_quant"])
def test_a_power_of_two_scale_that_is_not_two_to_the_minus_shift_is_refused(tmp_path, quantizer):
    """Trial CU: a file whose power-of-two scale was 0.3 beside a shift of 8 loaded, and `export_onnx` wrote 0.3 where
    fixed point needs a power of two."""
    model = compressed_net(0.9, QuantConfig(8, 8, scale="power_of_two", quantize_bias=True))
    save_compressed(model, tmp_path / "good.lcz")
    load_compressed(Net(), tmp_path / "good.lcz")  # the genuine file: every scale is 2**-shift
    with torch.no_grad():
        getattr(model.fc1, quantizer).scale.fill_(0.3)
    save_compressed(model, tmp_path / "bad.lcz")
    refused(tmp_path / "bad.lcz", rf"fc1.{quantizer}.scale: \[0.3.*beside a shift of .*scale is 2\*\*-shift")


@pytest.mark.parametrize("value", [1 << 20, -1])
def test_quantizer_flags_no_quantizer_sets_are_refused(tmp_path, value):
    """A trial: unknown bits in a quantizer's `state` buffer loaded without complaint."""
    model = compressed_net(0.9, QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.input_fake_quant.state.fill_(value)
    save_compressed(model, tmp_path / "flags.lcz")
    refused(tmp_path / "flags.lcz", r"fc1.input_fake_quant.state: flags a quantizer does not have")


def test_an_observed_range_that_is_not_a_number_is_refused(tmp_path, monkeypatch):
    """A trial: a NaN `min_val` loaded, and the next `calibrate` on finite data said to calibrate on finite data.
    Forged: saving refuses a model that holds one."""
    import lightning_compress.export.save as save_module

    model = compressed_net(0.9, QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.input_fake_quant.min_val.fill_(float("nan"))
    monkeypatch.setattr(save_module, "_check_finite", lambda model, state: None)
    save_compressed(model, tmp_path / "nan.lcz")
    refused(tmp_path / "nan.lcz", r"fc1.input_fake_quant.min_val: an observed range that is not a finite number")


@pytest.mark.parametrize("value", [-5, 2_000_000_000])
def test_zero_points_outside_their_quantizers_range_are_refused(tmp_path, value):
    """A forged activation zero point (checksum valid) loaded, shifted the layer's inputs and broke `export_onnx`
    (a trial): it is refused like a bad scale, the model left as it was."""
    model = compressed_net(0.9, QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.input_fake_quant.zero_point.fill_(value)
    save_compressed(model, tmp_path / "zp.lcz")
    fresh = Net()
    before = copy.deepcopy(fresh.state_dict())
    match = r"fc1\.input_fake_quant\.zero_point: zero points outside .* 0\.\.255"
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(fresh, tmp_path / "zp.lcz")
    assert not qat_modules(fresh) and all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_zero_point_is_checked_against_the_range_of_the_flags_loaded_with_it(tmp_path):
    """Trial DC: a file turning a power-of-two activation's signed flag on kept a zero point of 200, checked against
    the fresh quantizer's unsigned 0..255: it loaded, collapsed the layer's inputs and broke `export_onnx`."""
    model = compressed_net(0.9, QuantConfig(8, 8, scale="power_of_two"))
    model.fc1.input_fake_quant.set_signed(True)
    save_compressed(model, tmp_path / "good.lcz")
    load_compressed(Net(), tmp_path / "good.lcz")  # signed, zero point 0: genuine
    with torch.no_grad():
        model.fc1.input_fake_quant.zero_point.fill_(200)
    save_compressed(model, tmp_path / "zp.lcz")
    refused(tmp_path / "zp.lcz", r"fc1\.input_fake_quant\.zero_point: zero points outside .* -128\.\.127")


def test_a_long_name_is_matched_against_modules_registered_twice_in_linear_time(tmp_path):
    """Trial DC: a quantizer-like name of 32,000 characters took 3.4 s to refuse (each dot joined the name's parts
    again); a model registering a module twice is what makes the reader look for its first name."""
    import time

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = self.a
            self.many = nn.Sequential(*[nn.Linear(1, 1) for _ in range(3000)])  # an allowance for a long manifest

    save_compressed(Twice(), tmp_path / "good.lcz")
    manifest, body = forge.read(tmp_path / "good.lcz")
    manifest["tensors"].append({"name": "b." * 60_000 + "weight_fake_quant.scale", "dtype": "float32", "shape": []})
    manifest["tensors"][-1]["kind"] = "raw"
    manifest["sections"][2] += 4
    path = forged(tmp_path, manifest, body + bytes(4))
    start = time.perf_counter()
    with pytest.raises(CompressedFileError, match="unknown to the model"):
        load_compressed(Twice(), path)
    assert time.perf_counter() - start < 5.0  # minutes before; milliseconds now


def test_an_aliased_scale_is_refused_also_by_a_model_that_is_already_quantized(tmp_path):
    """The alias check ran only for quantizer buffers a fresh model lacks: into a converted model the reader looked
    the scale up before aliases were filled in, and a bare KeyError escaped (found by fuzzing)."""
    from lightning_compress import convert_to_qat

    config = QuantConfig(8, 8, scale="power_of_two")  # one weight scale per layer: an alias of another fits
    save_compressed(compressed_net(0.9, config), tmp_path / "g.lcz")
    manifest, body = forge.read(tmp_path / "g.lcz")
    names = [r["name"] for r in manifest["tensors"]]
    target = names.index("fc2.weight_fake_quant.scale")
    offset = sum(manifest["sections"][:2])  # the data section, record by record up to the scale
    for entry in manifest["tensors"][:target]:
        element = torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()
        count = {"raw": math.prod(entry["shape"]), "sparse": entry.get("count", 0), "bias": 0}.get(entry["kind"], 0)
        offset += count * (4 if entry["kind"] == "bias" else element)
    body = body[:offset] + body[offset + 4 :]  # an alias stores no bytes
    manifest["sections"][2] -= 4
    manifest["tensors"][target].update(kind="alias", of="conv.weight_fake_quant.scale")
    path = forged(tmp_path, manifest, body)
    model = Net()
    convert_to_qat(model, config)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CompressedFileError, match=r"fc2\.weight_fake_quant\.scale"):
        load_compressed(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_named_with_glob_characters_round_trips_without_converting_its_sibling(tmp_path):
    """The file's layer names were passed to the conversion as patterns: "d.a*" also converted "d.ab", which the
    reader then refused and did not roll back (found by fuzzing)."""
    from lightning_compress import convert_to_qat
    from lightning_compress.core.qat import calibrate, enable_fake_quant

    class Globbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d = torch.nn.ModuleDict({"a*": torch.nn.Linear(8, 8), "ab": torch.nn.Linear(8, 4)})

        def forward(self, x):
            return self.d["ab"](self.d["a*"](x))

    torch.manual_seed(0)
    model = Globbed()
    assert convert_to_qat(model, QuantConfig(8, 8), include=["d.a[*]"]) == ["d.a*"]
    calibrate(model, [torch.randn(16, 8)])
    enable_fake_quant(model)
    save_compressed(model.eval(), tmp_path / "g.lcz")
    fresh = Globbed()
    load_compressed(fresh, tmp_path / "g.lcz")
    assert [n for n, _ in qat_modules(fresh)] == ["d.a*"] and type(fresh.d["ab"]) is torch.nn.Linear
    x = torch.randn(4, 8)
    assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize("extra", [b"\x00", b"hidden payload" * 100])
def test_bytes_after_the_end_of_the_compressed_stream_are_refused(tmp_path, genuine, extra):
    """A file whose checksum covers bytes after the LZMA end marker loaded as if they were not there."""
    manifest, body = genuine
    raw = forge.raw_of(manifest, body)
    forge.write(tmp_path / "t.lcz", forge.compress(raw) + extra, len(raw))
    refused(tmp_path / "t.lcz", "bytes follow the end of the compressed stream")


def test_quantizer_scales_wider_than_their_layers_dtype_are_refused(tmp_path):
    """Trial AL: int4 group scales stored as float64 for a float32 model loaded, at 63 MiB of peak memory for a
    16 MiB model (the README bounds it by twice the model plus 16 MiB). A float64 model's float64 scales load."""
    config = QuantConfig(4, 8, group_size=8, activation_granularity="per_token")
    model = compressed_net(0.5, config)
    with torch.no_grad():
        model.fc1.weight_fake_quant.scale = model.fc1.weight_fake_quant.scale.double()
    save_compressed(model, tmp_path / "wide.lcz")
    refused(tmp_path / "wide.lcz", r"dtype differs: \['fc1.weight_fake_quant.scale'\]")
    double = compressed_net(0.5, config).double()
    save_compressed(double, tmp_path / "double.lcz")
    fresh = Net().double()
    load_compressed(fresh, tmp_path / "double.lcz")
    x = inputs().double()
    torch.testing.assert_close(fresh.eval()(x), double.eval()(x))
