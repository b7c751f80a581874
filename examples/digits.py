"""Fine-tune a CNN on sklearn digits while pruning it to 90% sparsity.

Train dense, then fine-tune with ``IterativePruning`` (Taylor importance, cubic schedule); watch
``compress/sparsity`` and ``val_acc`` in TensorBoard (``tensorboard --logdir lightning_logs``).

    python examples/digits.py [--sparsity 0.9] [--epochs 20] [--fast]
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import IterativePruning, sparsity
from lightning_compress.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9, help="target fraction of zero weights")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs with pruning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a 10-second smoke run")
    args = parser.parse_args()
    if args.fast:
        args.dense_epochs, args.epochs = 2, 4

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(seed=args.seed)
    model = DigitsClassifier()

    def make_trainer(epochs: int, name: str, callbacks: list[pl.Callback]) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs,
            callbacks=callbacks,
            logger=TensorBoardLogger("lightning_logs", name=name),
            enable_checkpointing=False,
            accelerator="cpu",
        )

    dense_trainer = make_trainer(args.dense_epochs, "digits_dense", [])
    dense_trainer.fit(model, data)
    dense_acc = dense_trainer.test(model, data, verbose=False)[0]["test_acc"]
    dense_sparsity = sparsity(model)

    # prune during the first 3/4 of fine-tuning, recover during the rest
    end = max(1, (3 * args.epochs) // 4)
    pruning = IterativePruning(args.sparsity, importance="taylor", start_epoch=0, end_epoch=end)
    prune_trainer = make_trainer(args.epochs, "digits_pruned", [pruning])
    prune_trainer.fit(model, data)
    pruned_acc = prune_trainer.test(model, data, verbose=False)[0]["test_acc"]

    print()
    print(f"{'':<28}{'dense':>10}{'pruned':>10}")
    print(f"{'test accuracy':<28}{100 * dense_acc:>9.2f}%{100 * pruned_acc:>9.2f}%")
    print(f"{'sparsity (Linear+Conv)':<28}{100 * dense_sparsity:>9.1f}%{100 * sparsity(model):>9.1f}%")
    print(f"TensorBoard logs: tensorboard --logdir {prune_trainer.logger.save_dir}")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
