"""Figures for the evaluation: loss curves per task and the speedup bar chart.

Kept apart from :mod:`l2o.eval` so the numbers can be computed (and
tested) without matplotlib, and so the demo can draw the same curves.
Inputs are plain arrays, not evaluation objects, so anything can be plotted.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from .eval.metrics import smooth

# Fixed colours so an optimizer looks the same in every panel and figure.
COLORS = {"gmn": "tab:red", "mlp": "tab:purple", "adam": "tab:blue", "adamw": "tab:cyan", "sgd": "tab:green",
          "adam_default": "tab:gray"}
LABELS = {"gmn": "GMN (learned)", "mlp": "MLP (learned)", "adam": "Adam (tuned)",
          "adamw": "AdamW (tuned)", "sgd": "SGD+mom (tuned)", "adam_default": "Adam (lr 1e-3)"}


def _figure(figsize):
    # A bare Figure, not pyplot: nothing is registered with pyplot and the
    # caller's backend (a notebook's, say) is left alone; savefig renders
    # with the file format's own canvas, so headless machines need no display.
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def _plot_smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaN (steps after an early stop)."""
    return smooth(curve, window=window)


def plot_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                title: str | None = None, labels: Mapping[str, str] | None = None,
                smooth_frac: float = 0.02) -> Path:
    """One panel per task, one line per optimizer: mean over seeds, shaded min..max.

    ``curves[task][optimizer]`` is an array ``[seeds, steps]`` of per-step
    training losses (NaN after a run stopped early for divergence). The
    y axis is logarithmic; a light moving average (``smooth_frac`` of the
    steps) keeps minibatch noise from hiding the trend.
    """
    labels = {**LABELS, **(labels or {})}
    names = list(curves)
    if not names:
        raise ValueError("plot_curves: no curves to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure((5.0 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, task in zip(axes.flat, names):
        for opt, runs in curves[task].items():
            runs = np.atleast_2d(np.asarray(runs, dtype=float))
            window = max(1, int(round(smooth_frac * runs.shape[1])))
            sm = np.stack([_plot_smooth(r, window) for r in runs])
            # Clip at a tiny positive value so a log axis never sees <= 0.
            sm = np.where(np.isfinite(sm), np.maximum(sm, 1e-12), np.nan)
            steps = np.arange(1, sm.shape[1] + 1)
            with np.errstate(all="ignore"), _quiet_nan_warnings():
                mean = np.nanmean(sm, axis=0)
                lo, hi = np.nanmin(sm, axis=0), np.nanmax(sm, axis=0)
            color = COLORS.get(opt)
            # Learned optimizers on top: an untrained one overlaps Adam-like curves.
            ax.plot(steps, mean, label=labels.get(opt, opt), color=color, lw=1.6,
                    zorder=3 if opt in ("gmn", "mlp") else 2)
            if sm.shape[0] > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)
        ax.set_yscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, leg = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, leg, loc="lower center", ncol=len(leg), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 0.95 if title else 1))
    return _save(fig, path)


def plot_speedup(speedups: Mapping[str, Mapping[str, float]], path: str | Path,
                 reached: Mapping[str, Mapping[str, bool]] | None = None,
                 title: str = "Speedup vs tuned Adam (steps to reach Adam's final loss)") -> Path:
    """Grouped bars: ``speedups[task][optimizer]``; hatched bars did not reach
    Adam's final loss within the budget (their value is an upper bound)."""
    tasks = list(speedups)
    if not tasks:
        raise ValueError("plot_speedup: nothing to plot")
    opts = sorted({o for t in tasks for o in speedups[t]}, key=lambda o: list(COLORS).index(o) if o in COLORS else 99)
    width = 0.8 / max(1, len(opts))
    fig = _figure((max(6.0, 1.1 * len(tasks) + 2), 4.2))
    ax = fig.subplots()
    x = np.arange(len(tasks))
    for k, opt in enumerate(opts):
        vals = np.array([speedups[t].get(opt, np.nan) for t in tasks], dtype=float)
        ok = [bool((reached or {}).get(t, {}).get(opt, True)) for t in tasks]
        pos = x + (k - (len(opts) - 1) / 2) * width
        # Bars grow from 1x (no speedup), up for faster and down for slower,
        # so a log axis does not make a slowdown look like a speedup.
        shown = np.where(np.isfinite(vals) & (vals > 0), vals, 1.0)
        bars = ax.bar(pos, shown - 1.0, width, bottom=1.0, label=LABELS.get(opt, opt), color=COLORS.get(opt))
        # A marker at each value: a bar of 1.00x (or close to it) has no height
        # and would otherwise look like a missing result.
        real = np.isfinite(vals) & (vals > 0)
        ax.scatter(pos[real], vals[real], marker="D", s=16, color=COLORS.get(opt), edgecolors="k",
                   linewidths=0.6, zorder=4)
        for bar, v, good, px in zip(bars, vals, ok, pos):
            if not good:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            text = "n/a" if not np.isfinite(v) else ("div" if v <= 0 else f"{'' if good else '<'}{v:.2g}x")
            ax.annotate(text, (px, max(v, 1.0) if np.isfinite(v) and v > 0 else 1.0), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_yscale("log")
    finite = [v for t in tasks for v in speedups[t].values() if np.isfinite(v) and v > 0]
    # Symmetric in log space around 1x, with room for the value labels.
    span = max([1.5] + [max(v, 1 / v) for v in finite]) * 1.4
    ax.set_ylim(1 / span, span)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup (x, log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


class _quiet_nan_warnings:
    """nanmean over an all-NaN column warns; an all-diverged step is expected here."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
