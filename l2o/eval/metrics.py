"""The measuring rules of the evaluation, on plain loss curves (numpy only).

Smoothing, final loss, divergence, speedup, the learning-rate tuning rule and
the win/tie rule. Nothing here trains a model or knows about optimizers, so
the rules can be tested on hand-made curves and the figures
(:mod:`l2o.plots`) can reuse them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

SMOOTH_FRAC = 0.10             # window of the final-loss average and of curve smoothing
DIVERGE_FACTOR = 3.0
TIE_RTOL = 0.005   # final losses within 0.5% are a tie, not a win (noise between seeds is larger)


def smooth(curve, window: int | None = None, frac: float = SMOOTH_FRAC) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` points average what exists so far.

    NaN (a run that stopped early) stays NaN; the window defaults to
    ``frac`` of the curve's length (at least one step).
    """
    x = np.asarray(curve, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"smooth expects a 1-D curve, got shape {x.shape}")
    if x.size == 0:
        return x
    w = window if window is not None else smooth_window(len(x), frac)
    c = np.concatenate([[0.0], np.cumsum(x)])   # NaN propagates forward, as it should
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - w)
    return (c[idx] - c[lo]) / (idx - lo)


def smooth_window(steps: int, frac: float = SMOOTH_FRAC) -> int:
    return max(1, int(math.ceil(frac * steps)))


def final_loss(curve, frac: float = SMOOTH_FRAC) -> float:
    """Mean of the last ``frac`` of the losses (NaN if the run did not finish)."""
    x = np.asarray(curve, dtype=float)
    return float(np.mean(x[-smooth_window(len(x), frac):]))


def is_diverged(curve, factor: float = DIVERGE_FACTOR, window: int | None = None) -> bool:
    """Non-finite anywhere, or the smoothed loss above ``factor`` x the initial loss."""
    x = np.asarray(curve, dtype=float)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return True
    return bool(np.any(smooth(x, window) > factor * x[0]))


def steps_to_reach(smoothed, target: float) -> int | None:
    """1-based number of steps until the (smoothed) curve is <= target; None if never."""
    hits = np.nonzero(np.asarray(smoothed, dtype=float) <= target)[0]
    return int(hits[0]) + 1 if hits.size else None


@dataclass
class Speedup:
    value: float           # NaN when undefined (the reference diverged)
    reached: bool          # False: never reached the target; value is an upper bound
    ref_steps: int | None  # steps the reference needed to reach its own final loss
    steps: int | None      # steps the candidate needed (None if never)

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:.2f}x" if self.reached else f"<{self.value:.2f}x"


def speedup(reference, candidate, window: int | None = None) -> Speedup:
    """Steps ``reference`` needs to reach its own final smoothed loss divided by
    the steps ``candidate`` needs to reach that same loss (both smoothed).

    Curves are per-step losses of equal budgets. If the candidate never
    reaches the target, the returned value is ``ref_steps / budget`` with
    ``reached=False``: the candidate would need more than the whole budget,
    so the true speedup is below that.
    """
    ref = smooth(reference, window)
    cand = smooth(candidate, window)
    if ref.size == 0 or not np.isfinite(ref[-1]):
        return Speedup(float("nan"), False, None, None)
    target = ref[-1]
    ref_steps = steps_to_reach(ref, target)
    cand_steps = steps_to_reach(np.where(np.isfinite(cand), cand, np.inf), target)
    if cand_steps is None:
        return Speedup(ref_steps / len(cand), False, ref_steps, None)
    return Speedup(ref_steps / cand_steps, True, ref_steps, cand_steps)


def select_lr(scores: Mapping[float, Sequence[tuple[float, bool]]]) -> tuple[float, bool]:
    """The tuning rule: lowest mean final train loss over the tuning seeds,
    excluding learning rates where any tuning run diverged.

    ``scores[lr]`` is a list of ``(final_train_loss, diverged)``. Returns
    ``(lr, ok)``; if every value diverged, ``ok`` is False and the smallest
    learning rate is returned (the one least likely to blow up).
    """
    if not scores:
        raise ValueError("select_lr: empty grid")
    usable = {lr: float(np.mean([f for f, _ in runs])) for lr, runs in scores.items()
              if runs and not any(d for _, d in runs) and all(math.isfinite(f) for f, _ in runs)}
    if not usable:
        return min(scores), False
    return min(usable, key=lambda lr: (usable[lr], lr)), True


def beats(a: Mapping | None, b: Mapping | None, key: str = "final_train_loss") -> str | None:
    """"win" / "tie" / "loss" of row ``a`` against row ``b`` on ``key`` (final
    train loss or test loss); a diverged run (NaN) never wins and beats any
    diverged one. None when either row is missing."""
    if a is None or b is None:
        return None
    fa, fb = a[key], b[key]
    if not math.isfinite(fa):
        return "loss"
    if not math.isfinite(fb):
        return "win"
    if abs(fa - fb) <= TIE_RTOL * max(abs(fa), abs(fb)):
        return "tie"
    return "win" if fa < fb else "loss"
