"""The README's main example runs end to end (in its fast mode) and prints what it promises."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_example_prunes_to_the_target(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--fast", "--sparsity", "0.8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    accuracy = re.search(r"test accuracy\s+([\d.]+)%\s+([\d.]+)%", out)
    zeros = re.search(r"sparsity \(Linear\+Conv\)\s+([\d.]+)%\s+([\d.]+)%", out)
    assert accuracy and zeros, out
    assert float(zeros.group(1)) == 0.0 and float(zeros.group(2)) == pytest.approx(80.0, abs=0.1)
    assert float(accuracy.group(2)) > 80.0
    assert list((tmp_path / "lightning_logs" / "digits_pruned").glob("version_*/events.out.tfevents.*"))
