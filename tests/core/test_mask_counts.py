import pytest
import torch
from torch import nn

from lightning_compress.core.mask_counts import kept_count, zero_counts
from lightning_compress.core.selection import select_targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_counts_count_exact_zeros_signed_zero_included_nan_and_tiny_values_not(dtype):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, -0.0, 1.0, float("nan")], [1e-3, 0.0, -2.0, float("inf")],
                                            [0.0, 0.0, 0.0, 5.0]]))  # fmt: skip
        model[1].weight.fill_(-0.0)
    assert zero_counts(select_targets(model)) == {"0.weight": 6, "1.weight": 6}


def test_kept_count_reads_bool_and_float_masks():
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    assert kept_count(mask) == 2 == kept_count(mask.bool()) == kept_count(mask.to(torch.bfloat16))
