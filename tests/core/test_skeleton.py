import copy

import pytest
import torch
from torch import nn

from lightning_compress.core.skeleton import materialize_, meta_copy


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # one Parameter under two names
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * self.scale
        return self.head(self.norm(hidden.flatten(0, 1)).view_as(hidden))


def test_meta_copy_costs_no_weight_memory_and_materialize_gives_a_model_to_load_into():
    torch.manual_seed(0)
    model = Tied().eval()
    copy = meta_copy(model, buffers=False)
    assert all(p.is_meta for p in copy.parameters())
    assert copy.head.weight is copy.embed.weight  # still tied
    assert torch.equal(copy.scale, model.scale) and not copy.norm.running_mean.is_meta  # buffers with values
    materialize_(copy, "cpu", {"embed.weight": torch.bfloat16})
    assert copy.head.weight is copy.embed.weight and copy.embed.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    assert "scale" not in copy.state_dict()  # still non-persistent
    copy.load_state_dict({k: v.to(torch.bfloat16) if k == "embed.weight" else v for k, v in model.state_dict().items()})
    copy.float()
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(copy.eval()(ids), model(ids), rtol=1e-2, atol=1e-2)  # bf16-rounded weights


def test_meta_copy_shares_what_it_is_told_to_share_and_copies_the_rest():
    model = Tied()
    payload = object()
    model.payload = payload
    model.settings = {"a": 1}
    copy = meta_copy(model, share=[payload])
    assert copy.payload is payload
    assert copy.settings == model.settings and copy.settings is not model.settings
    assert all(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    with pytest.raises(RuntimeError, match="meta tensors"):
        copy.embed.weight.sum().item()


class _CachesInEval(nn.Module):
    """Caches a tensor computed from a parameter in eval mode, as LeViT caches its attention biases."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 4)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cache.setdefault(str(x.device), self.scale * 2)
            return self.fc(x) * self.cache[str(x.device)]
        return self.fc(x) * self.scale * 2


def test_copies_hold_tensors_a_forward_cached_with_a_gradient_history_detached():
    """Regression (LeViT, a new-user trial): channel tracing ran the eval forward, which cached a non-leaf
    tensor; `compact` and the export template deep-copy the model and failed on it."""
    from lightning_compress.core.skeleton import deep_copy

    model = _CachesInEval().eval()
    model(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    twin = deep_copy(model)
    assert not twin.cache["cpu"].requires_grad and torch.equal(twin.cache["cpu"], model.cache["cpu"])
    assert meta_copy(model).fc.weight.is_meta
