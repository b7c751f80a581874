"""Channel pruning while fine-tuning, then a physically smaller, faster model.

Trains a small ResNet (residual blocks with BatchNorm) on sklearn digits, prunes half of its
channels with Taylor importance while fine-tuning (``IterativePruning(granularity="channel")``),
removes them with ``compact()``, and prints parameters, accuracy and inference speed before and
after; the compacted model is saved with ``save_compressed`` and exported to int8 ONNX.

    python examples/structured.py            # about 40 seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_compress import IterativePruning, QuantizationAwareTraining, compact, save_compressed
from lightning_compress.demo import DigitsClassifier, DigitsDataModule, DigitsResNet

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*might cause the trace to be incorrect.*")


def ms_per_batch(net: torch.nn.Module, batch: int = 256, rounds: int = 15) -> float:
    """Median milliseconds per batch, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(batch, 1, 8, 8)
    times = []
    with torch.inference_mode():
        net.eval()(x)
        for _ in range(rounds):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=float, default=0.5, help="fraction of channels to remove")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", default="structured_export")
    parser.add_argument("--fast", action="store_true", help="a short smoke run (fewer epochs, narrower model)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    dense_epochs, prune_epochs = (2, 2) if args.fast else (15, 10)
    width = 16 if args.fast else args.width
    data = DigitsDataModule()
    model = DigitsClassifier(DigitsResNet(width, blocks=3))

    trainer = pl.Trainer(max_epochs=dense_epochs, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, data)
    dense_acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    dense = copy.deepcopy(model.net)

    pruning = IterativePruning(
        args.channels,
        importance="taylor",
        granularity="channel",
        scope="layer",
        start_epoch=0,
        end_epoch=max(1, prune_epochs // 2),
    )
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=prune_epochs - 2)
    trainer = pl.Trainer(
        max_epochs=prune_epochs,
        callbacks=[pruning, qat],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    report = compact(model)
    print(report)
    pruned_acc = trainer.test(model, data, verbose=False)[0]["test_acc"]

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = save_compressed(model, out / "resnet.lcz")
    onnx_note = ""
    try:
        from lightning_compress import export_onnx

        # calibration: every convolution runs in int8 in onnxruntime (without it, some keep float outputs and the
        # graph can be slower than the float model: a warning says so)
        batches = [x for x, _ in data.val_dataloader()]
        export_onnx(model, out / "resnet_int8.onnx", torch.zeros(1, 1, 8, 8), calibration=batches)
        onnx_note = f", {out / 'resnet_int8.onnx'}"
    except ImportError:  # the [onnx] extra is optional
        pass

    float_copy = copy.deepcopy(model.net)
    from lightning_compress import convert_to_float

    convert_to_float(float_copy)  # time the plain float layers, as Torch-Pruning users would
    params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in float_copy.parameters()))
    speed = (ms_per_batch(dense), ms_per_batch(float_copy))
    print(f"\n{'':34}{'dense':>12}{'compacted':>14}")
    print(f"{'test accuracy':34}{100 * dense_acc:>11.2f}%{100 * pruned_acc:>13.2f}%")
    print(f"{'parameters':34}{params[0]:>12,}{params[1]:>14,}")
    print(f"{'ms / batch 256, 1 thread (float)':34}{speed[0]:>12.2f}{speed[1]:>14.2f}  ({speed[0] / speed[1]:.1f}x)")
    print(f"{'file (.lcz, int8)':34}{'':>12}{saved.file_bytes / 1024:>11.1f} KiB")
    print(f"\nExported: {out / 'resnet.lcz'}{onnx_note}")


if __name__ == "__main__":
    main()
