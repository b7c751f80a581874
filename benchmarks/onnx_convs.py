"""int8 ONNX of CNNs whose convolutions feed residual adds, norms or pooling: ``export_onnx`` with and without
``calibration`` against fp32 and onnxruntime's ``quantize_static``.

A convolution whose output no quantized layer reads first keeps a float output in the exported graph, and
onnxruntime runs it in float on dequantized inputs; ``calibration`` measures those outputs' ranges so that it runs
as ``QLinearConv`` (trial BS, session 24). Models:

* the demo ``DigitsResNet`` (width 32, 3 blocks), trained 10 epochs on digits, then 4 epochs of int8 QAT through
  ``QuantizationAwareTraining`` (the callback's own ``export_path``, which calibrates on the last validation's
  inputs, is what is timed as "export_onnx + calibration"); accuracy on the digits test split;
* ``transformers``' ``ResNetForImageClassification`` and ``ConvNextForImageClassification`` from small configs
  with random weights (models this project did not write; widths 32-64-128, two blocks per stage, 64x64
  inputs), and ``MobileNetV1ForImageClassification`` (depth multiplier 0.25, which pads before each convolution
  as TensorFlow's "SAME" does; session 33), converted to int8 QAT and calibrated on random images: speed, and
  agreement of the ONNX outputs with the fake-quant model (top-1 and largest difference).

Every variant: 1 thread, batch 32, interleaved rounds, median process CPU time (``common.interleaved_ms``); the
operators onnxruntime runs after its fusions. ``quantize_static``: QDQ, per-channel int8 weights, uint8
activations, calibrated on the same batches.

    python benchmarks/onnx_convs.py            # about 20 seconds on 2 CPU cores
"""

from __future__ import annotations

import collections
import json
import pathlib
import tempfile
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from common import interleaved_ms, no_arguments, quantize_static_qdq, quiet_trainer
from torch import nn

from lightning_compress import QuantConfig, QuantizationAwareTraining, calibrate, convert_to_qat, enable_fake_quant
from lightning_compress import export_onnx as lc_export_onnx
from lightning_compress.demo import DigitsClassifier, DigitsDataModule, DigitsResNet

OUT = pathlib.Path(__file__).parent / "results"


def _session(path: pathlib.Path, optimized: pathlib.Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kernels(path: pathlib.Path) -> dict[str, int]:
    optimized = path.with_suffix(".optimized.onnx")
    _session(path, optimized)
    counts = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    keep = (
        "QLinearConv",
        "Conv",
        "FusedConv",
        "QGemm",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "DynamicQuantizeMatMul",
        "Gemm",
        "MatMul",
        "DequantizeLinear",
    )
    return {op: counts[op] for op in keep if counts[op]}


def _fp32_onnx(model: nn.Module, path: pathlib.Path, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input_0"], output_names=["output_0"],
            dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip


def _variants(
    float_model: nn.Module, qat_model: nn.Module, batches: list[torch.Tensor], tmp: pathlib.Path, calibrated: Any
) -> dict[str, pathlib.Path]:
    """fp32, quantize_static, export_onnx without and with calibration (``calibrated``: a file already written
    with it, or None to write one here)."""
    example = batches[0][:2]
    paths = {name: tmp / f"{name}.onnx" for name in ("fp32", "quantize_static", "export_onnx", "export_onnx_cal")}
    _fp32_onnx(float_model, paths["fp32"], example)
    quantize_static_qdq(paths["fp32"], paths["quantize_static"], batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc_export_onnx(qat_model, paths["export_onnx"], example)
        if calibrated is None:
            lc_export_onnx(qat_model, paths["export_onnx_cal"], example, calibration=batches)
        else:
            paths["export_onnx_cal"] = calibrated
    return paths


def _timed(paths: dict[str, pathlib.Path], x: torch.Tensor) -> dict[str, dict[str, Any]]:
    sessions = {name: _session(path) for name, path in paths.items()}
    feed = x.numpy()
    ms = interleaved_ms(
        {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}, rounds=15
    )
    return {
        name: {"ms": ms[name], "speedup_vs_fp32": ms["fp32"] / ms[name], "kernels": _kernels(path)}
        for name, path in paths.items()
    }


def _outputs(path: pathlib.Path, x: torch.Tensor) -> np.ndarray:
    session = _session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def digits_resnet(tmp: pathlib.Path) -> dict[str, Any]:
    torch.manual_seed(0)
    data = DigitsDataModule(seed=0)
    module = DigitsClassifier(DigitsResNet(32, 3))
    quiet_trainer(10, []).fit(module, data)
    float_model = DigitsResNet(32, 3)
    float_model.load_state_dict(module.net.state_dict())
    calibrated = tmp / "callback.onnx"
    qat = QuantizationAwareTraining(8, 8, start_epoch=0, export_path=calibrated)
    quiet_trainer(4, [qat]).fit(module, data)
    module.eval()
    data.setup()
    x_test, y_test = data.test_dataloader().dataset.tensors  # type: ignore[attr-defined]
    batches = [x_test[i : i + 64] for i in range(0, 512, 64)]
    paths = _variants(float_model.eval(), module.net, batches, tmp, calibrated)
    row: dict[str, Any] = {"model": "DigitsResNet(32, 3), digits, 10 + 4 epochs (QAT)"}
    row["timing"] = _timed(paths, x_test[:32])
    with torch.no_grad():
        row["accuracy"] = {"fake_quant": float((module.net(x_test).argmax(1) == y_test).float().mean())}
    for name, path in paths.items():
        row["accuracy"][name] = float((_outputs(path, x_test).argmax(1) == y_test.numpy()).mean())
    return row


def hf_model(name: str, tmp: pathlib.Path) -> dict[str, Any]:
    import transformers

    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(
            num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], num_labels=10
        )
        model: nn.Module = transformers.ResNetForImageClassification(config)
    elif name == "convnext":
        config = transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], num_stages=3, num_labels=10
        )
        model = transformers.ConvNextForImageClassification(config)
    else:  # pads before each convolution (TensorFlow's "SAME", `tf_padding=True`): trial DV, session 33
        config = transformers.MobileNetV1Config(num_channels=3, image_size=64, depth_multiplier=0.25, num_labels=10)
        model = transformers.MobileNetV1ForImageClassification(config)

    class Logits(nn.Module):  # a tensor in, the logits out
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=x).logits

    batches = [torch.randn(16, 3, 64, 64) for _ in range(8)]
    if name == "mobilenetv1":  # its BatchNorms' initial statistics let random activations vanish (logits ~1e-33)
        with torch.no_grad():
            for _ in range(3):
                for batch in batches:
                    model.train()(pixel_values=batch)
    float_model = Logits(model).eval()
    qat_model = Logits(transformers.AutoModelForImageClassification.from_config(config)).eval()
    qat_model.load_state_dict(float_model.state_dict())
    convert_to_qat(qat_model, QuantConfig(8, 8))
    calibrate(qat_model, batches)
    enable_fake_quant(qat_model)
    qat_model.eval()
    paths = _variants(float_model, qat_model, batches, tmp, None)
    x = torch.randn(32, 3, 64, 64)
    shape = (
        "depth multiplier 0.25 (8 to 256 channels, 27 convolutions), 64x64 inputs"
        if name == "mobilenetv1"
        else "widths 32-64-128, 2 blocks per stage, 64x64 inputs"
    )
    row: dict[str, Any] = {"model": f"transformers {type(model).__name__} (random weights), {shape}"}
    row["timing"] = _timed(paths, x)
    with torch.no_grad():
        reference = qat_model(x).numpy()
    row["agreement_with_fake_quant"] = {
        name: {
            "top1": float((_outputs(path, x).argmax(1) == reference.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(_outputs(path, x) - reference).max()),
        }
        for name, path in paths.items()
        if name != "fp32"
    }
    return row


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in ("digits", "resnet", "convnext", "mobilenetv1"):
            where = pathlib.Path(tmp) / job
            where.mkdir()
            rows.append(digits_resnet(where) if job == "digits" else hf_model(job, where))
            print(json.dumps(rows[-1], indent=1), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "onnx_convs.json").write_text(json.dumps(rows, indent=1))
    print("\n| model | fp32 | quantize_static | export_onnx | export_onnx + calibration |")
    print("|---|---|---|---|---|")
    for row in rows:
        timing = row["timing"]
        cells = [f"{timing[k]['ms']:.2f} ms ({timing[k]['speedup_vs_fp32']:.2f}x)" for k in timing]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
