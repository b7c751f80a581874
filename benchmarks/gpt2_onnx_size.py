"""The int8 ONNX file of GPT-2 small (``transformers``' ``GPT2LMHeadModel`` at its default config, random weights):
its size with the tied ``wte`` / ``lm_head`` stored once (session 24) against twice (the exporter's own folding, kept
by ``share_transposed_initializers(..., min_size=huge)``), and the largest difference between the two files' logits.

    python benchmarks/gpt2_onnx_size.py            # about 4 minutes and 3 GB of memory on 2 CPU cores
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import warnings
from unittest import mock

import numpy as np
import torch
from common import no_arguments
from torch import nn

from lightning_compress import QuantConfig, calibrate, convert_to_qat, enable_fake_quant, export_onnx
from lightning_compress.export import onnx as onnx_export
from lightning_compress.export.onnx_sharing import share_transposed_initializers

OUT = pathlib.Path(__file__).parent / "results"


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def main() -> None:
    import onnxruntime as ort
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    wrapped = Logits(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qat(wrapped, QuantConfig(8, 8))
        calibrate(wrapped, [inputs])
        enable_fake_quant(wrapped)
    wrapped.eval()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        once, twice = pathlib.Path(tmp) / "once.onnx", pathlib.Path(tmp) / "twice.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows["stored once"] = export_onnx(wrapped, once, inputs).file_bytes
            keep = mock.patch.object(
                onnx_export,
                "share_transposed_initializers",
                lambda proto, helper: share_transposed_initializers(proto, helper, min_size=2**62),
            )
            with keep:
                rows["stored twice"] = export_onnx(wrapped, twice, inputs).file_bytes
        feeds = {k: v.numpy() for k, v in inputs.items()}
        logits = [
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for path in (once, twice)
        ]
    result = {
        "model": "GPT2LMHeadModel, default config (124M parameters), random weights, int8 QAT (minmax, per channel)",
        "file_bytes": rows,
        "float_weights_bytes": sum(  # each tensor once (the tied ones share storage)
            t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values()
        ),
        "max_abs_logit_difference": float(np.abs(logits[0] - logits[1]).max()),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "gpt2_onnx_size.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
