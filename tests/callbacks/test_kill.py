"""SIGKILL a run with both callbacks at random moments; resuming from the last checkpoint must end
exactly where an uninterrupted run ends, and every checkpoint left on disk must be readable."""

from __future__ import annotations

import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import child_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "callbacks" / "kill_script.py"
ENV = child_env()
KILLS = 10


def start(workdir: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    with open(log, "ab") as out:  # a file, not a pipe: a child must never block on output nobody reads
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(workdir)], env=ENV, stdout=out, stderr=out)
    return proc, log


def run_to_end(workdir: pathlib.Path) -> None:
    proc, log = start(workdir)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def kill_during_training(workdir: pathlib.Path, after: float) -> bool:
    """True if the run was killed before it finished."""
    proc, log = start(workdir)
    deadline = time.monotonic() + 300
    while b"READY" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return alive


def training_seconds(log: str) -> float:
    """Wall time from the start to the end of training, as the uninterrupted run printed it."""
    ready = float(re.search(r"READY ([0-9.]+)", log).group(1))
    end = float(re.search(r"END ([0-9.]+)", log).group(1))
    return end - ready


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_masks(tmp_path):
    run_to_end(tmp_path / "reference")
    training = training_seconds((tmp_path / "reference" / "log.txt").read_text())
    want = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    rng = random.Random(1234)
    killed = attempts = 0
    while killed < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, f"only {killed} of {attempts - 1} kills landed during training"
        work = tmp_path / f"run{attempts}"
        # a kill time inside training; if this run trains faster than the reference (less load), shrink it
        after = rng.uniform(0.0, 0.9 * training) * 0.5 ** (attempts - 1 - killed)
        killed += kill_during_training(work, after)
        for checkpoint in sorted((work / "ckpt").glob("*.ckpt")) if (work / "ckpt").exists() else []:
            torch.load(checkpoint, weights_only=True)  # no torn checkpoint left on disk
        if not (work / "final.pt").exists():
            run_to_end(work)  # resume from last.ckpt (or start over if killed before the first one)
        got = torch.load(work / "final.pt", weights_only=True)
        assert got["masks"].keys() == want["masks"].keys(), attempts
        for key in want["masks"]:
            assert torch.equal(got["masks"][key], want["masks"][key]), (attempts, key)
        for key in want["state"]:
            assert torch.equal(got["state"][key], want["state"][key]), (attempts, key)
