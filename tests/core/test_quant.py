"""The one rounding rule: quantize/dequantize equal torch's fake-quant ops and LSQ's forward, bit for bit."""

import pytest
import torch

from lightning_compress.core.quant import (
    affine_qparams,
    dequantize,
    fake_quantize,
    int_range,
    lsq_fake_quantize,
    power_of_two_scale,
    quantize,
    symmetric_scale,
)


def tie_heavy(seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 17, generator=g) * 3
    x[:, :8] = (torch.randint(-40, 40, (32, 8), generator=g) + 0.5) * scale.reshape(-1, 1)  # exact .5 ties
    return x


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_symmetric_matches_torch_and_lsq(seed, bits):
    qmin, qmax = int_range(bits, True)
    scale = torch.rand(32, generator=torch.Generator().manual_seed(seed)) * 0.1 + 1e-3
    x = tie_heavy(seed, scale)
    zp = torch.zeros(32, dtype=torch.int32)
    ours = dequantize(quantize(x, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
    assert torch.equal(ours, fake_quantize(x, scale, zp, qmin, qmax, axis=0))
    assert torch.equal(ours, lsq_fake_quantize(x, scale.clone().requires_grad_(), zp, qmin, qmax, axis=0).detach())


@pytest.mark.parametrize("seed", range(5))
def test_per_tensor_affine_matches_torch(seed):
    x = tie_heavy(seed, torch.full((32,), 0.02)) + 1.0
    scale, zp = affine_qparams(x.min(), x.max(), 0, 255)
    q = quantize(x, scale, zp, 0, 255)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 255
    assert torch.equal(dequantize(q, scale, zp), fake_quantize(x, scale, zp, 0, 255))


def test_zero_is_exact_in_every_mode():
    x = torch.tensor([-3.0, 0.0, 0.0, 5.0])
    scale, zp = affine_qparams(x.min(), x.max(), 0, 255)
    assert fake_quantize(x, scale, zp, 0, 255)[1] == 0.0
    _, qmax = int_range(4, True)
    s = symmetric_scale(x.abs().max(), qmax)
    assert fake_quantize(x, s, torch.tensor(0, dtype=torch.int32), -8, 7)[1] == 0.0
    # a range that excludes 0 is widened to include it
    scale, zp = affine_qparams(torch.tensor(2.0), torch.tensor(3.0), 0, 255)
    assert int(zp) == 0 and dequantize(torch.tensor([0]), scale, zp).item() == 0.0


def test_power_of_two_is_fixed_point():
    w = torch.tensor([0.3, -0.74, 0.05])
    shift, scale = power_of_two_scale(w.abs().max(), 127)
    assert int(shift) == 7 and float(scale) == 2.0**-7  # 0.74 * 128 = 94.7 <= 127 < 0.74 * 256
    q = quantize(w, scale, torch.tensor(0, dtype=torch.int32), -128, 127)
    assert torch.equal(q, torch.round(w * 2**7).to(torch.int32))  # W_int = round(W * 2^p)


def test_lsq_gradients():
    scale = torch.tensor([0.1], requires_grad=True)
    x = torch.tensor([[0.04, 0.26, 10.0, -10.0]], requires_grad=True)
    out = lsq_fake_quantize(x, scale, torch.zeros(1, dtype=torch.int32), -8, 7, axis=0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))  # STE inside, 0 where clipped
    # d/ds: (round(u) - u) inside; qmax and qmin at the clips, times the LSQ gradient scale
    expected = ((0 - 0.4) + (3 - 2.6) + 7 + (-8)) / (4 * 8) ** 0.5
    assert scale.grad.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is outside 2..8"):
        int_range(bits, True)


@pytest.mark.parametrize("axis", [None, 0])
def test_straight_through_gradient_matches_torch(axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 9, generator=g) * 4
    scale = torch.rand(16, generator=g) * 0.05 + 0.01 if axis == 0 else torch.tensor(0.03)
    zp = torch.zeros(16, dtype=torch.int32) if axis == 0 else torch.tensor(3, dtype=torch.int32)
    ours_x = x.clone().requires_grad_()
    theirs_x = x.clone().requires_grad_()
    weights = torch.randn(16, 9, generator=g)
    (fake_quantize(ours_x, scale, zp, -8, 7, axis) * weights).sum().backward()
    if axis is None:
        theirs = torch.fake_quantize_per_tensor_affine(theirs_x, float(scale), int(zp), -8, 7)
    else:
        theirs = torch.fake_quantize_per_channel_affine(theirs_x, scale, zp, 0, -8, 7)
    (theirs * weights).sum().backward()
    assert torch.equal(ours_x.grad, theirs_x.grad)
    assert (ours_x.grad == 0).any()  # some entries were clipped
