"""What ``IterativePruning`` checks against the Trainer, the module and the other callbacks before training starts,
and how it finds its state in a checkpoint saved with other patterns that select the same weights."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .._lightning import overrides
from ..core.channels import ChannelRule
from ..core.checks import is_integer, is_real
from ..core.config import PruningConfig
from ..core.earlier_pruning import initialized_zeros
from ..core.importance import Importance
from ..core.iterative import IterativePruner
from ..core.mask_counts import zero_counts
from ..core.quant_blocks import grouped_consumers
from ..core.rules import MaskRule
from ..core.selection import Target, select_targets
from ._export import how_to_give_examples
from ._validation import weight_averaging

__all__ = [
    "check_fit",
    "check_frozen",
    "check_no_overlap",
    "key_of_same_selection",
    "saved_clock_offset",
    "saved_last_validation",
    "saved_pending_logs",
    "saved_steps_per_epoch",
    "say_quant_blocks",
]


def check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str | None, granularity: str) -> None:
    """The fit has what the arguments need: a validation loop that logs ``monitor``, no weight averaging that would
    hand back a model the guard never judged, and for channels a ``forward`` and ``example_input_array`` to trace."""
    if monitor is not None and (trainer.limit_val_batches == 0 or not overrides("validation_step", pl_module)):
        raise ValueError(
            f"`monitor`={monitor!r} needs a validation loop that logs it, but this fit has none "
            "(no `validation_step` or `limit_val_batches=0`); set `monitor=None` or add validation."
        )
    averaging = [type(c).__name__ for c in weight_averaging(trainer)]
    if monitor is not None and averaging:
        raise ValueError(
            f"`monitor`={monitor!r} judges the weights this fit trains, but {averaging[0]} replaces them with "
            "an average at the end of fit (one that keeps the events the guard rolled back): the model returned "
            "would not be one a validation judged. Guard without weight averaging, or set `monitor=None`."
        )
    name = type(pl_module).__name__
    if granularity == "channel" and pl_module.example_input_array is None:
        raise ValueError(
            "`granularity`='channel' traces the model to find coupled channels and needs example inputs: "
            + how_to_give_examples(pl_module)
        )
    if granularity == "channel" and not overrides("forward", pl_module):
        raise TypeError(
            f"`granularity`='channel' traces `{name}(example_input_array)`, but {name} does not define `forward`: "
            "define it (e.g. `return self.net(x)`)."
        )


def check_frozen(
    targets: Sequence[Target], importance: Importance, argument: Any, later: bool = False, regrow: float = 0.0
) -> None:
    """Selected weights frozen as training starts: refused when ``importance`` or ``regrow`` reads their gradients
    (trial EM: regrowth on LoRA's frozen base weights exchanged nothing, unsaid), else said (``later``: pruning starts
    in a later epoch and a finetuning callback, such as BackboneFinetuning, may unfreeze them by then: said; a trial's
    were refused; still frozen at an event, Taylor refuses there)."""
    frozen = list(dict.fromkeys(t.name for t in targets if not t.param.requires_grad))  # a layer once (channels)
    if frozen and importance.accumulates and not later:
        raise ValueError(
            f"`importance`={argument!r} scores weights by their gradients, but {frozen} are frozen "
            "(requires_grad=False) as training starts: `exclude` them, unfreeze them before `fit`, or use "
            "importance='magnitude'."
        )
    if frozen and regrow > 0 and not later:
        raise ValueError(
            f"`regrow`={regrow} brings pruned weights back by their gradients, but {frozen[:5]}"
            f"{' ...' if len(frozen) > 5 else ''} are frozen (requires_grad=False) as training starts, so none would "
            "come back: `exclude` them, unfreeze them before `fit`, or set regrow=0."
        )
    if frozen:
        rank_zero_warn(
            f"IterativePruning prunes {frozen[:5]}{' ...' if len(frozen) > 5 else ''}, which are frozen "
            "(requires_grad=False) as training starts: while they stay frozen, their remaining weights cannot adapt to "
            "what is removed (unfrozen later, e.g. by BackboneFinetuning, they train with their masks). `exclude` them "
            "to keep them whole."
        )


def check_no_overlap(
    targets: Sequence[Target], granularity: str, others: Sequence[tuple[Sequence[Target], str]]
) -> None:
    """Two pruning callbacks on one weight would each undo the other's masks: refused before training. ``others``:
    each other pruning callback's targets and granularity."""
    mine = {t.param_name for t in targets}
    for their_targets, their_granularity in others:
        shared = sorted(mine & {t.param_name for t in their_targets})
        if not shared:
            continue
        channel = "channel" in (granularity, their_granularity)
        raise ValueError(
            f"Two IterativePruning callbacks select the same weights {shared[:5]}"
            f"{' ...' if len(shared) > 5 else ''}: give them disjoint `include`/`exclude` patterns."
            + (
                " Channel pruning also cuts the input channels of the layers that consume the pruned ones "
                "(and the norms between), so those layers belong to the channel-pruning callback too: "
                "exclude them from the other one."
                if channel
                else ""
            )
        )


def key_of_same_selection(
    name: str, config: PruningConfig, pl_module: pl.LightningModule, states: dict[str, Any]
) -> str | None:
    """The key of a saved state of callback class ``name`` whose arguments are ``config``'s but for patterns that
    select the same weights (another order, a glob)."""
    mine = config.identity()
    ours: list[str] | None = None  # this callback's weights, read once a candidate key is found
    for key in states:
        if not (isinstance(key, str) and key.startswith(name + "{")):
            continue
        try:
            saved = ast.literal_eval(key[len(name) :])
        except (ValueError, SyntaxError):
            continue
        if not isinstance(saved, dict) or _without_patterns(saved) != _without_patterns(mine):
            continue
        try:
            theirs = select_targets(pl_module, saved.get("include"), saved.get("exclude"), module_tensors=True)
        except (TypeError, ValueError):
            continue
        if ours is None:
            ours = [
                t.param_name for t in select_targets(pl_module, config.include, config.exclude, module_tensors=True)
            ]
        if [t.param_name for t in theirs] == ours:
            return key
    return None


def _without_patterns(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in ("include", "exclude")}


def saved_steps_per_epoch(state: dict[str, Any]) -> int | None:
    """The optimizer steps per epoch a saved state's clock counted (``None``: not saved), refused when damaged."""
    per_epoch = state.get("steps_per_epoch")
    if per_epoch is not None and not (is_integer(per_epoch) and int(per_epoch) > 0):
        raise ValueError(
            f"The checkpoint's IterativePruning state has steps_per_epoch={repr(per_epoch)[:40]}: an int > 0 or "
            "None was saved; the checkpoint is damaged."
        )
    return None if per_epoch is None else int(per_epoch)


def saved_last_validation(state: dict[str, Any]) -> int | None:
    """The optimizer step of the last validation before a saved state (-1: none; ``None``: not saved, an older
    checkpoint)."""
    step = state.get("last_validation")
    if step is not None and not is_integer(step):
        raise ValueError(
            f"The checkpoint's IterativePruning state has last_validation={repr(step)[:40]}: an int was saved; the "
            "checkpoint is damaged."
        )
    return None if step is None else int(step)


def saved_pending_logs(state: dict[str, Any]) -> dict[str, float]:
    """The values a saved state was still to log at its epoch's end (``{}``: none, or not saved), refused when
    damaged."""
    pending = state.get("pending_logs") or {}
    if not isinstance(pending, dict) or not all(isinstance(k, str) and is_real(v) for k, v in pending.items()):
        raise ValueError(
            f"IterativePruning's checkpoint state has `pending_logs`={pending!r}: it must map metric names to "
            "numbers (the checkpoint is damaged)."
        )
    return {k: float(v) for k, v in pending.items()}


def saved_clock_offset(state: dict[str, Any]) -> int:
    """The step clock's offset from the Trainer's ``global_step`` a saved state counted with (0: not saved)."""
    offset = state.get("clock_offset", 0)
    if offset is None:
        return 0
    if not is_integer(offset):
        raise ValueError(
            f"The checkpoint's IterativePruning state has clock_offset={repr(offset)[:40]}: an int was saved; the "
            "checkpoint is damaged."
        )
    return int(offset)


def say_quant_blocks(rule: MaskRule, pl_module: pl.LightningModule) -> None:
    """Say which layers quantize the pruned channels in blocks (QAT's ``group_size``): their channels go a whole
    block at a time, so that ``compact()`` removes them (trial BC: pruned one by one, a MACs budget of 50% with the
    LLM recipe compacted to 86%)."""
    if not isinstance(rule, ChannelRule):
        return
    grouped = grouped_consumers(pl_module, rule.groups)
    if grouped:
        names = sorted(grouped)
        rank_zero_info(
            f"IterativePruning: {names[:3]}{' ...' if len(names) > 3 else ''} quantize their inputs in blocks of "
            f"{sorted(set(grouped.values()))} (QAT's `group_size`): the channels they take are pruned a whole block "
            "at a time (an event prunes every block it cuts into, up to a block more than its share), so that "
            "`compact()` removes them."
        )


def check_resumed_clock(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    steps: int,
    in_steps: bool,
    offset: int,
    saved_in_steps: bool,
) -> None:
    """Refuse a resumed pruning state whose clock (``steps``: optimizer steps, batches under manual optimization,
    or epochs) is ahead of the fit it resumes: its schedule would read as further along than the fit and skip its
    events, or as finished (trial BH: a state at step 10^30 was accepted). A state written by this run is never
    ahead: the clock advances at the ends of batches and epochs, before ``ModelCheckpoint`` saves.
    ``saved_in_steps``: the state was saved by a fit pruning in optimizer steps."""
    if trainer.ckpt_path is None:
        return
    if not in_steps:
        now, unit = trainer.current_epoch + 1, "epoch"  # a checkpoint saved at an epoch's end counts it
    elif pl_module.automatic_optimization:
        now, unit = trainer.global_step + offset, "optimizer step"
    else:
        batches = trainer.num_training_batches
        if not isinstance(batches, int):
            return
        now, unit = (trainer.current_epoch + 1) * batches, "batch"
    if steps <= now:
        return
    if saved_in_steps and not in_steps:
        raise ValueError(
            f"IterativePruning: the checkpoint's pruning state counts optimizer steps (step {steps}: its fit pruned "
            f"in steps), this fit prunes per epoch (epoch {now} at most): its schedule would read {steps} epochs as "
            "done. Resume with the cadence it was saved with (`every_n_epochs`, `every_n_steps`, `monitor` and "
            "`granularity` decide it)."
        )
    raise ValueError(
        f"IterativePruning: the checkpoint's pruning state is at {unit} {steps}, ahead of the fit it resumes "
        f"({unit} {now} at most): it is not the state this run saved (its schedule would read as further along "
        "and skip events). Resume from a checkpoint of this run."
    )


ALREADY_SPARSE = 0.1
"""The fraction of exact zeros among the selected weights that look pruned above which a fresh schedule says it
starts from a dense model: a trained dense model has next to none, a model pruned before has its sparsity."""


def check_keep_zeros(keep_zeros: Any, granularity: str, scope: str) -> bool:
    """``keep_zeros``: a bool, for element granularity (a channel or N:M mask is not a weight's zeros) and global
    scope (layer scope prunes every layer to one sparsity, which a model pruned before does not have: trial CX's
    layers at 50% jumped to 80% at the first event, and one at 97% kept it, ending 0.94 for 0.9)."""
    if not isinstance(keep_zeros, bool):
        raise TypeError(f"`keep_zeros` must be a bool, got {keep_zeros!r}.")
    if keep_zeros and granularity != "element":
        raise ValueError(
            f"`keep_zeros`=True keeps a model's zeros as element masks; `granularity`={granularity!r} prunes whole "
            "channels or N:M blocks. Use it with `granularity='element'`."
        )
    if keep_zeros and scope != "global":
        raise ValueError(
            f"`keep_zeros`=True starts one schedule from the model's sparsity; `scope`={scope!r} prunes every layer to "
            "it, which the layers of a model pruned before do not have. Use it with `scope='global'`."
        )
    return keep_zeros


def keep_earlier_pruning(pruner: IterativePruner, keep: bool, *, resumed: bool) -> None:
    """At the start of a fit that does not resume this callback's state (``resumed``: a checkpoint gave it; one
    saved with other arguments, or by another run, does not: trial EG's `fit(ckpt_path=...)` with a new target
    started afresh and ignored `keep_zeros`, the 0.80 zeros trained back to 0.199 after one batch, said nowhere),
    on a model pruned before: with ``keep`` (``keep_zeros``) its zeros
    become masks and the schedule starts from their sparsity (:meth:`IterativePruner.keep_zeros`), said; without, the
    schedule starts from a dense model, and a warning says the zeros train back when they are 10% of the selected
    weights or more (trial CT: 0.80 sparse became 0.27 after the first step, said nowhere). Kept off by default: a
    fresh model initialized with zeros (``eye_``, ``dirac_``, ``sparse_``) cannot always be told from a pruned one
    (trial CV: an identity layer's zeros were kept, and never trained)."""
    if resumed or pruner.steps or pruner.events:
        return
    if pruner.continue_masks() is not None:  # one instance's second fit: its masks, and the schedule from them
        return
    if keep:
        initial = pruner.keep_zeros()
        if initial is None:
            rank_zero_warn(
                "IterativePruning(keep_zeros=True): no zeros kept: the selected weights have none that look pruned, "
                "are sharded (FSDP2), or are already as sparse as the target."
            )
        else:
            left = pruner.left_unmasked
            rank_zero_info(
                f"IterativePruning: keep_zeros=True: the selected weights' zeros ({initial:.1%} of them) stay pruned, "
                f"and the schedule goes from {initial:.4f} to {pruner.target_sparsity}."
                + (
                    f" Left to train back: {left[:5]}{' ...' if len(left) > 5 else ''} (zeros an initialization "
                    "leaves, or a layer under the `min_density` floor)."
                    if left
                    else ""
                )
            )
        return
    zeros, total = pruned_looking_zeros(pruner)
    if total and zeros / total >= ALREADY_SPARSE:
        rank_zero_warn(
            f"IterativePruning: the selected weights are already {zeros / total:.1%} zero (pruned before?). The "
            f"schedule starts from a dense model and reaches {pruner.target_sparsity} at its end: before its first "
            "event, and while its events keep more weights than the model has, the zeros train back, and the masks "
            "it ends with are chosen afresh. To keep them and start the schedule from their sparsity, pass "
            "`keep_zeros=True` (element granularity); to go on with an earlier fit, resume it from its checkpoint."
        )


def pruned_looking_zeros(pruner: IterativePruner) -> tuple[int, int]:
    """Exact zeros of the selected weights whose zeros may be a pruning (not all zero, nor zeros beside one value:
    ``eye_``, ``dirac_``), and the elements of all of them (trial CW: counted against the weights with zeros alone, a
    ``sparse_`` head's zeros, 1.9% of the model, read as 50%), shards summed."""
    counts = zero_counts(pruner.targets, pruner.collectives)  # a weight without zeros is not read again (a copy)
    looking = [t for t in pruner.targets if 0 < counts[t.param_name] < t.numel and not initialized_zeros(t.local)]
    return sum(counts[t.param_name] for t in looking), sum(t.numel for t in pruner.targets)
