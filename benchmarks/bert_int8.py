"""Int8 ONNX of a BERT-base-width encoder (or GPT-2 decoder): ours (QAT layers -> export_onnx) against onnxruntime's
quantize_dynamic.

Model: ``transformers.BertForSequenceClassification`` from a config with random weights (nothing
downloaded): hidden 768, 12 heads, MLP 3072, 4 layers, 3 labels; inputs of 128 tokens. With
``--model gpt2``: ``transformers.GPT2ForSequenceClassification`` of GPT-2 small's width (768, 12 heads,
MLP 3072, vocabulary 50257), 4 layers, 3 labels, whose layers are ``transformers``' Conv1D (weights
stored (in, out)). With ``--model gpt2-lm``: that decoder as ``transformers.GPT2LMHeadModel``, whose output head
(768 x 50257, the largest matrix product) is tied to ``transformer.wte``. Four ONNX files of the same weights:

* **fp32**: ``torch.onnx.export`` of the float model;
* **quantize_dynamic**: onnxruntime's ``quantize_dynamic(fp32, weight_type=QInt8)``, the usual BERT
  int8 path (int8 weights per tensor, activations quantized at run time: ``MatMulInteger``);
* **ours**: ``convert_to_qat(model, QuantConfig(8, 8))``, ``calibrate`` on 4 batches of 8 random
  sequences, ``enable_fake_quant``, ``export_onnx`` (int8 weights per channel, static int8 activations:
  Q/DQ that onnxruntime fuses);
* **ours + embedding**: the same, with the word embedding quantized too (opt-in by exact name:
  ``include=["*", "bert.embeddings.word_embeddings"]``, GPT-2's ``transformer.wte``; int8 per row, as
  ``quantize_dynamic`` quantizes its ``Gather``): the file size comparable to ``quantize_dynamic``'s. A head tied
  to the embedding (``gpt2-lm``) shares its weight quantizer: int8 too, one table for both; in **ours** it stays
  float, as the default leaves a tied head out.

Speed: onnxruntime CPU, one thread (intra and inter op), at batch 1 and batch 8: interleaved rounds
whose order rotates, median process CPU time per call. Agreement: our int8 ONNX logits against the
fake-quant PyTorch model's, and both quantized files' logits against fp32 (max |diff| over 32
held-out sequences, relative to the fp32 logits' largest magnitude).

    pip install -e ".[dev,bench]"
    python benchmarks/bert_int8.py                  # ~5 minutes on 2 CPU cores
    python benchmarks/bert_int8.py --model gpt2     # results/gpt2_int8.json
    python benchmarks/bert_int8.py --model gpt2-lm  # results/gpt2-lm_int8.json (~15 minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import transformers
from onnxruntime.quantization import QuantType, quantize_dynamic

from lightning_compress import QuantConfig, calibrate, convert_to_qat, enable_fake_quant, export_onnx

warnings.filterwarnings("ignore")
LENGTH, VOCAB = 128, {"bert": 30522, "gpt2": 50257, "gpt2-lm": 50257}
HELD_OUT = {"gpt2-lm": 8}  # sequences whose logits are compared (32 by default; a language model's are 50257 wide)
NAMES = ["input_ids", "attention_mask"]
KEYS = ("fp32", "quantize_dynamic", "ours", "ours + embedding")


def bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB["bert"], hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        num_hidden_layers=4, max_position_embeddings=512, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def gpt2() -> transformers.GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB["gpt2"], n_embd=768, n_head=12, n_layer=4, num_labels=3, pad_token_id=0, use_cache=False
    )
    return transformers.GPT2ForSequenceClassification(config).eval()


class LanguageModel(torch.nn.Module):
    """``GPT2LMHeadModel`` called with the two inputs alone (the exporters made its ``logits_to_keep`` an input)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=VOCAB["gpt2-lm"], n_embd=768, n_head=12, n_layer=4, use_cache=False)
        self.lm = transformers.GPT2LMHeadModel(config)  # lm_head tied to transformer.wte

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


def gpt2_lm() -> LanguageModel:
    return LanguageModel().eval()


MODELS = {
    "bert": (bert, "bert.embeddings.word_embeddings"),
    "gpt2": (gpt2, "transformer.wte"),
    "gpt2-lm": (gpt2_lm, "lm.transformer.wte"),
}


def batch(size: int, seed: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (size, LENGTH), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def session(path: pathlib.Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}


def timings(
    sessions: dict[str, ort.InferenceSession], inputs: dict[str, torch.Tensor], rounds: int
) -> dict[str, float]:
    feeds = {k: feed(s, inputs) for k, s in sessions.items()}
    names = list(sessions)
    per: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        sessions[k].run(None, feeds[k])
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            begin = time.process_time()
            sessions[k].run(None, feeds[k])
            per[k].append(time.process_time() - begin)
    return {k: 1000 * statistics.median(v) for k, v in per.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40, help="timed calls per file at batch 1 (a quarter at 8)")
    parser.add_argument("--model", choices=sorted(MODELS), default="bert")
    parser.add_argument("--out", default=None, help="default: results/<model>_int8.json")
    args = parser.parse_args()
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"{args.model}_int8.json")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    began = time.perf_counter()
    build, embedding = MODELS[args.model]
    vocab = VOCAB[args.model]
    model = build()
    held_out = batch(HELD_OUT.get(args.model, 32), 7, vocab)
    with torch.no_grad():
        fp32_logits = model(**held_out).logits
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = pathlib.Path(tmp_dir)
        torch.onnx.export(
            model, (), str(tmp / "fp32.onnx"), kwargs=batch(1, 0, vocab), input_names=NAMES, output_names=["logits"],
            dynamic_axes={n: {0: "batch"} for n in [*NAMES, "logits"]}, opset_version=17, dynamo=False,
        )  # fmt: skip
        quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "quantize_dynamic.onnx"), weight_type=QuantType.QInt8)
        embedded = copy.deepcopy(model)
        convert_to_qat(model, QuantConfig(8, 8))
        convert_to_qat(embedded, QuantConfig(8, 8), include=["*", embedding])
        for net, name in ((model, "ours"), (embedded, "ours + embedding")):
            calibrate(net, [batch(8, seed, vocab) for seed in range(4)])
            enable_fake_quant(net)
            export_onnx(net, tmp / f"{name}.onnx", batch(1, 0, vocab), output_names=["logits"])
        with torch.no_grad():
            fake_quant_logits = model(**held_out).logits
            embedded_logits = embedded(**held_out).logits
        sessions = {k: session(tmp / f"{k}.onnx") for k in KEYS}
        logits = {k: torch.from_numpy(s.run(None, feed(s, held_out))[0]) for k, s in sessions.items()}
        scale = float(fp32_logits.abs().max())
        results["agreement"] = {
            "ours_onnx_vs_fake_quant": float((logits["ours"] - fake_quant_logits).abs().max()) / scale,
            "ours_onnx_vs_fp32": float((logits["ours"] - fp32_logits).abs().max()) / scale,
            "ours_embedding_onnx_vs_fake_quant": float((logits["ours + embedding"] - embedded_logits).abs().max())
            / scale,
            "ours_embedding_onnx_vs_fp32": float((logits["ours + embedding"] - fp32_logits).abs().max()) / scale,
            "quantize_dynamic_vs_fp32": float((logits["quantize_dynamic"] - fp32_logits).abs().max()) / scale,
            "fp32_onnx_vs_torch": float((logits["fp32"] - fp32_logits).abs().max()) / scale,
        }
        results["file_mb"] = {k: (tmp / f"{k}.onnx").stat().st_size / 1e6 for k in sessions}
        results["ms"] = {
            "batch_1": timings(sessions, batch(1, 99, vocab), args.rounds),
            "batch_8": timings(sessions, batch(8, 99, vocab), max(5, args.rounds // 4)),
        }
    results["wall_seconds"] = time.perf_counter() - began
    results["model"] = f"{build().__class__.__name__}, width 768, 4 layers, random weights"
    print(f"\n{results['model']}, sequence {LENGTH}, onnxruntime {ort.__version__}, one thread, "
          f"wall {results['wall_seconds']:.0f} s\n")  # fmt: skip
    print("| file | MB | ms batch 1 | ms batch 8 | speed-up vs fp32 (1 / 8) | vs quantize_dynamic (1 / 8) |")
    print("|---|---|---|---|---|---|")
    ms1, ms8 = results["ms"]["batch_1"], results["ms"]["batch_8"]
    for key in KEYS:
        print(
            f"| {key} | {results['file_mb'][key]:.1f} | {ms1[key]:.1f} | {ms8[key]:.1f} | "
            f"{ms1['fp32'] / ms1[key]:.2f}x / {ms8['fp32'] / ms8[key]:.2f}x | "
            f"{ms1['quantize_dynamic'] / ms1[key]:.2f}x / {ms8['quantize_dynamic'] / ms8[key]:.2f}x |"
        )
    agreement = ", ".join(f"{k} {v:.4f}" for k, v in results["agreement"].items())
    print(f"\nmax |logit difference| / max |fp32 logit|: {agreement}")
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
