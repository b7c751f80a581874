"""One pruning event on a ~1B-parameter Llama sharded by FSDP2 over 2 CPU processes, against one process.

A ``transformers`` Llama config (hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, vocabulary 128,256
tied: about 1.24B parameters, 0.97B in the decoder's Linear layers, which are pruned) is built on the meta device,
``fully_shard``-ed per decoder layer (``sharded``) or not (``single``), materialized on CPU with random weights,
and pruned by :class:`~lightning_compress.IterativePruner` (global magnitude) in two events: to 25% (the masks are
created) then to 50% (masks exist). Each run is a fresh process group; for every event it reports the wall time
and the peak resident memory above what the process held just before the event (the shard, and the masks after
the first event), sampled every millisecond.

    python benchmarks/fsdp_event.py            # ~5 minutes, 2 cores, ~12 GB of RAM at the peak
    python benchmarks/fsdp_event.py --layers 2  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


class PeakSampler:
    """Highest resident memory seen while the block runs (a thread reads /proc every millisecond)."""

    def __enter__(self) -> PeakSampler:
        self.before = self.peak = rss_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gb())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gb())


def build(layers: int, sharded: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(dist.get_rank() if sharded else 0)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.normal_(0.0, 0.02, generator=generator)
    return model


def worker(rank: int, world: int, layers: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if world > 1 else 2)  # two cores in all: one per process, or both for one process
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lightning_compress import IterativePruner

    model = build(layers, sharded=world > 1)
    shard_gb = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()) / 1e9
    # the output head is the embedding's tied twin in this config (materializing on CPU unties it): left dense
    pruner = IterativePruner(model, 0.5, total_steps=2, every_n_steps=1, schedule="linear", exclude="lm_head")
    weights = sum(t.numel for t in pruner.targets)
    events = []
    for step in (1, 2):
        dist.barrier()
        with PeakSampler() as memory:
            start = time.perf_counter()
            changed = pruner.advance_to(step)  # the event itself (what the callback calls between steps)
            seconds = time.perf_counter() - start
        events.append({"step": step, "changed": changed, "seconds": seconds, "sparsity": pruner.masked_sparsity(),
                       "rss_before_gb": memory.before, "peak_above_gb": memory.peak - memory.before})  # fmt: skip
    result = {"world": world, "rank": rank, "pruned_weights": weights, "params_held_gb": shard_gb, "events": events}
    pathlib.Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(world: int, layers: int, port: int, directory: pathlib.Path) -> list[dict]:
    paths = [str(directory / f"fsdp_event_world{world}_rank{r}.json") for r in range(world)]
    context = mp.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, world, layers, port, paths[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a worker of the world={world} run failed ({p.exitcode})")
    return [json.loads(pathlib.Path(p).read_text()) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/fsdp_event.json")
    args = parser.parse_args()
    directory = pathlib.Path(args.out).parent
    directory.mkdir(parents=True, exist_ok=True)
    runs = {"single": run(1, args.layers, 29511, directory), "sharded": run(2, args.layers, 29512, directory)}
    pathlib.Path(args.out).write_text(json.dumps(runs, indent=1))
    for path in directory.glob("fsdp_event_world*_rank*.json"):
        path.unlink()
    single = runs["single"][0]
    print(f"pruned weights: {single['pruned_weights'] / 1e9:.3f} B")
    for step in (0, 1):
        one = single["events"][step]
        ranks = [r["events"][step] for r in runs["sharded"]]
        worst = max(r["seconds"] for r in ranks)
        held = runs["sharded"][0]["params_held_gb"]
        print(
            f"event {step + 1} (to {one['sparsity']:.2f}): one process {one['seconds']:.2f} s, "
            f"+{one['peak_above_gb']:.3f} GB; FSDP2 x2 {worst:.2f} s ({worst / one['seconds']:.2f}x), "
            f"+{max(r['peak_above_gb'] for r in ranks):.3f} GB per rank (held {held:.2f} GB)"
        )


if __name__ == "__main__":
    main()
