"""LLM-style QAT (int4 weights per group of 32 inputs, int8 dynamic per-token activations) vs post-training
quantization, on a byte-level Llama (grouped-query attention) trained from scratch on text that ships with Python.

    python benchmarks/llm_qat.py            # about 20 minutes on 2 CPU cores; writes benchmarks/results/llm_qat.json
    python benchmarks/llm_qat.py --seed 1   # perplexities only, another split and init: llm_qat_seed1.json

1. **Data.** ``pydoc_data.topics`` (the standard library's 466k bytes of Python docs), byte level, windows of
   128 bytes; 10% of the topics held out (the split of ``benchmarks/zoo.py``). Perplexity is per byte, on
   the held-out windows.
2. **Model.** ``transformers.LlamaForCausalLM`` from a config (random init, nothing downloaded): hidden 128,
   4 layers, 4 query heads sharing 2 key/value heads, MLP 384.
3. **Runs, from one float checkpoint after ``PRETRAIN`` steps; both branches see the same batches:**
   * float fine-tuning for ``EXTRA`` steps, then round-to-nearest quantization of the result (PTQ);
   * QAT for ``EXTRA`` steps with the same recipe, switched on at the branch point (weights observed at
     every step; per-token activations need no calibration).
   The two recipes: 8da4w (``QuantConfig(4, 8, group_size=32, activation_granularity="per_token")``) and
   W4A16 (``QuantConfig(4, None, group_size=32)``).
4. **Recovery** = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float), ppl_float being the float branch before PTQ.
5. **Step cost.** Float and QAT training steps of the same model and batches, timed alternately in one
   process after a warm-up, ``torch.set_num_threads(1)``; the ratio of the medians.
6. **File.** ``save_compressed`` of the QAT model: its quantized layers' stored bytes vs their fp32
   ``torch.save`` bytes (4 per weight), and the whole file vs ``torch.save(state_dict)``.
7. **Int4 runtime.** A wider random Llama (hidden 1024, MLP 2816, 4 layers, 16 query / 4 key-value heads)
   with the W4A16 / 8da4w recipes, exported by ``export_onnx`` (``MatMulNBits``), against the fp32 ONNX
   export of the same model: onnxruntime, one thread, batch 1, a 32-byte prompt, median of 30 runs.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # run as a script, like zoo.py

from zoo import pydoc_split

from lightning_compress import (
    QuantConfig,
    calibrate,
    convert_to_qat,
    enable_fake_quant,
    export_onnx,
    save_compressed,
)

PRETRAIN = 2000
EXTRA = 400
BATCH = 32
CONTEXT = 128
LR = 3e-3
RECIPES = {
    "8da4w": QuantConfig(4, 8, group_size=32, activation_granularity="per_token"),
    "W4A16": QuantConfig(4, None, group_size=32),
}
RESULTS = pathlib.Path(__file__).parent / "results" / "llm_qat.json"


def llama(
    hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2, mlp: int = 384, seed: int = 0
) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=CONTEXT,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (BATCH,), generator=g) for _ in range(steps))]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], lr: float, warmup: int = 0) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = len(data)
    for step, (xb, yb) in enumerate(data):
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        for group in optimizer.param_groups:  # warm-up, then cosine to a tenth
            group["lr"] = lr * factor * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        logits = model(input_ids=xb).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), yb.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


@torch.no_grad()
def perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), 64):
        logits = model(input_ids=x[i : i + 64]).logits
        total += float(nn.functional.cross_entropy(logits.reshape(-1, 256), y[i : i + 64].reshape(-1), reduction="sum"))
        count += y[i : i + 64].numel()
    return math.exp(total / count)


def quantize_ptq(model: nn.Module, config: QuantConfig, calibration: torch.Tensor) -> nn.Module:
    ptq = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qat(ptq, config, exclude=["lm_head"])
    calibrate(ptq, [{"input_ids": calibration}])  # weight group scales are read from the weights
    enable_fake_quant(ptq)
    return ptq


def step_cost(model: nn.Module, config: QuantConfig, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Median seconds per training step, float vs QAT, measured alternately on the same batches."""
    float_model = copy.deepcopy(model)
    qat_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qat(qat_model, config, exclude=["lm_head"])
    enable_fake_quant(qat_model)
    timings: dict[str, list[float]] = {"float": [], "qat": []}
    optimizers = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in (("float", float_model), ("qat", qat_model))
    }
    for i, (xb, yb) in enumerate(data):
        for name, m in (
            (("float", float_model), ("qat", qat_model)) if i % 2 else (("qat", qat_model), ("float", float_model))
        ):
            m.train()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(m(input_ids=xb).logits.reshape(-1, 256), yb.reshape(-1))
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if i >= 5:  # warm-up
                timings[name].append(time.perf_counter() - start)
    f, q = statistics.median(timings["float"]), statistics.median(timings["qat"])
    return {"float_step_s": f, "qat_step_s": q, "ratio": q / f}


def file_sizes(model: nn.Module) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = save_compressed(model, pathlib.Path(tmp) / "m.lcz")
    quantized = [layer for layer in report.layers if layer.bits == 4]
    before = sum(layer.numel * 4 for layer in quantized)
    after = sum(layer.bytes_after for layer in quantized)
    return {
        "quantized_layers": len(quantized),
        "quantized_fp32_bytes": before,
        "quantized_stored_bytes": after,
        "quantized_ratio": before / after,
        "file_bytes": report.file_bytes,
        "state_dict_bytes": report.baseline_bytes,
        "file_ratio": report.compression_ratio,
    }


def onnx_speed() -> dict:
    import onnxruntime as ort

    model = llama(hidden=1024, layers=4, heads=16, kv_heads=4, mlp=2816).eval()
    prompt = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "fp32": (None, 0),
            "W4A16": (RECIPES["W4A16"], 0),
            "8da4w (accuracy_level 4)": (RECIPES["8da4w"], 4),
        }
        for name, (config, level) in variants.items():
            candidate = copy.deepcopy(model)
            if config is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    convert_to_qat(candidate, config, exclude=["lm_head"])
                candidate.train()
                with torch.no_grad():  # weights observed once: the group scales
                    calibrate(candidate, [inputs])
                enable_fake_quant(candidate)
            path = pathlib.Path(tmp) / f"{name.split()[0]}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(candidate, path, inputs, accuracy_level=level)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {k: v.numpy() for k, v in inputs.items()}
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(30):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            out[name] = {"ms": 1000 * statistics.median(times), "file_mb": path.stat().st_size / 2**20}
    for name in out:
        out[name]["speedup_vs_fp32"] = out["fp32"]["ms"] / out[name]["ms"]
    return out


def main(seed: int = 0) -> None:
    torch.set_num_threads(2)
    started = time.time()
    x, y, x_test, y_test = pydoc_split(seed, CONTEXT)
    model = llama(seed=seed)
    train(model, batches(x, y, PRETRAIN, seed=1 + 10 * seed), LR, warmup=100)
    base = copy.deepcopy(model)
    extra = batches(x, y, EXTRA, seed=2 + 10 * seed)
    float_model = copy.deepcopy(base)
    train(float_model, extra, LR / 10)
    results: dict = {
        "pretrain_steps": PRETRAIN,
        "extra_steps": EXTRA,
        "ppl_float": perplexity(float_model, x_test, y_test),
    }
    for name, config in RECIPES.items():
        ptq = quantize_ptq(float_model, config, x[:64])
        qat = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_to_qat(qat, config, exclude=["lm_head"])
        enable_fake_quant(qat)
        train(qat, extra, LR / 10)
        ppl_ptq, ppl_qat = perplexity(ptq, x_test, y_test), perplexity(qat, x_test, y_test)
        gap = ppl_ptq - results["ppl_float"]
        results[name] = {
            "ppl_ptq": ppl_ptq,
            "ppl_qat": ppl_qat,
            "recovery": (ppl_ptq - ppl_qat) / gap if gap > 0 else float("nan"),
            "file": file_sizes(qat),
        }
        print(name, results[name], flush=True)
    results["seed"] = seed
    if seed != 0:  # perplexities only
        results["wall_s"] = time.time() - started
        path = RESULTS.with_name(f"llm_qat_seed{seed}.json")
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    torch.set_num_threads(1)
    results["step_cost"] = {
        name: step_cost(base, config, batches(x, y, 40, seed=3)) for name, config in RECIPES.items()
    }
    print(results["step_cost"], flush=True)
    results["onnx_batch1"] = onnx_speed()
    print(results["onnx_batch1"], flush=True)
    results["wall_s"] = time.time() - started
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=0, help="data split and init; seeds other than 0 skip the speed parts"
    )
    main(parser.parse_args().seed)
