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


from .inner import UnrollResult, unroll


def estimate(lopt, runs, pool, cfg: dict, device, global_batch: int, outer_step: int) -> tuple[float, list[UnrollResult], bool]:
    """Accumulate ``d mean_i(meta_loss_i) / d weights`` over ``runs`` into ``.grad``.

    Divides by ``global_batch`` (the meta-batch over all ranks) so that a sum
    all-reduce across ranks gives the mean. Returns (sum of the runs' meta-losses,
    per-run results, any non-finite meta-loss). Each run's graph is freed right
    after its backward, so memory holds one unroll at a time.
    """
    total, results, nonfinite = 0.0, [], False
    for run in runs:
        result = unroll(lopt, run, pool.get(run.spec), cfg["unroll"], cfg, device, meta=True)
        value = float(result.meta_loss.detach())
        if outer_step in cfg.get("inject_nan_steps", []):
            value = float("nan")  # testing aid: exercise the skip path end to end
        if math.isfinite(value):
            if result.meta_loss.requires_grad:
                (result.meta_loss / global_batch).backward()
        else:
            nonfinite = True
        total += value
        result.meta_loss = result.meta_loss.detach()
        results.append(result)
    return total, results, nonfinite
