"""Held-out evaluation of the learned optimizers against tuned hand-designed ones.

    python -m l2o.evaluate                          # held-out suite, all optimizers
    python -m l2o.evaluate conv1d_mnist1d --steps 300 --seeds 1 --optimizers gmn,adam

One job per module, each importing only the ones above it in this list:

* :mod:`.metrics`    -- the measuring rules on plain curves: smoothing, final loss,
  divergence, speedup, the LR tuning rule, win/tie (numpy only)
* :mod:`.optimizers` -- the compared optimizers and their weights
* :mod:`.runner`     -- one training run, and jobs in worker processes
* :mod:`.results`    -- per-(task, optimizer) rows and the summary over tasks
* :mod:`.report`     -- results.md / .csv / .json, figures, TensorBoard
* :mod:`.protocol`   -- :func:`evaluate`: suite, seeds, tuning, scheduling (the protocol is its docstring)
* :mod:`.cli`        -- ``python -m l2o.evaluate``

The names below load their module on first use, so ``import l2o.eval.metrics``
stays light. ``l2o.evaluate`` re-exports them (the command and the old import path).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "metrics": ("SMOOTH_FRAC", "DIVERGE_FACTOR", "TIE_RTOL", "smooth", "smooth_window", "final_loss",
                "is_diverged", "steps_to_reach", "Speedup", "speedup", "select_lr", "beats"),
    "optimizers": ("OPTIMIZERS", "LEARNED", "HAND_DESIGNED", "DEFAULT_GRIDS", "ADAMW_WEIGHT_DECAY", "SGD_MOMENTUM",
                   "EvaluationInputError", "MissingWeightsError", "resolve_weights", "optimizer_factory"),
    "runner": ("TEST_BATCHES", "RunResult", "evaluate_test", "run_training", "Job", "run_job", "run_jobs"),
    "results": ("EvalResults", "table_rows", "summarize"),
    "report": ("CSV_COLUMNS", "fmt", "format_table", "format_summary", "format_protocol", "format_report",
               "write_report"),
    "protocol": ("DEFAULT_STEPS", "DEFAULT_SEEDS", "DEFAULT_TUNE_SEEDS", "TUNE_SEED_BASE", "evaluate"),
    "cli": ("build_parser", "main"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
