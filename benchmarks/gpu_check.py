"""The GPU checks of issue 15 (item 5), prepared to run in one go when a session is lent a GPU machine.

```bash
bash benchmarks/gpu_check.sh        # on the GPU machine: the test suite on CUDA, then this script
python benchmarks/gpu_check.py --cpu   # here: the same FSDP2 smoke on CPU (fp32 and bf16), 2:4 skipped
```

1. **FSDP2 with bf16 on one GPU** (a smoke test): a LightningModule that applies ``fully_shard`` in
   ``configure_model``, ``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)``,
   ``precision="bf16-true"``: element pruning with int8 QAT in one fit, and channel pruning with its compacted
   ``.onnx`` export. Each case reports whether it finished, the sparsity reached, the validation loss and
   the parameters' dtype, or the error.
2. **2:4 speed** of ``torch.sparse.to_sparse_semi_structured`` on the MLP matmuls of a BERT-base-width model
   (768 -> 3072 -> 768, 1,024 and 4,096 tokens) and of a Llama-7B-width one (4,096 -> 11,008 -> 4,096, 8,192
   tokens, where a product takes milliseconds and the Python dispatch of the tensor subclass no longer hides the
   kernel), fp16 and bf16, the weights pruned 2:4 by ``prune_``: the time of ``F.linear`` with the dense and the
   semi-structured weight (CUDA events, median of 5 runs of 50), the ratio, and the largest difference of the
   outputs relative to the largest dense output. ``gpu_check.sh`` runs this script before anything else starts,
   so that the timings are taken on an idle machine.

Everything is written to ``--out`` (JSON) and printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import statistics
import sys
import tempfile
import traceback
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import IterativePruning, QuantizationAwareTraining, prune_


class ShardedMLP(pl.LightningModule):
    """A 64-256-256-10 MLP on random blobs; every Linear its own ``fully_shard`` unit."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        self.example_input_array = torch.zeros(2, 64)
        generator = torch.Generator().manual_seed(0)
        centers = torch.randn(10, 64, generator=generator) * 2
        labels = torch.randint(0, 10, (2048,), generator=generator)
        self.data = TensorDataset(centers[labels] + torch.randn(2048, 64, generator=generator), labels)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).float(), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=256)


def fsdp2_smoke(accelerator: str, precision: str, out_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Two sharded fits on one device: element pruning + int8 QAT, and channel pruning with a compacted ONNX export."""
    from lightning_compress.core.sharding import full

    cases = {
        "element+int8": lambda: [IterativePruning(0.5, end_epoch=2), QuantizationAwareTraining(8, 8, start_epoch=1)],
        "channel+onnx": lambda: [
            IterativePruning(0.5, granularity="channel", end_epoch=2, export_path=str(out_dir / "channel.onnx"))
        ],
    }
    results = []
    for name, callbacks in cases.items():
        record: dict[str, Any] = {"case": name, "accelerator": accelerator, "precision": precision}
        try:
            pl.seed_everything(0, verbose=False)
            model = ShardedMLP()
            trainer = pl.Trainer(
                accelerator=accelerator, devices=1, precision=precision,  # type: ignore[arg-type]
                strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_epochs=3,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=callbacks(),
            )  # fmt: skip
            trainer.fit(model)
            weights = [full(layer.weight) for layer in model.net if isinstance(layer, nn.Linear)]
            zeros = sum(int((w == 0).sum()) for w in weights)
            record.update(
                finished=True,
                sparsity=zeros / sum(w.numel() for w in weights),
                val_loss=float(trainer.callback_metrics["val_loss"]),
                dtype=str(weights[0].dtype),
                exported=(out_dir / "channel.onnx").is_file() if name == "channel+onnx" else None,
            )
        except Exception as err:  # a smoke test: report every case
            record.update(finished=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        results.append(record)
    return results


def _time(fn: Any, repeats: int = 5, iters: int = 50) -> float:
    """Median milliseconds per call (CUDA events) after warm-up, launched from Python."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _time_graph(fn: Any, repeats: int = 5, iters: int = 50) -> float | None:
    """The same, with ``iters`` calls captured once in a CUDA graph and replayed: the kernels' time, without the
    Python dispatch of each call (the semi-structured weight is a tensor subclass dispatched in Python). None when
    the call cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except Exception:  # a kernel or allocation that capture does not allow
        torch.cuda.synchronize()
        return None
    return _time(graph.replay, repeats, 1) / iters


def semi_structured_speed() -> list[dict[str, Any]]:
    """Dense against 2:4 semi-structured ``F.linear`` on BERT-base's MLP shapes."""
    from torch.sparse import to_sparse_semi_structured

    results = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_features, in_features, token_counts in (
            (3072, 768, (1024, 4096)),
            (768, 3072, (1024, 4096)),
            (11008, 4096, (8192,)),
            (4096, 11008, (8192,)),
        ):
            layer = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
            prune_(layer, 0.5, granularity="2:4")  # our 2:4 masks: two of every four consecutive inputs
            weight = layer[0].weight.detach().to("cuda", dtype)
            sparse = to_sparse_semi_structured(weight)
            for tokens in token_counts:
                x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
                dense_ms = _time(lambda x=x, w=weight: F.linear(x, w))
                sparse_ms = _time(lambda x=x, w=sparse: F.linear(x, w))
                reference = F.linear(x, weight)
                diff = (reference - F.linear(x, sparse)).abs().max().item() / reference.abs().max().item()
                row = {"dtype": str(dtype), "weight": [out_features, in_features], "tokens": tokens}
                row.update(dense_ms=dense_ms, semi_structured_ms=sparse_ms, speedup=dense_ms / sparse_ms)
                dense_graph = _time_graph(lambda x=x, w=weight: F.linear(x, w))
                sparse_graph = _time_graph(lambda x=x, w=sparse: F.linear(x, w))
                row.update(dense_graph_ms=dense_graph, semi_structured_graph_ms=sparse_graph)
                if dense_graph and sparse_graph:
                    row["graph_speedup"] = dense_graph / sparse_graph
                results.append({**row, "max_rel_diff": diff})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run here: the FSDP2 smoke on CPU, no 2:4 timing")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--only-2-4", action="store_true", help="the 2:4 timings alone (no FSDP2 smoke)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu for the dry run")
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
    accelerator = "cpu" if args.cpu else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        report["fsdp2"] = (
            []
            if args.only_2_4
            else [
                *fsdp2_smoke(accelerator, "bf16-true", pathlib.Path(tmp)),
                *(fsdp2_smoke(accelerator, "32-true", pathlib.Path(tmp)) if args.cpu else []),
            ]
        )
    report["semi_structured"] = [] if args.cpu else semi_structured_speed()
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    for case in report["fsdp2"]:
        status = (
            f"sparsity {case['sparsity']:.3f}, val_loss {case['val_loss']:.4f}, {case['dtype']}"
            if case["finished"] and not math.isnan(case["val_loss"])
            else case.get("error", "NaN loss")
        )
        print(f"FSDP2 {case['case']} {case['precision']} on {case['accelerator']}: {status}")
    for row in report["semi_structured"]:
        print(
            f"2:4 {row['dtype']} W{row['weight']} x {row['tokens']} tokens: dense {row['dense_ms']:.4f} ms, "
            f"semi-structured {row['semi_structured_ms']:.4f} ms, {row['speedup']:.2f}x, "
            f"rel. diff {row['max_rel_diff']:.2e}; "
            + (
                f"in CUDA graphs: dense {row['dense_graph_ms']:.4f} ms, semi-structured "
                f"{row['semi_structured_graph_ms']:.4f} ms, {row['graph_speedup']:.2f}x"
                if "graph_speedup" in row
                else "not capturable in a CUDA graph"
            )
        )


if __name__ == "__main__":
    main()
