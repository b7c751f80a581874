"""Padding between quantized convolutions in the int8 ONNX (``export/onnx_pads.py``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import QuantConfig, calibrate, convert_to_qat, enable_fake_quant, export_onnx

from .helpers import ort_kernels


def _padded_net(pad: type[nn.Module] | None, *pad_args: float) -> nn.Sequential:
    """Conv-BN-ReLU6 blocks with the padding before each convolution as a module of its own (as ``transformers``'
    MobileNetV1 pads, TensorFlow's "SAME"), ending in global pooling and a classifier."""

    def padding() -> list[nn.Module]:
        return [] if pad is None else [pad(*pad_args)]

    inner = 0 if pad is not None else 1
    return nn.Sequential(
        *padding(), nn.Conv2d(3, 16, 3, padding=inner), nn.BatchNorm2d(16), nn.ReLU6(),
        *padding(), nn.Conv2d(16, 16, 3, padding=inner, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        *padding(), nn.Conv2d(16, 16, 3, padding=inner), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _quantized(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    model.train()
    for batch in batches:
        model(batch)  # BatchNorm statistics
    convert_to_qat(model, QuantConfig(8, 8))
    calibrate(model, batches)
    enable_fake_quant(model)
    return model.eval()


def _export(model: nn.Module, path, example: torch.Tensor) -> int:
    """Export; the number of convolutions said to keep a float output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, path, example)
    said = [str(w.message) for w in caught if "quantized convolution(s) have outputs" in str(w.message)]
    return int(said[0].split("export_onnx: ")[1].split(" ")[0]) if said else 0


@pytest.mark.parametrize(
    ("pad", "args"),
    [(nn.ZeroPad2d, (1,)), (nn.ReflectionPad2d, (1,)), (nn.ReplicationPad2d, (1,)), (nn.ConstantPad2d, (1, 0.3))],
)
def test_convolutions_before_a_padding_run_as_integer_kernels_on_padded_codes(tmp_path, pad, args):
    """Trial DV: `transformers`' MobileNetV1 pads before every convolution, and a `Pad` was not among the ops the
    activation quantization moves across: every convolution kept a float output (27 of 27; 11x slower than the float
    model in onnxruntime) or, with `calibration`, took an extra rounding (7.4% of the largest logit off). The padding
    keeps quantized values and adds values the quantization after it rounds: the convolutions run as QLinearConv, and
    the padding runs on the uint8 codes (no dequantize/pad/quantize round trip; a constant of 0.3 padded as its code),
    as the same graph without padding modules does."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    batches = [torch.randn(32, 3, 10, 10) for _ in range(3)]
    padded = _quantized(_padded_net(pad, *args), batches)
    assert _export(padded, tmp_path / "padded.onnx", batches[0][:2]) == 1  # the last, before global pooling
    kernels = ort_kernels(tmp_path / "padded.onnx")
    assert kernels.get("QLinearConv") == 2 and kernels.get("Pad") == 3
    import onnx

    graph = onnx.load(str(tmp_path / "padded.onnx")).graph
    produced = {out: node for node in graph.node for out in node.output}
    for node in (n for n in graph.node if n.op_type == "Pad"):
        assert produced[node.input[0]].op_type == "QuantizeLinear"  # codes in, codes out
        assert [n.op_type for n in graph.node if node.output[0] in n.input] == ["DequantizeLinear"]
    session = ort.InferenceSession(str(tmp_path / "padded.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(16, 3, 10, 10)
    expected = padded(x).detach().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()  # integer kernels requantize differently
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    plain = ort.InferenceSession(str(tmp_path / "padded.onnx"), options, providers=["CPUExecutionProvider"])
    written = plain.run(None, {plain.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(written - expected).max() < 1e-4 * np.abs(expected).max()  # the codes padded are the model's


def test_a_padding_between_quantizations_without_zero_points_stays_in_floats():
    """Without a zero point a DequantizeLinear's codes are of its input's type, which the graph need not say: such a
    padding is left as written (it assumed uint8 codes), and one with zero points is rewritten, in the nodes' order."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from lightning_compress.export.onnx_pads import pad_quantized_codes

    def graph(zero_points: bool) -> object:
        zp = ["zp"] if zero_points else []
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", *zp], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", *zp], ["xf"]),
            helper.make_node("Pad", ["xf", "pads"], ["xp"], mode="constant"),
            helper.make_node("QuantizeLinear", ["xp", "s", *zp], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "s", *zp], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads"),
        ]
        if zero_points:
            inits.append(numpy_helper.from_array(np.array(3, np.int8), "zp"))
        g = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits,
        )  # fmt: skip
        return helper.make_model(
            g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7
        )  # onnxruntime < 1.31 reads <= 13

    bare = graph(False)
    pad_quantized_codes(bare, numpy_helper)
    assert [n.op_type for n in bare.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Pad", "QuantizeLinear",
                                                    "DequantizeLinear"]  # fmt: skip
    given = graph(True)
    pad_quantized_codes(given, numpy_helper)
    assert [n.op_type for n in given.graph.node] == ["QuantizeLinear", "Pad", "DequantizeLinear"]
    onnx.checker.check_model(given)
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    out = {}
    for name, model in (("float", graph(True)), ("codes", given)):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[name] = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(out["codes"], out["float"])  # zero point 3: the padding is code 3, value 0


class _ConvTokens(nn.Module):
    """A convolution whose output is viewed as tokens by its own shape (CvT's convolutional projections): the export
    reads that shape with `Shape` nodes beside the `Reshape`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        return self.fc(y.view(b, c, h * w).transpose(1, 2))


def test_a_convolution_viewed_by_its_own_shape_keeps_an_integer_output(tmp_path):
    """Trial EC: the `Shape` nodes reading CvT's projection convolutions kept the quantization of the Linear after
    them from moving before the view, so each kept a float output, and `calibration` (which the callbacks' ONNX
    export passes) rounded it a second time at another scale: 11.7% of the largest logit off where 1.5% without."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    model = _quantized(_ConvTokens(), batches)
    assert _export(model, tmp_path / "tokens.onnx", batches[0][:2]) == 0
    graph = onnx.load(str(tmp_path / "tokens.onnx")).graph
    assert any(n.op_type == "Shape" for n in graph.node)  # the view reads the shape
    assert ort_kernels(tmp_path / "tokens.onnx").get("QLinearConv") == 1
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "tokens.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 6, 6)
    expected = model(x).detach().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
