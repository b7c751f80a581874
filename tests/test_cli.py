"""Both callbacks configure from a YAML file and from the command line through LightningCLI."""

import pathlib
import subprocess
import sys

import pytest

from tests.conftest import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs=3", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def run(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cli.py"), "fit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_yaml_config(tmp_path):
    result = run(
        ["--config", str(ROOT / "examples" / "compress.yaml"), "--trainer.enable_progress_bar=false"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "digits_cli" / "model.lcz").exists()
    output = result.stdout + result.stderr  # the monitor's summary goes through Lightning's logger
    assert "Compression summary" in output and "90.0%" in output


@pytest.mark.slow
def test_a_bad_yaml_value_is_named_before_training(tmp_path):
    result = run(["--config", str(ROOT / "examples" / "compress.yaml"), *FAST], tmp_path)
    assert result.returncode != 0  # the shipped schedule needs 20 epochs
    assert "`end_epoch`=12 is after the Trainer's `max_epochs`=3" in result.stderr


@pytest.mark.slow
def test_command_line_callbacks(tmp_path):
    result = run(
        [
            *FAST,
            "--trainer.callbacks+=lightning_compress.IterativePruning",
            "--trainer.callbacks.target_sparsity=0.8",
            "--trainer.callbacks.end_epoch=2",
            "--trainer.callbacks.export_path=out/model.lcz",
            "--trainer.callbacks+=lightning_compress.QuantizationAwareTraining",
            "--trainer.callbacks.start_epoch=1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fake quantization on" in result.stderr + result.stdout
    assert (tmp_path / "out" / "model.lcz").exists()


@pytest.mark.slow
def test_channel_granularity_from_the_command_line(tmp_path):
    result = run(
        [
            *FAST,
            "--trainer.callbacks+=lightning_compress.IterativePruning",
            "--trainer.callbacks.target_sparsity=0.5",
            "--trainer.callbacks.granularity=channel",
            "--trainer.callbacks.end_epoch=2",
            "--trainer.callbacks.export_path=out/model.lcz",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Compacted the exported copy" in result.stderr + result.stdout
    assert (tmp_path / "out" / "model.lcz").exists()


@pytest.mark.slow
def test_a_custom_importance_from_the_command_line_by_its_class_path(tmp_path):
    (tmp_path / "my_scores.py").write_text(
        "from lightning_compress import Importance\n\n\n"
        "class Squared(Importance):\n"
        "    def score(self, name, weight):\n"
        "        return weight.detach() ** 2\n"
    )
    env = child_env(tmp_path)
    prune = [*FAST, "--trainer.callbacks+=lightning_compress.IterativePruning", "--trainer.callbacks.end_epoch=2"]
    prune.append("--trainer.callbacks.target_sparsity=0.5")
    # the dotted path alone is read as a string: the message names the form that works (trial BV: it did not)
    result = run([*prune, "--trainer.callbacks.importance=my_scores.Squared"], tmp_path, env)
    assert result.returncode != 0
    assert "`--trainer.callbacks.importance.class_path=my_scores.Squared`" in result.stderr
    result = run(
        [
            *prune,
            "--trainer.callbacks.importance.class_path=my_scores.Squared",
            "--trainer.callbacks.export_path=x.lcz",
        ],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: my_scores.Squared" in (tmp_path / "config.yaml").read_text() and (tmp_path / "x.lcz").exists()
