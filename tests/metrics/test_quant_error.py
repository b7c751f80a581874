import pytest
import torch

from lightning_compress.metrics import QuantizationError, quantization_error


@pytest.mark.parametrize("seed", [0, 1])
def test_class_and_functional_twin_agree_with_a_reference(seed):
    g = torch.Generator().manual_seed(seed)
    pairs = [(x, torch.round(x * 4) / 4) for x in (torch.randn(n, generator=g) for n in (7, 30))]
    metric = QuantizationError()
    for reference, quantized in pairs:
        metric.update(reference, quantized)
    expected = sum(float(((r - q) ** 2).sum()) for r, q in pairs) / sum(float((r**2).sum()) for r, _ in pairs)
    assert metric.compute().item() == pytest.approx(expected)
    reference, quantized = pairs[0]
    assert quantization_error(reference, quantized).item() == pytest.approx(
        float(((reference - quantized) ** 2).sum() / (reference**2).sum())
    )


def test_zero_reference_is_zero_when_exact_and_one_otherwise():
    assert quantization_error(torch.zeros(3), torch.zeros(3)).item() == 0.0
    assert quantization_error(torch.zeros(3), torch.ones(3)).item() == 1.0


def test_sparse_inputs_are_read_as_their_dense_values():
    reference = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    quantized = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected = quantization_error(reference, quantized)
    assert quantization_error(reference.to_sparse(), quantized.to_sparse_csr()).item() == pytest.approx(expected.item())


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match=r"`reference` and `quantized` must be torch\.Tensors"):
        quantization_error([1.0], torch.ones(1))
    with pytest.raises(ValueError, match=r"differ in shape"):
        QuantizationError().update(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"`quantized` is on the meta device"):
        quantization_error(torch.ones(2), torch.empty(2, device="meta"))
