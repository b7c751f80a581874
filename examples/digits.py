"""Train a CNN on sklearn digits, prune it to 90% and quantize it to int8 while fine-tuning, export it.

1. dense training (10 epochs);
2. fine-tuning (15 epochs) with ``IterativePruning`` (Taylor importance, 90% by epoch 8, pruning
   every 5 steps) and ``QuantizationAwareTraining`` (int8 weights and activations from epoch 10),
   both exporting at the end of fit: a compressed file and an int8 ONNX model, while
   ``CompressionMonitor`` logs size, bits and accuracy at every validation (a sanity check over the
   whole validation set scores the dense model first, so each point's accuracy drop is logged too);
3. accuracy, size and inference speed before and after.

TensorBoard logs go to ``lightning_logs/`` (``tensorboard --logdir lightning_logs``).

    python examples/digits.py [--sparsity 0.9] [--fast]
"""

from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import (
    CompressionMonitor,
    IterativePruning,
    QuantizationAwareTraining,
    load_compressed,
    sparsity,
)
from lightning_compress.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _trainer(epochs: int, name: str, callbacks: list[pl.Callback], sanity_steps: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger("lightning_logs", name=name),
        enable_checkpointing=False,
        accelerator="cpu",
        num_sanity_val_steps=sanity_steps,
    )


def _onnx_speed(path: pathlib.Path, x: torch.Tensor, repeats: int = 50) -> tuple[float, float]:
    """(accuracy input predictions, milliseconds per batch) of an ONNX model on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    out = session.run(None, feed)[0]
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return out, 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9, help="target fraction of zero weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_export", help="folder for the exported models")
    parser.add_argument("--fast", action="store_true", help="a short smoke run (fewer epochs)")
    args = parser.parse_args()
    dense_epochs, tune_epochs = (2, 5) if args.fast else (10, 15)
    out = pathlib.Path(args.out)

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(seed=args.seed)
    model = DigitsClassifier()
    model.example_input_array = torch.zeros(1, 1, 8, 8)

    dense_trainer = _trainer(dense_epochs, "digits_dense", [])
    dense_trainer.fit(model, data)
    dense_acc = dense_trainer.test(model, data, verbose=False)[0]["test_acc"]
    dense_sparsity = sparsity(model)
    out.mkdir(parents=True, exist_ok=True)
    model.to_onnx(
        out / "dense.onnx",
        input_sample=torch.zeros(2, 1, 8, 8),
        dynamo=False,
        input_names=["input_0"],
        dynamic_axes={"input_0": {0: "batch"}},
    )

    prune_end = max(1, (tune_epochs * 8) // 15)
    pruning = IterativePruning(
        args.sparsity,
        importance="taylor",
        start_epoch=0,
        end_epoch=prune_end,
        every_n_steps=5,
        export_path=out / "digits.lcz",
    )
    qat = QuantizationAwareTraining(
        8, 8, start_epoch=min(prune_end + 1, tune_epochs - 2), export_path=out / "digits_int8.onnx"
    )
    monitor = CompressionMonitor(monitor="val_acc")  # size, bits, accuracy in TensorBoard + a summary
    # pruning starts at the first step: a sanity check over the whole validation set gives the monitor its dense
    # baseline (the accuracy drop it logs is measured from it)
    tune_trainer = _trainer(tune_epochs, "digits_compressed", [pruning, qat, monitor], sanity_steps=-1)
    tune_trainer.fit(model, data)
    compressed_acc = tune_trainer.test(model, data, verbose=False)[0]["test_acc"]

    # what a user ships: reload the compressed file into a fresh model and the ONNX model in onnxruntime
    fresh = DigitsClassifier()
    load_compressed(fresh, out / "digits.lcz")
    data.setup()
    assert data._data is not None
    x, y = data._data[2], data._data[3]
    fresh.eval()
    with torch.no_grad():
        reloaded_acc = float((fresh(x).argmax(1) == y).float().mean())
    batch = x[:256]
    dense_out, dense_ms = _onnx_speed(out / "dense.onnx", batch)
    int8_out, int8_ms = _onnx_speed(out / "digits_int8.onnx", x)
    onnx_acc = float((torch.as_tensor(int8_out).argmax(1) == y).float().mean())
    _, int8_ms = _onnx_speed(out / "digits_int8.onnx", batch)
    del dense_out

    lcz = pruning.export_report
    onnx_report = qat.export_report
    assert lcz is not None and onnx_report is not None
    print()
    print(f"{'':<34}{'dense':>12}{'compressed':>14}")
    print(f"{'test accuracy (PyTorch)':<34}{100 * dense_acc:>11.2f}%{100 * compressed_acc:>13.2f}%")
    print(f"{'test accuracy (reloaded .lcz)':<34}{'':>12}{100 * reloaded_acc:>13.2f}%")
    print(f"{'test accuracy (ONNX int8)':<34}{'':>12}{100 * onnx_acc:>13.2f}%")
    print(f"{'sparsity (Linear+Conv)':<34}{100 * dense_sparsity:>11.1f}%{100 * sparsity(model):>13.1f}%")
    print(
        f"{'size (torch.save / .lcz)':<34}{lcz.baseline_bytes / 1024:>8.1f} KiB{lcz.file_bytes / 1024:>10.1f} KiB"
        f"  ({lcz.compression_ratio:.1f}x smaller)"  # the report's baseline: the float model's torch.save
    )
    print(
        f"{'ONNX file':<34}{(out / 'dense.onnx').stat().st_size / 1024:>8.1f} KiB"
        f"{onnx_report.file_bytes / 1024:>10.1f} KiB"
    )
    print(
        f"{'ONNX inference, batch 256, 1 thread':<34}{dense_ms:>9.2f} ms{int8_ms:>11.2f} ms"
        f"  ({dense_ms / int8_ms:.1f}x)"
    )
    print(f"\nExported: {out / 'digits.lcz'}, {out / 'digits_int8.onnx'}")
    print("TensorBoard logs: tensorboard --logdir lightning_logs")


if __name__ == "__main__":
    main()
