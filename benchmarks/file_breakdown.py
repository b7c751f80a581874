"""Where the bytes of a compressed file go: one zoo pair, one seed, pruned with the defaults plus int8 QAT.

Trains the pair as ``zoo.py``'s ``defaults+int8`` does (``--scale power_of_two``: ``defaults+int8-pow2``;
``--quantize-bias``: the ``-bias`` variants), writes it with ``save_compressed`` and prints the file against
``torch.save(state_dict)`` and each part of the file (manifest, positions, codes, float data) LZMA-compressed on
its own.

    python benchmarks/file_breakdown.py mlp-digits 0.95 --scale power_of_two      # ~10 s
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import pathlib
import tempfile

import lightning.pytorch as pl
import torch
import zoo

from lightning_compress import IterativePruning, QuantizationAwareTraining, save_compressed
from lightning_compress.export.container import FILTERS, read_container
from lightning_compress.export.records import SECTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", choices=list(zoo.PAIRS))
    parser.add_argument("target", type=float)
    parser.add_argument("--scale", default="minmax", choices=["minmax", "power_of_two"])
    parser.add_argument("--quantize-bias", action="store_true", help="biases on the accumulator grid (int32 codes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pair = zoo.PAIRS[args.pair]
    split = pair.data(args.seed)
    pl.seed_everything(args.seed, verbose=False)
    module = zoo.ZooModule(pair.model(), pair.lm)
    start, end = zoo.window(zoo.EPOCHS)
    train_loader, _ = zoo.loaders(split, args.seed, pair.lm)
    callbacks = [
        IterativePruning(args.target, start_epoch=start, end_epoch=end),
        QuantizationAwareTraining(8, 8, start_epoch=end, scale=args.scale, quantize_bias=args.quantize_bias),
    ]
    zoo.quiet_trainer(zoo.EPOCHS, callbacks).fit(module, train_loader)

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.lcz"
        report = save_compressed(module, path)
        manifest, body = read_container(path, 1 << 30, 1 << 24, lambda manifest, _: sum(manifest["sections"]))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)

    def packed(data: bytes) -> int:
        return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=FILTERS))

    setting = f"scale={args.scale!r}, quantize_bias={args.quantize_bias}"
    print(f"{args.pair} at {args.target:.0%}, {setting}, seed {args.seed}")
    print(f"file {report.file_bytes} B, torch.save {buffer.tell()} B: {buffer.tell() / report.file_bytes:.1f}x")
    text = json.dumps(manifest, separators=(",", ":")).encode()
    print(f"  manifest: {len(text)} B raw, {packed(text)} B alone after LZMA")
    offset = 0
    for name, size in zip(SECTIONS, manifest["sections"], strict=True):
        print(f"  {name}: {size} B raw, {packed(body[offset : offset + size])} B alone after LZMA")
        offset += size


if __name__ == "__main__":
    main()
