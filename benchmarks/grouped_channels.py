"""Channel pruning beside int4 group QAT (the LLM recipe): do the pruned channels leave the model?

A layer quantized with one scale per group of 32 input weights can only lose whole groups of inputs. Before
session 25, channel pruning chose an MLP's neurons one by one, scattered over the groups of its down projection,
and ``compact()`` removed almost none of them (a trial: a 50% MACs budget compacted to 86%). Now the channels a
grouped layer reads go a whole group at a time. This runs both, side by side, with the same data and steps:

    python benchmarks/grouped_channels.py                  # about 20 minutes on 2 cores
    git worktree add /tmp/before HEAD && git -C /tmp/before revert --no-commit 1eddf10   # the change undone
    PYTHONPATH=/tmp/before python benchmarks/grouped_channels.py --label before

1. **Data, model:** as ``benchmarks/llm_qat.py`` (byte-level ``transformers`` Llama, hidden 128, 4 layers, 4 query
   heads over 2 key/value heads, MLP 384, on ``pydoc_data.topics``; perplexity per byte on the held-out windows),
   ``PRETRAIN`` float steps.
2. **Branches** from that checkpoint, ``EXTRA`` steps each on the same batches, 8da4w QAT
   (``QuantConfig(4, 8, group_size=32, activation_granularity="per_token")``, every Linear but ``lm_head``):
   * ``dense``: QAT alone;
   * ``macs50``: QAT and ``IterativePruner(0.5, granularity="channel", measure="macs")`` (heads and MLP neurons,
     defaults otherwise) over the first ``PRUNE`` steps, then ``compact()``;
   * ``macs50_mlp_int8``: the advice before session 25 (keep the layers that read pruned channels out of the
     grouped recipe): ``o_proj`` and ``down_proj`` with int8 per-channel weights instead, pruned as ``macs50``.
3. **Reported:** perplexity, the compacted model's MACs per forward and parameters against the dense model's, the
   zero channels ``compact()`` had to keep, the ``.lcz`` size.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # run as a script, like zoo.py

from llm_qat import BATCH, CONTEXT, LR, batches, llama, perplexity, train
from zoo import pydoc_split

import lightning_compress
from lightning_compress import IterativePruner, QuantConfig, compact, convert_to_qat, enable_fake_quant, save_compressed

PRETRAIN = 1200
EXTRA = 400
PRUNE = 300
RECIPE = QuantConfig(4, 8, group_size=32, activation_granularity="per_token")
PER_CHANNEL = QuantConfig(8, 8, activation_granularity="per_token")
READERS = ["*.o_proj", "*.down_proj"]  # the layers whose inputs are pruned channels (heads, MLP neurons)
RESULTS = pathlib.Path(__file__).parent / "results"


def quantized(base: nn.Module, readers_per_channel: bool) -> nn.Module:
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if readers_per_channel:
            convert_to_qat(model, PER_CHANNEL, include=READERS)
            convert_to_qat(model, RECIPE, exclude=["lm_head", *READERS])
        else:
            convert_to_qat(model, RECIPE, exclude=["lm_head"])
    enable_fake_quant(model)
    return model


def train_pruned(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], lr: float, example: dict) -> None:
    """``train`` of ``llm_qat.py`` (AdamW, cosine to a tenth, clipping) with a channel pruner stepping beside it."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pruner = IterativePruner(
        model, 0.5, total_steps=PRUNE, granularity="channel", measure="macs", example_inputs=example,
        optimizers=optimizer,
    )  # fmt: skip
    for step, (xb, yb) in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / len(data))))
        loss = nn.functional.cross_entropy(model(input_ids=xb).logits.reshape(-1, 256), yb.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.before_optimizer_step()
        optimizer.step()
        pruner.step()
    pruner.finish()


def main(label: str) -> None:
    torch.set_num_threads(2)
    started = time.time()
    x, y, x_test, y_test = pydoc_split(0, CONTEXT)
    base = llama(seed=0)
    train(base, batches(x, y, PRETRAIN, seed=1), LR, warmup=100)
    extra = batches(x, y, EXTRA, seed=2)
    example = {"input_ids": x[:2]}
    results: dict = {"label": label, "package": str(pathlib.Path(lightning_compress.__file__).parent)}
    results["pretrain_steps"], results["extra_steps"], results["prune_steps"] = PRETRAIN, EXTRA, PRUNE
    dense_macs = None
    for arm in ("dense", "macs50", "macs50_mlp_int8"):
        model = quantized(base, readers_per_channel=arm == "macs50_mlp_int8")
        if arm == "dense":
            train(model, extra, LR / 10)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_pruned(model, extra, LR / 10, example)
        ppl = perplexity(model, x_test, y_test)
        parameters = sum(p.numel() for n, p in model.named_parameters() if "_fake_quant" not in n)
        report = compact(model, example) if arm != "dense" else None
        if report is not None:
            dense_macs = report.macs_before
        with tempfile.TemporaryDirectory() as tmp:
            file = save_compressed(model, pathlib.Path(tmp) / "m.lcz")
        results[arm] = {
            "ppl": ppl,
            "ppl_after_compact": perplexity(model, x_test, y_test) if report is not None else ppl,
            "macs": report.macs_after if report is not None else None,
            "params_before_compact": parameters,
            "params": report.params_after if report is not None else parameters,
            "zero_channels_kept": sum(report.kept_for_quant_groups.values()) if report is not None else 0,
            "file_bytes": file.file_bytes,
        }
        print(arm, results[arm], flush=True)
    results["dense_macs"] = dense_macs
    for arm in ("macs50", "macs50_mlp_int8"):
        results[arm]["macs_fraction"] = results[arm]["macs"] / dense_macs
        results[arm]["params_fraction"] = results[arm]["params"] / results["dense"]["params"]
    results["batch"] = BATCH
    results["wall_s"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"grouped_channels_{label}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="names the results file (grouped_channels_LABEL.json)")
    main(parser.parse_args().label)
