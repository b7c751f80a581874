"""Export: file sizes against torch.save(state_dict), and int8 ONNX speed against onnxruntime's quantize_static.

Sizes: digits CNNs (DigitsCNN width 6 and the default width 32) trained with IterativePruning
(Taylor, to 90% or 95%) and int8 QuantizationAwareTraining, and a 10.4M-parameter MLP pruned and
quantized the same way on synthetic data; each saved with ``save_compressed`` and compared with
``torch.save(model.state_dict())`` of the compressed model, of the same model in float (no
quantizer buffers), and with a plain "bitmask + int8 codes" encoding (no index or entropy coding).

Speed: the MLP (1024-2360-2360-1024-10) trained in fp32 on a synthetic 10-class task, then
(a) exported to fp32 ONNX, (b) quantized by onnxruntime's ``quantize_static`` (QDQ, per-channel
int8 weights, uint8 activations, 16 calibration batches), (c) fine-tuned with int8 QAT and exported
with ``export_onnx``. One thread, batch 256 and batch 1, interleaved rounds, median process CPU time.
Accuracy of each on held-out data. The digits CNN's ONNX model is compared with its fake-quant model.

    python benchmarks/export.py            # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import io
import json
import pathlib
import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from common import mlp_layers, no_arguments, quantize_static_qdq, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    IterativePruning,
    QuantizationAwareTraining,
    export_onnx,
    save_compressed,
)
from lightning_compress.core.qat import qat_modules
from lightning_compress.demo import DigitsClassifier, DigitsCNN, DigitsDataModule

warnings.filterwarnings("ignore")
OUT = pathlib.Path(__file__).parent / "results"


def _saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _float_copy_bytes(model: nn.Module) -> int:
    """torch.save size of the same weights without quantizer buffers."""
    state = {k: v for k, v in model.state_dict().items() if "_fake_quant." not in k}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def _bitmask_int8_bytes(model: nn.Module) -> int:
    """A plain encoding: 1 bit per weight + 1 byte per nonzero code + scales; everything else raw."""
    total = 0
    quantized = {f"{name}.weight" for name, _ in qat_modules(model)}
    for key, tensor in model.state_dict().items():
        if key in quantized:
            total += (tensor.numel() + 7) // 8 + int((tensor != 0).sum()) + 4 * tensor.shape[0]
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def size_row(label: str, model: nn.Module, tmp: pathlib.Path) -> dict[str, Any]:
    report = save_compressed(model, tmp / "model.lcz")
    return {
        "model": label,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsity": report.sparsity,
        "file_bytes": report.file_bytes,
        "state_dict_bytes": report.baseline_bytes,
        "float_state_dict_bytes": _float_copy_bytes(model),
        "bitmask_int8_bytes": _bitmask_int8_bytes(model),
    }


def digits(width: int, target: float, seed: int = 0) -> DigitsClassifier:
    pl.seed_everything(seed, verbose=False)
    data, module = DigitsDataModule(seed=seed), DigitsClassifier(DigitsCNN(width))
    quiet_trainer(10, []).fit(module, data)
    pruning = IterativePruning(target, importance="taylor", start_epoch=0, end_epoch=6, every_n_steps=5)
    qat = QuantizationAwareTraining(8, 8, start_epoch=7)
    quiet_trainer(10, [pruning, qat]).fit(module, data)
    return module


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp_layers()
        self.example_input_array = torch.zeros(2, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-4)


def synthetic(n: int, seed: int) -> TensorDataset:
    """10 classes from a fixed random linear teacher over 1024 features: learnable to ~90%+."""
    teacher = torch.randn(1024, 10, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 1024, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ teacher).argmax(1))


def accuracy(predict: Any, data: TensorDataset) -> float:
    x, y = data.tensors
    return float((torch.as_tensor(predict(x)).argmax(1) == y).float().mean()) * 100


def main() -> None:
    torch.set_num_threads(2)
    results: dict[str, Any] = {"sizes": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        # ---------------------------------------------------------------- digits sizes + ONNX accuracy
        for width in (6, 32):
            for target in (0.9, 0.95):
                model = digits(width, target)
                results["sizes"].append(size_row(f"DigitsCNN(width={width})", model, tmp))
                print(results["sizes"][-1], flush=True)
                if width == 6 and target == 0.9:
                    data = DigitsDataModule(seed=0)
                    data.setup()
                    assert data._data is not None
                    x, y = data._data[2], data._data[3]
                    export_onnx(model, tmp / "digits.onnx", x[:2])
                    onnx_out = _ort_session(tmp / "digits.onnx").run(None, {"input_0": x.numpy()})[0]
                    model.eval()
                    with torch.no_grad():
                        fq_out = model(x).numpy()
                    results["digits_onnx"] = {
                        "fake_quant_accuracy": float((fq_out.argmax(1) == y.numpy()).mean()) * 100,
                        "onnx_accuracy": float((onnx_out.argmax(1) == y.numpy()).mean()) * 100,
                        "agreement": float((onnx_out.argmax(1) == fq_out.argmax(1)).mean()) * 100,
                        "test_images": len(y),
                    }
                    print(results["digits_onnx"], flush=True)
        # ---------------------------------------------------------------- MLP: speed and accuracy
        train, held_out = synthetic(256 * 160, 0), synthetic(4096, 1)
        loader = DataLoader(train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))
        pl.seed_everything(0, verbose=False)
        base = MLP()
        quiet_trainer(2, []).fit(base, loader)
        fp32 = MLP()  # reference: 2 more fp32 epochs from the same weights as the QAT model
        fp32.load_state_dict(base.state_dict())
        quiet_trainer(2, []).fit(fp32, loader)
        fp32.eval()
        qat_model = MLP()
        qat_model.load_state_dict(base.state_dict())
        quiet_trainer(2, [QuantizationAwareTraining(8, 8, start_epoch=0)]).fit(qat_model, loader)  # calibrate, then QAT
        qat_model.eval()
        calibration = [train.tensors[0][i * 64 : (i + 1) * 64] for i in range(16)]
        torch.onnx.export(
            fp32,
            (torch.zeros(2, 1024),),
            str(tmp / "fp32.onnx"),
            input_names=["input_0"],
            output_names=["output_0"],
            dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}},
            dynamo=False,
        )
        quantize_static_qdq(tmp / "fp32.onnx", tmp / "ort_int8.onnx", calibration)
        export_onnx(qat_model, tmp / "ours.onnx", torch.zeros(2, 1024))
        with torch.no_grad():
            results["mlp_accuracy"] = {
                "fp32 (PyTorch)": accuracy(fp32, held_out),
                "QAT fake-quant (PyTorch)": accuracy(qat_model, held_out),
            }
        sessions = {name: _ort_session(tmp / f"{name}.onnx") for name in ("fp32", "ort_int8", "ours")}
        for name, session in sessions.items():
            results["mlp_accuracy"][f"ONNX {name}"] = accuracy(
                lambda x, s=session: s.run(None, {"input_0": x.numpy()})[0], held_out
            )
        results["mlp_onnx_bytes"] = {name: (tmp / f"{name}.onnx").stat().st_size for name in sessions}
        results["mlp_speed"] = _timings(sessions)
        print(results["mlp_accuracy"], results["mlp_speed"], flush=True)
        train = synthetic(256 * 24, 0)
        loader = DataLoader(train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))
        for target in (0.9, 0.95):
            pl.seed_everything(0, verbose=False)
            model = MLP()
            model.load_state_dict(fp32.state_dict())
            pruning = IterativePruning(target, importance="taylor", start_epoch=0, end_epoch=2, every_n_steps=4)
            quiet_trainer(3, [pruning, QuantizationAwareTraining(8, 8, start_epoch=1)]).fit(model, loader)
            results["sizes"].append(size_row("MLP 10.4M", model, tmp))
            print(results["sizes"][-1], flush=True)
    (OUT / "export.json").write_text(json.dumps(results, indent=1))
    _print(results)


def _ort_session(path: pathlib.Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timings(sessions: dict[str, Any], rounds: int = 25) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for batch, reps in ((256, 10), (1, 200)):
        x = rng.standard_normal((batch, 1024), dtype=np.float32)
        per: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, session in sessions.items():
                session.run(None, {"input_0": x})
                start = time.process_time()
                for _ in range(reps):
                    session.run(None, {"input_0": x})
                per[name].append((time.process_time() - start) / reps)
        median = {name: statistics.median(v) for name, v in per.items()}
        out[f"batch_{batch}"] = {
            name: {"ms": 1000 * median[name], "speedup_vs_fp32": median["fp32"] / median[name]} for name in sessions
        }
    return out


def _print(results: dict[str, Any]) -> None:
    print("\n| model | sparsity | file | vs torch.save(state_dict) | vs float state_dict | bitmask+int8 would be |")
    print("|---|---|---|---|---|---|")
    for r in results["sizes"]:
        print(
            f"| {r['model']} | {100 * r['sparsity']:.1f}% | {r['file_bytes'] / 1024:.1f} KiB "
            f"| {r['state_dict_bytes'] / r['file_bytes']:.1f}x | {r['float_state_dict_bytes'] / r['file_bytes']:.1f}x "
            f"| {r['state_dict_bytes'] / r['bitmask_int8_bytes']:.1f}x |"
        )
    print("\n| MLP, 1 thread | batch 256 | speedup | batch 1 | speedup | held-out accuracy | file |")
    print("|---|---|---|---|---|---|---|")
    for name in ("fp32", "ort_int8", "ours"):
        b256, b1 = results["mlp_speed"]["batch_256"][name], results["mlp_speed"]["batch_1"][name]
        print(
            f"| {name} | {b256['ms']:.2f} ms | {b256['speedup_vs_fp32']:.2f}x | {b1['ms']:.3f} ms "
            f"| {b1['speedup_vs_fp32']:.2f}x | {results['mlp_accuracy'][f'ONNX {name}']:.2f}% "
            f"| {results['mlp_onnx_bytes'][name] / 2**20:.1f} MiB |"
        )
    print("\n", results["mlp_accuracy"], "\n", results.get("digits_onnx"))


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
