"""The README's main example runs end to end (in its fast mode) and prints what it promises."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_example(script: str, *args: str, cwd: pathlib.Path) -> str:
    """Run ``examples/<script>`` in ``cwd`` with this interpreter; its stdout (fails on a non-zero exit, with the end
    of its output: a CI run's failure said only the exit status)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.slow
def test_digits_example_prunes_quantizes_and_exports(tmp_path):
    out = _run_example("digits.py", "--fast", "--sparsity", "0.8", "--out", "export", cwd=tmp_path)
    accuracy = re.search(r"test accuracy \(PyTorch\)\s+([\d.]+)%\s+([\d.]+)%", out)
    onnx_accuracy = re.search(r"test accuracy \(ONNX int8\)\s+([\d.]+)%", out)
    zeros = re.search(r"sparsity \(Linear\+Conv\)\s+([\d.]+)%\s+([\d.]+)%", out)
    smaller = re.search(r"\(([\d.]+)x smaller\)", out)
    assert accuracy and onnx_accuracy and zeros and smaller, out
    assert float(zeros.group(1)) == 0.0 and float(zeros.group(2)) == pytest.approx(80.0, abs=0.1)
    assert float(accuracy.group(2)) > 80.0
    assert abs(float(onnx_accuracy.group(1)) - float(accuracy.group(2))) <= 1.0
    assert float(smaller.group(1)) > 5
    assert (tmp_path / "export" / "digits.lcz").exists() and (tmp_path / "export" / "digits_int8.onnx").exists()
    assert list((tmp_path / "lightning_logs" / "digits_compressed").glob("version_*/events.out.tfevents.*"))


@pytest.mark.slow
def test_sweep_writes_csv_and_pareto_chart(tmp_path):
    import csv

    _run_example("sweep.py", "--fast", "--sparsity", "0", "0.8", "--bits", "32", "4", cwd=tmp_path)
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sparsity"], r["bits"]) for r in rows] == [("0.0", "32"), ("0.0", "4"), ("0.8", "32"), ("0.8", "4")]
    sizes = {(r["sparsity"], r["bits"]): int(r["bytes"]) for r in rows}
    assert sizes[("0.8", "4")] < sizes[("0.0", "4")] < sizes[("0.0", "32")]
    assert any(r["pareto"] == "True" for r in rows)
    assert (tmp_path / "sweep" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_structured_example_compacts_and_exports(tmp_path):
    out = _run_example("structured.py", "--fast", "--out", "export", cwd=tmp_path)
    params = re.search(r"parameters\s+([\d,]+)\s+([\d,]+)", out)
    channels = re.findall(r"^net\.\S+\s+(\d+) -> (\d+)$", out, flags=re.MULTILINE)
    assert params and channels, out
    before, after = (int(g.replace(",", "")) for g in params.groups())
    assert after < 0.4 * before
    assert all(int(b) == int(a) // 2 for a, b in channels)
    assert (tmp_path / "export" / "resnet.lcz").exists() and (tmp_path / "export" / "resnet_int8.onnx").exists()


@pytest.mark.slow
def test_fsdp2_example_prunes_heads_quantizes_and_exports_onnx_from_shards(tmp_path):
    """examples/fsdp2.py: a `transformers` Llama sharded over 2 CPU processes; half its key/value head groups and
    MLP neurons pruned, int8 QAT, the compacted model exported to ONNX by rank 0; onnxruntime runs it."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("transformers")
    out = _run_example("fsdp2.py", "--fast", "--out", "export", cwd=tmp_path)
    assert "val_loss" in out, out
    path = tmp_path / "export" / "llama_int8.onnx"
    int8 = {  # int8 codes, stored plus 128 as uint8 (`export_onnx`'s default weight_type)
        i.name: list(i.dims)
        for i in onnx.load(path).graph.initializer
        if i.name.endswith("_quantized_u8") and i.data_type == onnx.TensorProto.UINT8
    }
    rows = {kind: sorted({d[0] for n, d in int8.items() if f"/{kind}/" in n}) for kind in ("k_proj", "up_proj")}
    assert rows == {"k_proj": [16], "up_proj": [88]}  # 2 -> 1 key/value group of 16, 176 -> 88 neurons, in int8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).numpy()
    feeds = {"input_ids": ids, "attention_mask": ids * 0 + 1}
    (logits,) = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    assert logits.shape == (2, 64, 256)
