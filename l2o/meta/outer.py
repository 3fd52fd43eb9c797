"""One outer (meta) step: estimate, average over processes, clip, update.

:func:`outer_update` is the step ``meta_train.py`` takes (and what
``bench/meta_train_throughput.py`` times): this process's estimator adds its
share of the meta-gradient to ``.grad``, one all-reduce sums gradients and
counters over processes (so every process takes the same decision), the
gradient is clipped, and the outer optimizer steps unless the estimate is
poisoned (a non-finite meta-loss or gradient norm), in which case weights and
optimizer moments stay untouched and the step counts as skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import dist as D
from .config import MetaConfig
from .es import TruncatedES
from .estimator import GradientEstimator
from .inner import InnerRun, UnrollResult
from .pes import PersistentES
from .tasks_pool import TaskPool
from .tbptt import TruncatedBackprop

ESTIMATORS: dict[str, type] = {cls.name: cls for cls in (TruncatedBackprop, TruncatedES, PersistentES)}


def make_estimator(cfg: MetaConfig, pool: TaskPool, device, global_batch: int | None = None) -> GradientEstimator:
    """The estimator ``cfg.estimator`` names; ``global_batch`` defaults to ``cfg.meta_batch``."""
    cls = ESTIMATORS[cfg.estimator]
    return cls(cfg, pool, device, cfg.meta_batch if global_batch is None else global_batch)


@dataclass
class OuterStep:
    results: list[UnrollResult]     # this process's runs, in order: where each goes next
    meta_loss: float                # mean over the whole meta-batch
    grad_norm: float                # before clipping
    skipped: bool                   # no update: the estimate was not finite
    inner_steps: int                # the rest: totals over all processes
    diverged: int
    finished: int                   # runs that reached their length without diverging
    dropped_pairs: int              # ES/PES: antithetic pairs left out of the estimate


def outer_update(estimator: GradientEstimator, lopt: nn.Module, opt: torch.optim.Optimizer,
                 params: Sequence[nn.Parameter], runs: Sequence[InnerRun], info: D.DistInfo,
                 global_batch: int, clip: float, outer_step: int) -> OuterStep:
    """One outer step at the learning rate ``opt`` already holds (see the module docstring)."""
    opt.zero_grad(set_to_none=True)
    est = estimator.estimate(lopt, runs, outer_step)
    results = est.results
    local = [est.loss_sum, float(est.nonfinite), sum(r.steps for r in results),
             sum(r.diverged for r in results), sum(r.finished and not r.diverged for r in results),
             sum(r.nonfinite_pairs for r in results)]
    total, nonfinite, inner_steps, diverged, finished, dropped = D.all_reduce_grads(info, list(params), local)
    meta_loss = total / global_batch
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    skipped = nonfinite > 0 or not math.isfinite(meta_loss) or not math.isfinite(grad_norm)
    if not skipped:
        opt.step()
    return OuterStep(results, meta_loss, grad_norm, skipped, int(inner_steps), int(diverged), int(finished),
                     int(dropped))
