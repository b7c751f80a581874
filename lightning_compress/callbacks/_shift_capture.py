"""``QuantizationAwareTraining(shift_search=True)``'s validation side: the inputs of each layer captured in the
validation of the calibration epoch, and the power-of-two shifts chosen on them (the seed article's fixed point: the
shift p of ``W_int = round(W * 2^p)`` chosen on validation data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..core.fake_quant import FakeQuantizer
from ..core.sharding import unsharded
from ..core.shift_search import search_power_of_two_shifts
from ._validation import StrategyCollectives


class ShiftCapture:
    """Up to ``batches`` validation inputs per layer, captured by forward pre-hooks between :meth:`start` and
    :meth:`stop`; :meth:`search` chooses every layer's shifts on them."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self._inputs: dict[str, list[Tensor]] = {}
        self._hooks: list[Any] = []

    def start(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Capture the inputs ``layers`` receive from now on (a new validation: earlier captures are dropped)."""
        self._inputs = {name: [] for name, _ in layers}
        for name, module in layers:

            def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                stored = self._inputs[name]
                if len(stored) < self.batches and args and isinstance(args[0], Tensor):
                    stored.append(args[0].detach())

            self._hooks.append(module.register_forward_pre_hook(hook))

    def stop(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def captured_none(self, layers: Sequence[tuple[str, nn.Module]]) -> bool:
        """Whether no validation batch reached any of ``layers`` since :meth:`start`."""
        return not any(self._inputs.get(name) for name, _ in layers)

    def search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[tuple[str, nn.Module]]
    ) -> dict[str, tuple[int, int | None]]:
        """Each captured layer's (weight shift, input shift), logged; the layers validation never called are said
        (their shifts come from the ranges observed in training). Drops the captured inputs."""
        # a layer tied to a searched one, with no input quantizer of its own (T5's `shared` embedding, whose weight
        # its encoder and decoder embeddings use) has nothing left to search (trial DS: told to `exclude` it)
        covered = {id(cast(Any, m).weight_fake_quant) for name, m in layers if self._inputs.get(name)}
        unreached = [
            name
            for name, module in layers
            if not self._inputs.get(name)
            and not (id(cast(Any, module).weight_fake_quant) in covered and not _has_input_quantizer(module))
        ]
        if unreached:
            rank_zero_warn(
                f"QuantizationAwareTraining: validation never calls {unreached} (a layer only training uses, such as "
                "an auxiliary head): their shifts come from the ranges observed in training, without the search. "
                "`exclude` them to keep them float."
            )
        searched: dict[str, tuple[nn.Module, int | None]] = {}
        for name, module in layers:
            inputs = self._inputs.get(name) or []
            if not inputs:
                continue
            with unsharded(module, pl_module):  # FSDP2: the layer runs alone, outside the model's forward
                _, a_shift, _ = search_power_of_two_shifts(
                    module, inputs, collectives=StrategyCollectives(trainer.strategy)
                )  # errors summed over every process's batches: the same shifts everywhere
            searched[name] = (module, a_shift)
        shifts: dict[str, tuple[int, int | None]] = {}
        sync = trainer.world_size > 1  # the same on every process; synced all the same, as Lightning asks under DDP
        for name, (module, a_shift) in searched.items():
            # layers tied to one weight share its quantizer (core/qat_ties.py): the last search's shift is theirs
            w_shift = int(cast(Any, module).weight_fake_quant.shift.item())
            shifts[name] = (w_shift, a_shift)
            pl_module.log(f"compress/shift/{name}/weight", float(w_shift), sync_dist=sync)
            if a_shift is not None:
                pl_module.log(f"compress/shift/{name}/input", float(a_shift), sync_dist=sync)
            rank_zero_info(f"QuantizationAwareTraining: {name}: weight shift p={w_shift}, input shift p={a_shift}")
        self._inputs = {}
        return shifts


def _has_input_quantizer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "input_fake_quant", None), FakeQuantizer)
