"""Compacted widths that fast convolution layouts take whole: channel pruning to 50% of the MACs with and without
``round_to``, timed dense vs compacted in onnxruntime (fp32) and PyTorch.

Trial CJ (session 26) measured a compacted ``transformers`` MobileNetV2 4x slower than dense in onnxruntime: its
widths (225, 129, 97, 21, ...) fall out of onnxruntime's blocked ``nchwc`` convolution layout, which takes channel
counts in multiples of 8 or 16. Models from ``transformers`` configs with random weights (nobody's code here), 32x32
inputs, batch 32, one thread; ``prune_(..., measure="macs", round_to=r)`` then ``compact``. Timing: interleaved
rounds, median process CPU time (``common.interleaved_ms``). No training: this measures speed only.

    python benchmarks/round_to.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import copy
import pathlib
import tempfile
import warnings

import onnxruntime as ort
import torch
import transformers
from common import interleaved_ms, no_arguments
from torch import nn

from lightning_compress import compact, export_onnx, prune_


class Logits(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


MODELS = {
    "MobileNetV2": lambda: transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(image_size=32, num_labels=10, depth_multiplier=0.35, min_depth=8)
    ),
    "ResNet": lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            num_labels=10, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"
        )
    ),
    "ConvNeXt": lambda: transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_labels=10, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=32)
    ),
}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    work = pathlib.Path(tempfile.mkdtemp())
    print("| model | variant | MACs | widths | onnxruntime fp32 ms | vs dense | PyTorch ms | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        dense = Logits(build()).eval()
        variants: dict[str, tuple[nn.Module, float, list[int]]] = {"dense": (dense, 1.0, [])}
        for multiple in (None, 8, 16):
            model = copy.deepcopy(dense)
            prune_(model, 0.5, granularity="channel", measure="macs", example_inputs=x[:2], round_to=multiple)
            report = compact(model, x[:2])
            widths = sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})
            variants[f"round_to={multiple}"] = (model, report.macs_after / report.macs_before, widths)
        sessions = {}
        for key, (model, _, _) in variants.items():
            path = work / f"{name}-{key}.onnx"
            export_onnx(model, path, x[:2])
            sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input_0": x.numpy()}
        ort_ms = interleaved_ms({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}, rounds=25)
        torch_ms = interleaved_ms({k: (lambda m=m: m(x)) for k, (m, _, _) in variants.items()}, rounds=25)
        for key, (_, macs, widths) in variants.items():
            shown = ", ".join(map(str, widths[:8])) + (" ..." if len(widths) > 8 else "")
            print(
                f"| {name} | {key} | {macs:.1%} | {shown} | {ort_ms[key]:.2f} | {ort_ms['dense'] / ort_ms[key]:.2f}x "
                f"| {torch_ms[key]:.2f} | {torch_ms['dense'] / torch_ms[key]:.2f}x |"
            )


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
