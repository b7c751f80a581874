"""Models inside wrappers: a compiled module's plain names and code, a wrapper's inner state, all put back after."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_compress.core.wrappers import eager, is_compiled, state_root, uncompiled


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_uncompiled_swaps_compiled_submodules_for_their_modules_and_puts_them_back():
    inner = _net()
    compiled = torch.compile(inner)
    model = nn.Sequential(compiled, nn.Linear(2, 1))
    assert is_compiled(compiled) and not is_compiled(inner)
    with uncompiled(model) as plain:
        assert plain is model
        assert model[0] is inner
        assert "0.0.weight" in dict(model.named_parameters())
    assert model[0] is compiled
    assert "0._orig_mod.0.weight" in dict(model.named_parameters())


def test_uncompiled_keeps_a_replacement_made_meanwhile():
    model = nn.Sequential(torch.compile(_net()))
    replacement = nn.Linear(4, 2)
    with uncompiled(model):
        model[0] = replacement
    assert model[0] is replacement


def test_uncompiled_hands_back_the_module_a_compiled_model_wraps():
    inner = _net()
    with uncompiled(torch.compile(inner)) as plain:
        assert plain is inner


def test_eager_runs_the_modules_own_forward_meanwhile_and_puts_the_compiled_one_back():
    from lightning.pytorch.utilities.compile import from_compiled

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = from_compiled(torch.compile(Net()))  # what `Trainer.fit` does to a compiled LightningModule
    compiled_forward = vars(model)["forward"]
    with eager(model):
        assert vars(model)["forward"] == Net.forward.__get__(model)
    assert vars(model)["forward"] is compiled_forward
    model.compile()  # compiled in place: its compiled call is set aside meanwhile
    assert model._compiled_call_impl is not None
    with eager(model):
        assert model._compiled_call_impl is None
    assert model._compiled_call_impl is not None


def test_state_root_is_the_module_whose_names_a_fresh_instance_uses():
    class Wrapper(nn.Module):  # keys its state without its inner module's prefix, like Fabric's wrapper
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            return self.inner.state_dict(*args, **kwargs)

    inner = _net()
    assert state_root(inner) is inner
    assert state_root(Wrapper(inner)) is inner
    assert state_root(torch.compile(inner)) is inner
    plain_holder = nn.Sequential(inner)  # its own names carry the prefix: it is the root
    assert state_root(plain_holder) is plain_holder


def test_uncompiled_sees_through_activation_checkpoint_wrappers_and_wraps_a_replacement():
    """Trial GB: torchtune's activation checkpointing wraps blocks in `checkpoint_wrapper`; their layers were named
    `..._checkpoint_wrapped_module...`, and a compressed file loaded into no model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    block, head = _net(), nn.Linear(2, 1)
    wrapped_block, wrapped_head = checkpoint_wrapper(block), checkpoint_wrapper(head)
    model = nn.Sequential(wrapped_block, torch.compile(wrapped_head))
    replacement = nn.Linear(4, 2)
    with uncompiled(model) as plain:
        assert plain is model and model[0] is block and model[1] is head  # through both wrappers
        assert {"0.0.weight", "1.weight"} <= dict(model.named_parameters()).keys()
        model[0] = replacement
    assert model[0] is wrapped_block and next(wrapped_block.children()) is replacement  # wrapped again
    assert is_compiled(model[1]) and "1._orig_mod._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
