"""Meta-gradient by truncated backpropagation through the unroll.

Each inner run is unrolled K steps with the metanetwork's weights in the
autograd graph; the mean meta-loss term is backpropagated into the weights
(``.grad`` accumulates over the runs of this rank). The state at the end of the
unroll is detached and carried into the next truncation, which is what makes
the estimate *truncated* (biased toward short horizons; see es.py for the
alternative).
"""
from __future__ import annotations

import math

import torch

from .inner import UnrollResult, unroll, unroll_batch


def estimate(lopt, runs, pool, cfg: dict, device, global_batch: int, outer_step: int) -> tuple[float, list[UnrollResult], bool]:
    """Accumulate ``d mean_i(meta_loss_i) / d weights`` over ``runs`` into ``.grad``.

    Divides by ``global_batch`` (the meta-batch over all ranks) so that a sum
    all-reduce across ranks gives the mean. Returns (sum of the runs' meta-losses,
    per-run results, any non-finite meta-loss). Each run's graph is freed right
    after its backward, so memory holds one unroll at a time; with
    ``batch_runs`` the runs are unrolled together (:func:`unroll_batch`: fewer,
    larger metanetwork passes) and backpropagated at once.
    """
    if cfg.get("batch_runs", False):
        # one metanetwork pass per step over all runs, one backward for all of them
        results = unroll_batch(lopt, runs, pool, cfg["unroll"], cfg, device, meta=True)
        values = [_value(r, cfg, outer_step) for r in results]
        kept = [r.meta_loss for r, v in zip(results, values) if math.isfinite(v) and r.meta_loss.requires_grad]
        if kept:
            (torch.stack(kept).sum() / global_batch).backward()
    else:
        results, values = [], []
        for run in runs:
            result = unroll(lopt, run, pool.get(run.spec), cfg["unroll"], cfg, device, meta=True)
            values.append(_value(result, cfg, outer_step))
            if math.isfinite(values[-1]) and result.meta_loss.requires_grad:
                (result.meta_loss / global_batch).backward()  # frees this run's graph at once
            results.append(result)
    for result in results:
        result.meta_loss = result.meta_loss.detach()
    return sum(values), results, not all(math.isfinite(v) for v in values)


def _value(result: UnrollResult, cfg: dict, outer_step: int) -> float:
    if outer_step in cfg.get("inject_nan_steps", []):
        return float("nan")  # testing aid: exercise the skip path end to end
    return float(result.meta_loss.detach())
