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
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .estimator import Estimate, EstimatorSetup, meta_loss_value
from .inner import InnerRun, unroll, unroll_batch


@dataclass
class TruncatedBackprop(EstimatorSetup):
    """:class:`~l2o.meta.estimator.GradientEstimator` by backprop through K steps.

    Each run's graph is freed right after its backward, so memory holds one
    unroll at a time; with ``cfg.batch_runs`` the runs are unrolled together
    (:func:`~l2o.meta.inner.unroll_batch`: fewer, larger metanetwork passes)
    and backpropagated at once.
    """
    name = "tbptt"

    def estimate(self, lopt: nn.Module, runs: Sequence[InnerRun], outer_step: int) -> Estimate:
        cfg = self.cfg
        if cfg.batch_runs:
            # one metanetwork pass per step over all runs, one backward for all of them
            results = unroll_batch(lopt, list(runs), self.pool, cfg.unroll, cfg, self.device, meta=True)
            values = [meta_loss_value(r, outer_step) for r in results]
            kept = [r.meta_loss for r, v in zip(results, values) if math.isfinite(v) and r.meta_loss.requires_grad]
            if kept:
                (torch.stack(kept).sum() / self.global_batch).backward()
        else:
            results, values = [], []
            for run in runs:
                result = unroll(lopt, run, self.pool.get(run.spec), cfg.unroll, cfg, self.device, meta=True)
                values.append(meta_loss_value(result, outer_step))
                if math.isfinite(values[-1]) and result.meta_loss.requires_grad:
                    (result.meta_loss / self.global_batch).backward()  # frees this run's graph at once
                results.append(result)
        for result in results:
            result.meta_loss = result.meta_loss.detach()
        return Estimate(sum(values), results, not all(math.isfinite(v) for v in values))
