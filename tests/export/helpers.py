"""Small compressed models for the export tests, built without a Trainer."""

import torch
from torch import nn

from lightning_compress import QuantConfig, convert_to_qat, prune_
from lightning_compress.core.qat import quantizers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CrossedTie(nn.Module):
    """A Linear and a ``transformers`` Conv1D given one Parameter: the Conv1D stores it (in, out), so its output
    channels lie along the other axis (the two cannot share a weight quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a = nn.Linear(8, 16)
        self.b = Conv1D(8, 16)  # weight (16, 8): (in, out)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


DEFAULT = QuantConfig()


def compressed_net(sparsity: float = 0.9, config: QuantConfig | None = DEFAULT, seed: int = 0) -> Net:
    """A pruned (and, unless ``config`` is None, fake-quantized and calibrated) Net in eval mode."""
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # BN statistics that are not the defaults
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
    if sparsity:
        prune_(net, sparsity, importance="magnitude")  # the files in data/ were written with magnitude masks
    if config is not None:
        convert_to_qat(net, config)
        for _, q in quantizers(net):
            q.observer_enabled = True
        net.train()
        with torch.no_grad():
            for _ in range(4):
                net(torch.rand(16, 1, 8, 8))
        for _, q in quantizers(net):
            q.fake_quant_enabled = True
    return net.eval()


def inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class Residual(nn.Module):
    """A residual block whose second convolution's output meets the skip in an `Add`, then global pooling: two
    quantized convolutions whose outputs no quantized layer reads first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = self.c2(torch.relu(self.c1(h)))
        return self.fc(torch.relu(y + h).mean((2, 3)))


def ort_kernels(path) -> dict[str, int]:
    """The operators onnxruntime runs the file with, after its own fusions."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(node.op_type for node in onnx.load(str(path) + ".optimized").graph.node))
