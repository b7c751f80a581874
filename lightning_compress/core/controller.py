"""Accuracy-aware control of the sparsity steps (the seed's "adjust the ratio by how the model
performs"). Pure Python: it sees numbers, the callback does the pruning and the rollbacks.

Rules: the monitored value seen last before the first pruning event is the baseline. After an
event, the first validation that follows is compared with it; a drop larger than ``max_drop``
means: roll that event back, halve the step (the sparsity that event added) and retry later
with at most that step. When the step falls below ``min_step`` no step fits and pruning stops.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .checks import check_choice, is_integer, is_real

__all__ = ["AccuracyGuard", "GuardDecision", "check_guard_state", "is_rate", "lower_is_better", "monitor_mode"]

# words of a metric's name (split at anything but letters and digits) that say lower is better
_LOWER_WORDS = frozenset(
    [
        "nelbo",  # the negative ELBO (trial FY: read as "max")
        "loss",
        "losses",
        "nll",
        "kl",
        "kld",
        "kldiv",
        "divergence",
        "lpips",
        "lost",  # WordInfoLost
        "eer",  # equal error rate
        "disparity",  # ProcrustesDisparity
        "perplexity",
        "ppl",
        "error",
        "errors",
        "err",
        "mse",
        "rmse",
        "mae",
        "msle",
        "rmsle",
        "mape",
        "smape",
        "wer",
        "cer",
        "ter",
        "bpd",
        "bpc",
        "l1",
        "l2",
        "fid",
        "kid",
        "regret",
        "cost",
        "distance",
        "dist",
        "recon",
        "reconstruction",
        "xent",
        "bce",
        "ce",
        "crossentropy",
        "huber",
        "ece",
        "mce",
        "brier",
        "hamming",
    ]
)
_RATE_WORDS = frozenset(["error", "errors", "err", "wer", "cer", "ter", "hamming"])  # fractions of mistakes, in [0, 1]
# an error measured by size, not counted: unbounded, in the target's units (MeanSquaredError, val_abs_err)
_SIZE_WORDS = frozenset(
    ["squared", "sq", "absolute", "abs", "root", "log", "percentage", "relative", "normalized", "max", "maximum"]
)  # max_error: scikit-learn's largest residual
_SUFFIXES = ("loss", "error", "perplexity")  # run together with another word: celoss, valerror
_HIGHER_WORDS = frozenset(["skill", "reduction", "improvement", "gain"])  # an error's reduction: higher is better
_FALL_WORDS = frozenset(["drop", "degradation", "decline"])  # val_acc_drop: lower is better; val_loss_drop: higher
_GAP_WORDS = frozenset(["gap"])  # val_accuracy_gap, a generalization gap: lower is better
_QUALIFIERS = frozenset(["recon", "reconstruction"])  # what a metric is of (val_psnr_recon), a loss alone (val_recon)
# metrics that are higher-is-better; named after a word of the other kind they are what is measured (val_recon_psnr,
# val_ce_f1: a trial read them as lower-is-better), before one they are what it is measured of (val_top1_error)
_HIGHER_METRICS = frozenset(
    ["acc", "accuracy", "f1", "fbeta", "auroc", "auc", "auprc", "psnr", "ssim", "precision", "recall", "iou",
     "jaccard", "dice", "bleu", "rouge", "r2", "mcc", "kappa", "ndcg", "mrr", "specificity", "sensitivity"]
)  # fmt: skip
# torchmetrics' class names (a MetricCollection's keys) whose words alone read the wrong way, split at camel case
_LOWER_PHRASES = (
    "perceptual_image_patch",  # LearnedPerceptualImagePatchSimilarity (LPIPS): a distance
    "perceptual_path_length",
    "tweedie_deviance",
    "davies_bouldin",
    "continuous_ranked_probability",
    "fall_out",
    "translation_edit_rate",
    "spectral_distortion",
    "spatial_distortion",
    "spectral_angle",
    "total_variation",
    "image_structure_and_texture",  # DISTS: a distance
)
_HIGHER_PHRASES = ("distance_correlation", "intersection_over_union")  # DistanceIntersectionOverUnion
_NOT_NEGATED = ("negative_predictive",)  # NegativePredictiveValue
_NEGATED = frozenset(["neg", "negative"])  # scikit-learn's neg_mean_squared_error: higher is better


_FLOAT32_EPS = 2.0**-23
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # WordErrorRate, KLDivergence


def _words(monitor: str) -> list[str]:
    """The words of a metric's name, split at separators and at camel case (torchmetrics' class names are the keys
    of a ``MetricCollection``; a trial: ``val_WordErrorRate`` read as higher-is-better)."""
    plain = [w for w in re.split(r"[^a-z0-9]+", monitor.lower()) if w]  # val_KLdiv: "kldiv"
    camel = [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", monitor).lower()) if w]
    return camel + [w for w in plain if w not in camel]


def lower_is_better(monitor: str) -> bool:
    """Whether the metric's name says lower is better: a word such as ``loss``, ``nll``, ``kl``, ``perplexity``,
    ``error``, ``mse``, ``mae``, ``mape``, ``wer``, ``bpd``, ``fid``, ``cost`` (``val/nll``, ``valid_error``,
    ``val_celoss``), unless a word says the opposite (``error_reduction``, ``mse_skill``); ``neg_`` flips the
    reading (``neg_mse``: higher is better; ``neg_elbo``: lower)."""
    words = _words(monitor)
    joined = "_".join(words)
    negated = any(w in _NEGATED for w in words) and not any(phrase in joined for phrase in _NOT_NEGATED)
    for i in range(len(words) - 1, -1, -1):  # a fall or gap of the metric named before it (trial AV)
        if words[i] in _GAP_WORDS:
            return not negated
        if words[i] in _FALL_WORDS:
            before = monitor[: monitor.lower().rfind(words[i])]  # as written: val_1-acc_drop keeps its "1-"
            return (not lower_is_better(before) if _words(before) else True) != negated
        if _decisive(words[i]):
            break
    minus = _one_minus(monitor, words)
    if minus is not None:
        return minus != negated
    lower = any(w in _LOWER_WORDS or w.endswith(_SUFFIXES) for w in words) or "bits_per" in joined
    lower = lower or "cross_entropy" in joined or any(phrase in joined for phrase in _LOWER_PHRASES)
    lower = lower and not any(w in _HIGHER_WORDS for w in words) and not any(p in joined for p in _HIGHER_PHRASES)
    lower = lower and not _named_last(words, _HIGHER_METRICS)
    return lower != negated


_ONE_MINUS = re.compile(r"(?:^|[_/.\s-])(?:1\s*-\s*|1_minus_|one_?minus_|one-minus-)")
_AFTER_TOP = re.compile(r"top\d*[_/.\s-]?$")  # val_top_1-acc: top-1 accuracy, not one minus it
# words that may stand between "1-" and the metric it takes from one: val_1-top1_acc, val_1-ms_ssim
_MODIFIERS = frozenset(
    ["top", "top1", "top5", "1", "5", "ms", "multiscale", "mean", "macro", "micro", "weighted", "balanced", "avg",
     "multiclass", "multilabel", "binary"]
)  # fmt: skip


def _one_minus(monitor: str, words: list[str]) -> bool | None:
    """Whether the name takes its last metric from one: ``True`` (lower is better) for a higher-is-better metric
    (``val_1-ssim``, ``val_1-top1_acc``, ``val_one_minus_ssim``), ``False`` for a lower-is-better one (``val_1-wer``);
    ``None`` when it does not (``val_1-shot_acc``, ``val_top_1-acc``, ``val_1-ssim_loss``, and
    ``val_1-ssim_improvement``: an improvement of it)."""
    position = next((i for i in range(len(words) - 1, -1, -1) if _decisive(words[i])), None)
    if position is None or any(w in _HIGHER_WORDS for w in words[position + 1 :]):
        return None
    last = words[position]
    lowered = monitor.lower()
    for match in _ONE_MINUS.finditer(lowered):
        if _AFTER_TOP.search(lowered[: match.start() + 1]):
            continue
        following = _words(monitor[match.end() :])
        if last in following and all(w in _MODIFIERS for w in following[: following.index(last)]):
            return last in _HIGHER_METRICS
    return None


def _decisive(word: str) -> bool:
    """A word that names a metric of either direction (not a qualifier such as ``recon``)."""
    if word in _QUALIFIERS:
        return False
    return word in _LOWER_WORDS or word.endswith(_SUFFIXES) or word in _HIGHER_METRICS


def _named_last(words: list[str], metrics: frozenset[str]) -> bool:
    """Whether the last word that names a metric of either direction is one of ``metrics``."""
    for word in reversed(words):
        if word in metrics:
            return True
        if _decisive(word):
            return False
    return False


def reads_higher(monitor: str) -> bool:
    """Whether the name says higher is better (``val_acc``, ``val/f1``, ``val_recon_psnr``), not only fails to say
    lower is better (``val_score`` says neither)."""
    return not lower_is_better(monitor) and _named_last(_words(monitor), _HIGHER_METRICS)


# every word and phrase that gives a name a direction, and names higher-is-better by convention
_DIRECTION_WORDS = (
    _LOWER_WORDS | _HIGHER_METRICS | _HIGHER_WORDS | _FALL_WORDS | _GAP_WORDS | _NEGATED | _QUALIFIERS
) | frozenset(["top1", "top5", "reward", "return", "miou", "map", "ap"])  # not "elbo": logged as the bound, and as
# its negative, the loss (scvi-tools' `elbo_validation`; trial FX: read as the bound, every event was rolled back)
_DIRECTION_PHRASES = (*_LOWER_PHRASES, *_HIGHER_PHRASES, "bits_per", "cross_entropy")


def names_no_direction(monitor: str) -> bool:
    """Whether the name holds no word that says a direction (``val_total``, ``valTotal``, ``val_score``): no loss,
    error, accuracy-like or negating word (split at separators and camel case)."""
    words = _words(monitor)
    joined = "_".join(words)
    return not any(w in _DIRECTION_WORDS or w.endswith(_SUFFIXES) for w in words) and not any(
        phrase in joined for phrase in _DIRECTION_PHRASES
    )


def names_elbo(monitor: str) -> bool:
    """Whether the name holds the word ``elbo`` (split at separators and camel case: ``valELBO`` too), which libraries
    log both as the bound (higher is better) and as its negative, the loss (scvi-tools' ``elbo_validation``)."""
    return "elbo" in _words(monitor)


def is_rate(monitor: str) -> bool:
    """Whether the name reads as a rate of mistakes in [0, 1] (``val_error``, ``val_wer``), on an accuracy's scale,
    not an error's size (``val_MeanSquaredError``, ``val_abs_err``: a trial's diabetes MSE was about 3000)."""
    words = _words(monitor)
    if "hamming_distance" in "_".join(words):  # torchmetrics' HammingDistance: the fraction of wrong labels
        words = [w for w in words if w != "distance"]
    return any(w in _RATE_WORDS for w in words) and not any(
        w in _LOWER_WORDS - _RATE_WORDS or w in _SIZE_WORDS for w in words
    )


def monitor_mode(monitor: str | None, mode: str | None, who: str = "IterativePruning") -> str:
    """``mode`` for the metric named ``monitor``: as given, or (``None``) ``"min"`` for a name that says it is
    lower-is-better (:func:`lower_is_better`: ``val_loss``, ``val_nll``, ``val_wer``, ...) and ``"max"`` otherwise.
    An explicit ``"max"`` for such a name warns, and so does ``"min"`` for a name that says higher is better
    (:func:`reads_higher`): ``who`` (the guard, or the monitor's drops) would read every worsening as an improvement."""
    if mode is not None:
        check_choice(mode, "mode", ("max", "min"))
        if monitor is not None and (lower_is_better(monitor) if mode == "max" else reads_higher(monitor)):
            reads, change, fix = ("lower", "rise", "min") if mode == "max" else ("higher", "fall", "max")
            warnings.warn(
                f"{who}: `monitor`={monitor!r} reads as {reads}-is-better, but `mode`={mode!r} treats a "
                f"{'higher' if mode == 'max' else 'lower'} value as "
                + (
                    f"better: the accuracy guard would accept every {change} of it."
                    if who == "IterativePruning"
                    else f"better: every {change} of it would be logged as a gain, not a drop."
                )
                + f" Pass mode={fix!r} (or leave `mode` unset to infer it from the name).",
                UserWarning,
                stacklevel=3,
            )
        return mode
    return "min" if monitor is not None and lower_is_better(monitor) else "max"


@dataclass(frozen=True)
class GuardDecision:
    """What the guard decided after a validation."""

    action: str  # "baseline", "accept", "rollback", "stop"; "keep": rejected, but there is nothing to go back to
    value: float
    drop: float
    step_cap: float | None


@dataclass
class AccuracyGuard:
    """Tracks the baseline and the largest sparsity step still allowed.

    Args:
        max_drop: largest tolerated drop of the monitored value from the baseline.
        mode: ``"max"`` when higher is better (accuracy), ``"min"`` for losses.
        min_step: smallest sparsity step worth trying; below it, pruning stops.
    """

    max_drop: float
    mode: str = "max"
    min_step: float = 1e-3
    baseline: float | None = None
    step_cap: float | None = None
    stopped: bool = False
    started: bool = False  # a pruning event has been applied
    awaiting_check: bool = False  # an event was applied and no validation judged it yet
    last_step: float = 0.0  # sparsity added by the last event
    rollbacks: int = 0

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (positive = worse)."""
        if self.baseline is None:
            return 0.0
        return self.baseline - value if self.mode == "max" else value - self.baseline

    def within_max_drop(self, value: float) -> bool:
        """Whether ``value`` is at most ``max_drop`` worse than the baseline. Logged metrics are float32: 193/200
        after 194/200 is a drop of 0.0050000548 (a trial: rolled back at `max_drop`=0.005, which the guard
        tolerates); a few float32 roundings of the values are no drop."""
        rounding = 4 * _FLOAT32_EPS * max(1.0, abs(self.baseline or 0.0), abs(value) if math.isfinite(value) else 0.0)
        return self.drop(value) <= self.max_drop + rounding

    def observe(self, value: float) -> GuardDecision | None:
        """Feed the latest validation value; returns the decision it triggered, if any."""
        if self.baseline is None and self.started:  # resumed reading another metric (:meth:`forget_baseline`)
            if not math.isfinite(value):
                return None  # waits for a finite one
            self.baseline, self.awaiting_check = value, False  # the model as it is now is what drops count from
            return GuardDecision("baseline", value, 0.0, self.step_cap)
        if not math.isfinite(value):
            if not self.started:
                raise ValueError(
                    f"`value`={value} cannot be the accuracy guard's baseline: the value before the first pruning "
                    "event must be a finite number."
                )
            value = -math.inf if self.mode == "max" else math.inf  # judged as the worst possible result
        if not self.awaiting_check:
            if not self.started:  # the latest value before the first event is the baseline
                self.baseline = value
                return GuardDecision("baseline", value, 0.0, self.step_cap)
            return None
        self.awaiting_check = False
        drop = self.drop(value)
        if self.within_max_drop(value):
            return GuardDecision("accept", value, drop, self.step_cap)
        self.rollbacks += 1
        self.step_cap = self.last_step / 2.0
        if self.step_cap < self.min_step:
            self.stopped = True
            return GuardDecision("stop", value, drop, self.step_cap)
        return GuardDecision("rollback", value, drop, self.step_cap)

    def limit(self, current: float, scheduled: float) -> float:
        """Sparsity to prune to now, given the schedule's wish."""
        if self.stopped:
            return current
        if self.step_cap is not None:
            return min(scheduled, current + self.step_cap)
        return scheduled

    def event_applied(self, previous: float, new: float) -> None:
        """An event pruned from ``previous`` to ``new``; one joining an event still unjudged adds to its step (a
        rollback halves the step both took since the judged copy)."""
        self.last_step = new - previous + (self.last_step if self.awaiting_check else 0.0)
        self.started = True
        self.awaiting_check = True

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The run's state from ``state``; the settings (``max_drop``, ``mode``, ``min_step``) stay this guard's. A
        state saved reading the metric the other way (``mode``) holds a baseline this guard cannot compare with:
        the next value is the new baseline."""
        settings = ("max_drop", "mode", "min_step")
        check_guard_state(state)  # all of it before anything changes (a trial: a string baseline failed mid-fit)
        for key, value in state.items():
            if key in self.__dataclass_fields__ and key not in settings:
                setattr(self, key, value)
        if state.get("mode", self.mode) != self.mode:
            self.forget_baseline()

    def forget_baseline(self) -> None:
        """The monitored metric changed (a resumed fit monitors another one): the next value is the baseline."""
        self.baseline = None


def check_guard_state(state: Any) -> None:
    """Refuse a saved guard state whose values are not what :class:`AccuracyGuard` writes, naming the entry."""
    if not isinstance(state, Mapping):
        raise ValueError(f"the accuracy guard's state must be a dict, got {type(state).__name__}.")
    numbers_or_none = ("baseline", "step_cap")
    for key, value in state.items():
        if key in numbers_or_none:
            ok = value is None or (is_real(value) and math.isfinite(value))
        elif key in ("stopped", "started", "awaiting_check"):
            ok = isinstance(value, bool)
        elif key in ("last_step", "max_drop", "min_step"):
            ok = is_real(value) and math.isfinite(value)
        elif key == "rollbacks":
            ok = is_integer(value) and int(value) >= 0
        elif key == "mode":
            ok = value in ("min", "max")
        else:
            ok = True  # not read
        if not ok:
            raise ValueError(f"the accuracy guard's state has {key}={repr(value)[:60]}: the checkpoint is damaged.")
