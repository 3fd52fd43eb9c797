"""``python -m l2o.evaluate``: held-out evaluation (the code lives in :mod:`l2o.eval`).

This module keeps the command and the import path ``from l2o import evaluate``
working: it re-exports :mod:`l2o.eval`'s public names and runs its CLI.
"""
from __future__ import annotations

import sys

from .eval.cli import build_parser, main
from .eval.metrics import (DIVERGE_FACTOR, SMOOTH_FRAC, TIE_RTOL, Speedup, beats, final_loss, is_diverged,
                           select_lr, smooth, smooth_window, speedup, steps_to_reach)
from .eval.optimizers import (ADAMW_WEIGHT_DECAY, DEFAULT_GRIDS, HAND_DESIGNED, LEARNED, OPTIMIZERS, SGD_MOMENTUM,
                              EvaluationInputError, MissingWeightsError, optimizer_factory, resolve_weights)
from .eval.protocol import DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_TUNE_SEEDS, TUNE_SEED_BASE, evaluate
from .eval.report import (CSV_COLUMNS, fmt, format_protocol, format_report, format_summary, format_table,
                          write_report)
from .eval.results import EvalResults, summarize, table_rows
from .eval.runner import TEST_BATCHES, Job, RunResult, evaluate_test, run_job, run_jobs, run_training

__all__ = [
    "ADAMW_WEIGHT_DECAY", "CSV_COLUMNS", "DEFAULT_GRIDS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "DEFAULT_TUNE_SEEDS",
    "DIVERGE_FACTOR", "EvalResults", "EvaluationInputError", "HAND_DESIGNED", "Job", "LEARNED",
    "MissingWeightsError", "OPTIMIZERS", "RunResult", "SGD_MOMENTUM", "SMOOTH_FRAC", "Speedup", "TEST_BATCHES",
    "TIE_RTOL", "TUNE_SEED_BASE", "beats", "build_parser", "evaluate", "evaluate_test", "final_loss", "fmt",
    "format_protocol", "format_report", "format_summary", "format_table", "is_diverged", "main",
    "optimizer_factory", "resolve_weights", "run_job", "run_jobs", "run_training", "select_lr", "smooth",
    "smooth_window", "speedup", "steps_to_reach", "summarize", "table_rows", "write_report",
]

if __name__ == "__main__":
    sys.exit(main())
