"""What the channel groups' value trials (session 18, ``core/group_check.py``) add to tracing a model for channels.

``granularity="channel"`` traces the model once at setup (``channel_structure``: the dependency graph, one
shape-only forward per group on the meta device, then the value trials on a float32 copy: half of every group's
channels zeroed, then removed, outputs compared). This times the whole trace and the value trials alone, on
``transformers`` models built from configs with random weights and on the demo ResNet, one CPU thread, and says
which groups the trials left whole (on these models a person would prune every group the graph finds).

    python benchmarks/group_check_cost.py          # ~1 min
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from common import no_arguments
from torch import nn

from lightning_compress.core.group_check import faithful_groups, removable_groups
from lightning_compress.core.rules import channel_structure
from lightning_compress.core.selection import select_targets
from lightning_compress.core.structure import build_channel_groups
from lightning_compress.demo import DigitsResNet


def models() -> Iterator[tuple[str, nn.Module, Any]]:
    import transformers as hf

    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 1000, (2, 32))}
    bert = hf.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=1000
    )
    yield "BERT, 4 layers, hidden 256", hf.BertForSequenceClassification(bert), ids
    for hidden, layers, heads, kv, mlp, vocab in ((256, 4, 8, 2, 688, 1000), (1024, 8, 16, 4, 2816, 32000)):
        llama = hf.LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=mlp,
            vocab_size=vocab,
        )
        name = f"Llama (GQA {heads}/{kv}), {layers} layers, hidden {hidden}"
        yield name, hf.LlamaForCausalLM(llama), ids
    vit = hf.ViTConfig(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=4,
        num_labels=10,
    )
    yield "ViT, 4 layers, hidden 192", hf.ViTForImageClassification(vit), {"pixel_values": torch.randn(2, 3, 32, 32)}
    resnet = hf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    yield (
        "ResNet (transformers), 4 stages",
        hf.ResNetForImageClassification(resnet),
        {"pixel_values": torch.randn(2, 3, 64, 64)},
    )
    yield "DigitsResNet (demo)", DigitsResNet(), torch.randn(2, 1, 8, 8)


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    print("| model | parameters | channel trace (s) | value trials (s) | groups kept by the value trials |")
    print("|---|---|---|---|---|")
    for name, model, inputs in models():
        model.eval()
        targets = select_targets(model, None, None, module_tensors=True)
        start = time.perf_counter()
        channel_structure(model, targets, inputs)
        whole = time.perf_counter() - start
        groups, _ = build_channel_groups(model, inputs, producers={t.name for t in targets})
        groups, _ = removable_groups(model, inputs, groups)
        start = time.perf_counter()
        kept, left = faithful_groups(model, inputs, groups)
        trials = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        note = f"{len(kept)} of {len(groups)}" + (f" (left whole: {sorted(left)})" if left else "")
        print(f"| {name} | {params:,} | {whole:.2f} | {trials:.2f} | {note} |", flush=True)


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
