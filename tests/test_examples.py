"""The README's main example runs end to end (in its fast mode) and prints what it promises."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_example_prunes_quantizes_and_exports(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--fast", "--sparsity", "0.8", "--out", "export"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
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
