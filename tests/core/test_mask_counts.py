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


def test_pruned_count_rounds_halves_up_and_ignores_floating_point_noise():
    from lightning_compress.core.mask_counts import pruned_count

    assert [pruned_count(0.5, n) for n in (2, 3, 4, 5, 7)] == [1, 2, 2, 3, 4]  # round() gave 2 of 5 and 4 of 7
    assert pruned_count(0.7, 5) == 4  # 0.7 * 5 is 3.4999999999999996
    assert pruned_count(0.3, 5) == 2 and pruned_count(0.0, 9) == 0 and pruned_count(1.0, 9) == 9


def test_layer_scope_channels_prune_the_same_share_of_odd_and_even_widths():
    """Trial DY: channel counts rounded half to even, so 0.5 of a layer kept 1 of 3 channels but 3 of 5."""
    from lightning_compress import prune_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 7), nn.ReLU(),
                          nn.Linear(7, 2))  # fmt: skip
    masks = prune_(model, 0.5, granularity="channel", scope="layer", example_inputs=torch.randn(4, 6))
    kept = {name: int(mask.reshape(mask.shape[0], -1).any(dim=1).sum()) for name, mask in masks.items()
            if name.endswith("weight") and name != "6.weight"}  # fmt: skip
    assert kept == {"0.weight": 1, "2.weight": 2, "4.weight": 3}
