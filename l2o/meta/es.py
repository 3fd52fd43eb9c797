"""Meta-gradient by antithetic evolution strategies.

For each inner run and each of ``es_pairs`` noise draws ``e ~ N(0, I)`` over
the metanetwork's weights ``w``, the same K-step unroll (same batches, same
starting state) is evaluated at ``w + sigma e`` and ``w - sigma e``; the
gradient estimate of the Gaussian-smoothed meta-loss is

    g = mean_pairs (L(w + sigma e) - L(w - sigma e)) / (2 sigma) * e.

No backprop through the unroll: memory is that of plain inference and the
estimate stays bounded when the loss surface over long unrolls is chaotic
(Metz et al. 2019, Vicol et al. 2021). Antithetic pairs cancel the
even-order terms of the noise. The inner run is then advanced once with the
unperturbed weights, so every estimator carries the same kind of state.
A pair whose perturbed loss is non-finite (one perturbation diverged) is
dropped from the estimate, as in PES, instead of poisoning the whole
meta-gradient with NaN; dropped pairs are counted (``nonfinite_pairs``).

Noise: :func:`l2o.meta.antithetic.noise` (reproducible, rank-independent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import antithetic as A
from .estimator import Estimate, EstimatorSetup, meta_loss_value
from .inner import InnerRun, unroll


@dataclass
class TruncatedES(EstimatorSetup):
    """:class:`~l2o.meta.estimator.GradientEstimator` by antithetic ES over one truncation."""
    name = "es"

    @torch.no_grad()
    def estimate(self, lopt: nn.Module, runs: Sequence[InnerRun], outer_step: int) -> Estimate:
        cfg, device = self.cfg, self.device
        weights, grads = A.setup(lopt)
        values, results = [], []
        for run in runs:
            entry = self.pool.get(run.spec)
            dropped = 0
            for pair in range(cfg.es_pairs):
                eps = A.noise(weights, cfg.seed, outer_step, run.slot, pair, device)
                losses = [unroll(lopt, run, entry, cfg.unroll, cfg, device, meta=False,
                                 params_override=A.perturbed(weights, eps, sign, cfg.es_sigma)).meta_loss
                          for sign in (1.0, -1.0)]
                coef = (losses[0] - losses[1]) / (2.0 * cfg.es_sigma * cfg.es_pairs * self.global_batch)
                if not torch.isfinite(coef):
                    dropped += 1
                    continue
                for n in grads:
                    grads[n].add_(coef * eps[n])
            result = unroll(lopt, run, entry, cfg.unroll, cfg, device, meta=False)
            result.nonfinite_pairs = dropped
            values.append(meta_loss_value(result, outer_step))
            results.append(result)
        total, nonfinite = A.finish(weights, grads, values)
        return Estimate(total, results, nonfinite)
