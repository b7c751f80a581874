"""LightningCLI with the compression callbacks configured from YAML or the command line.

    python examples/cli.py fit --config examples/compress.yaml
    python examples/cli.py fit --trainer.max_epochs=20 \\
        --trainer.callbacks+=lightning_compress.IterativePruning --trainer.callbacks.target_sparsity=0.9 \\
        --trainer.callbacks+=lightning_compress.QuantizationAwareTraining --trainer.callbacks.start_epoch=15
"""

from lightning.pytorch.cli import LightningCLI

from lightning_compress.demo import DigitsClassifier, DigitsDataModule


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsDataModule)


if __name__ == "__main__":
    main()
