import pytest
import torch

from lightning_compress.metrics import Sparsity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_reference_count(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.6) for n in (5, 17, 100)]
    metric = Sparsity()
    for t in tensors:
        metric.update(t)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    total = sum(t.numel() for t in tensors)
    assert metric.compute().item() == pytest.approx(zeros / total)


def test_empty_is_zero_and_reset_works():
    metric = Sparsity()
    assert metric.compute().item() == 0.0
    metric.update(torch.zeros(4))
    assert metric.compute().item() == 1.0
    metric.reset()
    assert metric.compute().item() == 0.0


def test_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"`tensor` must be a torch\.Tensor"):
        Sparsity().update([0.0, 1.0])
