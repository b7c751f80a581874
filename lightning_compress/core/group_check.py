"""Which channel groups can really be removed: trial forwards with some of their channels gone.

The dependency graph maps channels through the operations it knows and reads any other operation as element-wise.
Two checks catch what it gets wrong, on trial copies, before a mask is computed or a layer cut:

* :func:`removable_groups`, shapes: the model must still run, with its outputs' shapes, when half of a group's
  channels are removed (a residual addition with the model's input, a reshape into heads).
* :func:`faithful_groups`, values: zeroing channels (every slice of them: rows, biases, BatchNorm entries and the
  columns of the layers that read them) must give the outputs that removing them gives, on the example inputs and
  on noisy ones. An operation that moves or mixes channels without parameters (``flip``, ``roll``, a pixel shuffle,
  a softmax over channels) breaks this: masks that do not line up with the data, which ``compact`` could not undo.
  The smaller model must also run in training mode where the model does (a layer only training calls, such as an
  auxiliary head, reads the channels too).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .groups import ChannelGroup, param_slices, unshifted_mean
from .layers import restore_training
from .resize import apply_plan, plan
from .skeleton import deep_copy, meta_copy
from .tracing import (
    call_model,
    eval_mode,
    map_tensors,
    noisy_checks,
    output_tensors,
    plain_float,
    quiet_norm_widths,
    seeded,
)
from .wrappers import modules_by_name

__all__ = ["faithful_groups", "output_change", "removable_groups"]

MIXED = (
    "zeroing its channels is not the same as removing them: an operation between its layers moves or mixes "
    "channels (e.g. flip, roll, a pixel shuffle, a softmax or a mean over channels, or a split of one layer's "
    "output into halves that pair up: a fused gate and up projection's `chunk`) and the dependency graph reads it "
    "as element-wise"
)
UNSEEDED = (
    "the model's forward gives other outputs on the same inputs with torch's default generators seeded alike "
    "(random numbers from another source: a `torch.Generator` of its own, Python's `random`, NumPy), so zeroing "
    "channels and removing them cannot be compared: draw them from torch's default generator (`torch.randn_like` "
    "without `generator=`), or prune channels of a module whose forward is deterministic"
)
COPY_DIFFERS = (
    "a copy of the model does not give the model's outputs on the same inputs (its forward reads state kept outside "
    "the module: neurons reset through a class-wide registry, as snntorch's `utils.reset` does, which a copy is not "
    "in), so zeroing channels and removing them, compared on copies, cannot be: keep the state in the modules "
    "themselves (snntorch: reset each neuron with its `reset_mem()`), or prune weights (granularity='element')"
)
RANDOM_DRAWS = (
    "; the forward draws random numbers, and a draw sized by these channels (`torch.randn_like` of their "
    "activations, dropout with `training=True`) lands on other channels once some are removed: prune channels of a "
    "module whose eval-mode forward draws none"
)
TRAINING_ONLY = (
    "without its channels the model no longer runs in training mode: a layer only training calls (e.g. an "
    "auxiliary head) reads them, and the eval-mode trace does not see it"
)


def _to_meta(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return torch.empty_like(inputs, device="meta")
    if isinstance(inputs, dict):
        return {k: _to_meta(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_meta(v) for v in inputs)
    return inputs


class _CheckedKernels(TorchFunctionMode):
    """Refuses, with a ``RuntimeError`` the trial reports, the calls a trial copy makes that some torch builds do not
    refuse but crash on. A Phi-3 with half its heads removed slices its fused projection by the config's head count,
    so its keys and values have 0 heads: torch 2.11's CPU ``scaled_dot_product_attention`` divides by that count and
    the process dies of SIGFPE (torch 2.13 runs it; the next matrix product fails)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            _check_attention_heads(*args, **kwargs)
        return func(*args, **kwargs)


def _check_attention_heads(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, enable_gqa: bool = False, **kwargs: Any
) -> None:
    if min(query.dim(), key.dim(), value.dim()) < 3:
        return  # no head dimension
    heads = (query.shape[-3], key.shape[-3], value.shape[-3])
    grouped_wrong = enable_gqa and (heads[1] != heads[2] or heads[0] % max(heads[1], 1))
    if not all(heads) or grouped_wrong:
        raise RuntimeError(
            f"scaled_dot_product_attention with {heads[0]} query, {heads[1]} key and {heads[2]} value heads "
            "(refused before the kernel, which some torch builds crash on)"
        )


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in output_tensors(out)]


@quiet_norm_widths()
def removable_groups(
    model: nn.Module, example_inputs: Any, groups: list[ChannelGroup]
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Keep the groups whose channels can really be removed: a forward with half of every group's channels
    removed, at scattered positions (:func:`_probe`); where the shapes break, halves of the groups until each group
    at fault is found (one forward when every group holds).

    Catches what a dependency graph cannot see: a residual addition with the model's own input, or
    attention that reshapes projections into heads (removing one Q/K/V row breaks the reshape). The
    forwards run on a meta-device copy (shapes only, no data); a model whose forward needs data
    (e.g. ``.item()`` in a ``transformers`` mask builder) is checked on the real model instead, with
    copies of only the layers a group touches swapped in and the originals put back.
    """
    meta = meta_copy(model)
    with plain_float(meta):  # shapes only: the float data flow (the copy is thrown away)
        try:
            with torch.no_grad():
                shapes = _shapes(call_model(meta, _to_meta(example_inputs)))
        except Exception:  # data-dependent code: check on the real model
            shapes = None
        if shapes is not None:
            return _removable(meta, _to_meta(example_inputs), groups, shapes, in_place=False)
    with plain_float(model), torch.no_grad():
        shapes = _shapes(call_model(model, example_inputs))
        return _removable(model, example_inputs, groups, shapes, in_place=True)


_SIZES = re.compile(r"size|shape|dim|match|expected|broadcast|out of (range|bounds)|view|reshape", re.IGNORECASE)


def _removable(
    model: nn.Module, inputs: Any, groups: list[ChannelGroup], shapes: list[tuple[int, ...]], in_place: bool
) -> tuple[list[ChannelGroup], dict[str, str]]:
    def trial(subset: list[int]) -> str | None:
        dead = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
        for i in subset:
            dead[i][_probe(groups[i].size)] = True
        with _trial(model, [groups[i] for i in subset], in_place) as copy:
            apply_plan(copy, plan(copy, groups, dead), shapes_only=True)  # the forward runs with quantizers off
            try:
                with torch.no_grad(), _CheckedKernels():
                    trial_shapes = _shapes(call_model(copy, inputs))
            except Exception as err:  # any failure: these channels cannot go; what failed is part of the reason
                first = (str(err).strip().splitlines() or [""])[0][:160]
                if all(groups[i].attention is not None for i in subset):  # trial BI: the shape error alone
                    return (
                        "its heads are left whole: the forward without half of them fails "
                        f"({type(err).__name__}: {first}), so the model reads the head count or the attention's "
                        "width where head removal does not change it: an attribute of its own (e.g. Hiera's "
                        "`hidden_size_output`), the input's size, a config the layers share, read in the forward "
                        "(e.g. Phi-3's `self.config.num_attention_heads`), or a position bias built for every "
                        "layer's heads (e.g. BLOOM's ALiBi, one slope per head)"
                    )
                if not _SIZES.search(first):  # trial EY: a model's own error was blamed on a chunk or split
                    return f"the forward without half of its channels fails ({type(err).__name__}: {first})"
                return (
                    "its channels also feed an operation the dependency graph does not see (the forward without half "
                    f"of them fails: {type(err).__name__}: {first}), such as the halves of one layer's output split "
                    "apart (`chunk`, `split`: a fused gate and up projection, GLM-4's `gate_up_proj`, ModernBERT's "
                    "`Wi`) or joined to a function of itself (GhostNet's `cat([x, cheap(x)])`), whose channels pair "
                    "across the halves; or a layer of the same chain whose output the forward drops (left whole for "
                    "that: see its own reason; a WaveNet's last residual convolution)"
                )
        return None if trial_shapes == shapes else "its channels reach one of the model's outputs"

    verdict = _verdicts(trial, len(groups))  # all groups at once, then halves of a failing set
    return [g for i, g in enumerate(groups) if i not in verdict], {groups[i].name: w for i, w in verdict.items()}


def _probe(size: int) -> Tensor:
    """The channels a removability trial removes: half of them (one of one), at scattered positions, so that a
    dependency the graph maps wrongly (a stride or a slice read as a channel map) shows as a count that differs;
    a fixed pattern such as every other channel can line up with a stride and pass."""
    generator = torch.Generator().manual_seed(size)
    return torch.randperm(size, generator=generator)[: max(1, size // 2)]


@contextlib.contextmanager
def _trial(model: nn.Module, groups: list[ChannelGroup], in_place: bool) -> Iterator[nn.Module]:
    """A model to remove ``groups``' channels from: a whole copy, or ``model`` with copies of the groups' layers."""
    if not in_place:
        yield deep_copy(model)
        return
    wanted: set[str] = set()
    for group in groups:  # an attention block's counts change too: a copy of it holds copies of its projections
        wanted.update(group.modules())
        if group.attention is not None:
            wanted.add(group.attention.module)
    names = sorted(n for n in wanted if not any(n.startswith(f"{other}.") for other in wanted))
    originals = {name: model.get_submodule(name) for name in names}
    try:
        for name, module in originals.items():
            _swap(model, name, deep_copy(module))
        yield model
    finally:
        for name, module in originals.items():
            _swap(model, name, module)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def output_change(before: list[Tensor], after: list[Tensor]) -> tuple[float, float]:
    """The largest ``|after - before|`` over the outputs' finite entries, and the largest such change relative to its
    output's largest ``|before|``; both ``inf`` where the outputs differ in number or shape, or in which entries are
    finite."""
    if len(before) != len(after):
        return math.inf, math.inf
    largest, worst = 0.0, 0.0
    for a, b in zip(before, after, strict=True):
        if a.shape != b.shape:
            return math.inf, math.inf
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)):
            return math.inf, math.inf
        if not bool(finite.any()):
            continue
        diff = float((a[finite] - b[finite]).abs().max())
        scale = float(a[finite].abs().max())
        largest = max(largest, diff)
        if diff > 0.0:
            worst = max(worst, diff / scale if scale > 0.0 else math.inf)
    return largest, worst


def _outputs(model: nn.Module, inputs: Any) -> list[Tensor]:
    """The model's output tensors, with the same random numbers drawn on every call (:func:`~.tracing.seeded`)."""
    with torch.no_grad(), seeded(model):
        return [t.detach().float() for t in output_tensors(call_model(model, inputs))]


def _float32(value: Any) -> Any:
    return map_tensors(value, lambda t: t.float() if t.is_floating_point() else t)


def _runs_in_training(model: nn.Module, inputs: Any) -> bool:
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        with torch.no_grad(), seeded(model, None):  # dropout draws: the global state is put back
            call_model(model, inputs)
        return True
    except Exception:
        return False
    finally:
        restore_training(modes)


def _zero(model: nn.Module, group: ChannelGroup, dead: Tensor) -> None:
    """Zero every parameter slice of ``group``'s ``dead`` channels, and their running means in a norm without a shift,
    as pruning does (:meth:`~.channels.ChannelRule.zero_statistics`)."""
    modules = modules_by_name(model)
    for s in group.slices:
        module = modules[s.module]
        positions = s.index[dead[s.channel]]
        for attr, dim in param_slices(module, s.kind):
            getattr(module, attr).data.index_fill_(dim, positions.to(getattr(module, attr).device), 0)
        if unshifted_mean(module):
            module.running_mean.index_fill_(0, positions.to(module.running_mean.device), 0)


@quiet_norm_widths()
def faithful_groups(
    model: nn.Module, example_inputs: Any, groups: list[ChannelGroup], rtol: float = 1e-4
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Keep the groups whose channels, zeroed, give the outputs that removing them gives (see the module's doc).

    Half of every group's channels (:func:`_probe`) are zeroed on a float32 copy, then removed; the outputs are
    compared on ``example_inputs`` and on noisy ones where the model runs on them (:func:`~.tracing.noisy_checks`).
    Where they differ, halves of the groups are tried until each group at fault is found, so a model whose groups
    all hold costs one trial: one copy of the model (two for a model not in float32) and six forwards. ``model``
    is not changed, nor the global random state. A model that does not run in float32 (e.g. code that needs its
    own dtype) is not checked: its groups are returned as they are.
    """
    if not groups:
        return [], {}
    tensors = [*model.parameters(), *model.buffers()]
    try:  # trials copy the model; one in another float dtype is first copied to float32 once
        source = model if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()) else None
        source = deep_copy(model).float() if source is None else source
    except Exception:
        return list(groups), {}
    example = _float32(example_inputs)
    with plain_float(source):  # quantizers off (restored after), eval mode
        try:
            with torch.no_grad(), seeded(source) as drew:
                first = [t.detach().float() for t in output_tensors(call_model(source, example))]
                draws = drew()  # the forward draws random numbers: named where a group is refused (trial ER)
        except Exception:
            return list(groups), {}
        if output_change(first, _outputs(source, example))[0] > 0.0:
            return [], {g.name: UNSEEDED for g in groups}
        if not _copies_alike(source, example, first):  # trial GL: blamed on an operation mixing channels
            return [], {g.name: COPY_DIFFERS for g in groups}
        inputs = noisy_checks(example, lambda x: _outputs(source, x))
        in_training: list[bool] = []  # whether the whole model runs in training mode: found by the first trial
        verdict = _verdicts(
            lambda subset: _zeroed_vs_removed(source, groups, subset, inputs, in_training, rtol), len(groups)
        )
    kept = [g for i, g in enumerate(groups) if i not in verdict]
    reasons = {groups[i].name: why for i, why in verdict.items()}
    if draws:  # trial ER: a draw sized by the channels was blamed on a flip or a pixel shuffle alone
        reasons = {name: why + RANDOM_DRAWS if why.startswith(MIXED) else why for name, why in reasons.items()}
    return kept, reasons


def _copies_alike(source: nn.Module, example: Any, outputs: list[Tensor]) -> bool:
    """Whether a copy of ``source`` gives its ``outputs`` on ``example``, twice (state left by a first call shows at
    the second): the trials compare copies."""
    try:
        copy = deep_copy(source)
        with torch.no_grad():
            return all(output_change(outputs, _outputs(copy, example))[0] == 0.0 for _ in range(2))
    except Exception:  # a copy that does not run: the trials say so themselves
        return True


def _zeroed_vs_removed(
    source: nn.Module,
    groups: list[ChannelGroup],
    subset: list[int],
    inputs: list[Any],
    in_training: list[bool],
    rtol: float,
) -> str | None:
    """Why removing the probe channels of the groups in ``subset`` is not zeroing them; ``None`` if it is. The first
    trial also finds whether the whole model runs in training mode (on its copy: the BatchNorm statistics it moves
    are the copy's, the same before and after the removal), into ``in_training``."""
    trial = deep_copy(source)
    if not in_training:
        in_training.append(_runs_in_training(trial, inputs[0]))
    dead = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    for i in subset:
        dead[i][_probe(groups[i].size)] = True
    consumers = _ConsumerInputs(trial, [groups[i] for i in subset], [dead[i] for i in subset])
    with torch.no_grad(), eval_mode(trial):
        for i in subset:
            _zero(trial, groups[i], dead[i])
        with consumers.recording(trial):
            before = [_outputs(trial, x) for x in inputs]
        try:
            apply_plan(trial, plan(trial, groups, dead), shapes_only=True)  # quantizers are off
            with consumers.comparing(trial):
                after = [_outputs(trial, x) for x in inputs]
        except Exception:
            return "removing its channels breaks the forward"
    if any(output_change(b, a)[1] > rtol for b, a in zip(before, after, strict=True)):
        return MIXED
    changed = consumers.changed(rtol)
    if changed is not None:  # trial FC: SwinUNETR's functional layer_norm over channels; its output barely moved
        return f"{MIXED} (the inputs of {changed} change)"
    if in_training[0] and not _runs_in_training(trial, inputs[0]):
        return TRAINING_ONLY
    return None


class _ConsumerInputs:
    """The inputs of the layers that read a trial's channels (a group's ``"in"`` slices): recorded with the channels
    zeroed, then compared, at the kept positions, with those the model gives once the channels are removed. An
    operation that mixes channels and that the tracer reads as element-wise (a ``layer_norm`` over channels called as
    a function) can change a model's outputs too little to show (trial FC: SwinUNETR's, 3.6e-6 at random
    initialization; 3e-4 after training, when `compact()` refused), but not the inputs of the layer after it."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], dead: list[Tensor]) -> None:
        modules = modules_by_name(model)
        removed: dict[str, set[int]] = {}
        for group, gone in zip(groups, dead, strict=True):
            for s in group.slices:
                if s.kind == "in" and s.module in modules:
                    removed.setdefault(s.module, set()).update(s.index[gone[s.channel]].tolist())
        self.removed = {name: sorted(positions) for name, positions in removed.items() if positions}
        self.recorded: dict[str, list[Tensor]] = {}
        self.worst: tuple[float, str] = (0.0, "")

    @contextlib.contextmanager
    def _hooks(self, model: nn.Module, hook: Callable[[str, Tensor], None]) -> Iterator[None]:
        handles = []
        for name in self.removed:
            module = model.get_submodule(name)

            def pre(_: nn.Module, args: Any, name: str = name) -> None:
                if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                    hook(name, args[0].detach())

            handles.append(module.register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def recording(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        self.recorded = {name: [] for name in self.removed}
        return self._hooks(model, lambda name, x: self.recorded[name].append(self._kept(model, name, x)))

    def comparing(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        calls = dict.fromkeys(self.removed, 0)

        def compare(name: str, x: Tensor) -> None:
            seen, calls[name] = self.recorded[name], calls[name] + 1
            if calls[name] > len(seen) or seen[calls[name] - 1].shape != x.shape:
                return  # not the same call, or another layout than the slice's: no verdict (the outputs have one)
            before = seen[calls[name] - 1]
            scale = float(before.abs().max()) if before.numel() else 0.0
            diff = float((before.float() - x.float()).abs().max()) if before.numel() else 0.0
            change = diff / scale if scale > 0.0 else (math.inf if diff > 0.0 else 0.0)
            if change > self.worst[0]:
                self.worst = (change, name)

        return self._hooks(model, compare)

    def _kept(self, model: nn.Module, name: str, x: Tensor) -> Tensor:
        """``x`` without the removed positions along the layer's input channels (dim 1 of a convolution's input,
        the last of a Linear's)."""
        dim = 1 if isinstance(model.get_submodule(name), nn.modules.conv._ConvNd) else -1
        gone = torch.tensor(self.removed[name], dtype=torch.long, device=x.device)
        if x.dim() < 2 or int(gone.max()) >= x.shape[dim]:
            return x  # another layout: its shape differs from the smaller model's input, and is not compared
        keep = torch.ones(x.shape[dim], dtype=torch.bool, device=x.device)
        keep[gone] = False
        return x.index_select(dim, keep.nonzero().reshape(-1))

    def changed(self, rtol: float) -> str | None:
        """The layer whose kept inputs changed most beyond ``rtol`` of their largest value, if any."""
        return self.worst[1] if self.worst[0] > rtol else None


def _verdicts(trial: Callable[[list[int]], str | None], count: int) -> dict[int, str]:
    """Which of ``count`` groups fail ``trial``, and why: all together first, then halves of a failing set."""
    found: dict[int, str] = {}

    def search(subset: list[int], why: str) -> None:
        if len(subset) == 1:
            found[subset[0]] = why
            return
        half = len(subset) // 2
        for part in (subset[:half], subset[half:]):
            reason = trial(part)
            if reason is not None:
                search(part, reason)

    everything = list(range(count))
    why = trial(everything)
    if why is None:
        return found
    search(everything, why)
    rest = [i for i in everything if i not in found]
    if rest and (why := trial(rest)) is not None:  # groups that fail only together: none of them is removed
        found.update({i: f"{why} (with other groups removed at once)" for i in rest})
    return found
