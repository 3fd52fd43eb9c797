"""Meta-gradient by Persistent Evolution Strategies (Vicol et al. 2021).

Truncated ES (es.py) and TBPTT only see how the weights change the loss of
the current K-step window, not how they changed the state the window starts
from: both are biased toward short horizons. PES removes that bias. Each
antithetic pair keeps two perturbed copies of the inner run's state that are
only ever advanced with their own perturbed weights, plus the sum ``xi`` of
all noise drawn for them since the run started. Every truncation draws fresh
unit noise ``e`` for the pair, advances the copies with ``w + sigma e`` and
``w - sigma e`` and estimates

    g = mean_pairs (L+ - L-) / (2 sigma) * xi,     xi <- xi + e

which is unbiased for the gradient of the smoothed loss of the whole run so
far. The cost over ES is memory (2 state copies per pair, checkpointed too);
the variance grows with the run length, so keep runs moderate or use more
pairs. The unperturbed state is advanced too (for logging, resets and the
other estimators' kind of carried state). A pair whose copy diverges restarts
from the unperturbed state with ``xi = 0``; a run reset drops all pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import antithetic as A
from .estimator import Estimate, EstimatorSetup, meta_loss_value
from .inner import InnerRun, UnrollResult, unroll


@dataclass
class PersistentES(EstimatorSetup):
    """:class:`~l2o.meta.estimator.GradientEstimator` by PES; the particles travel
    in ``result.final["particles"]`` (carried by :func:`~l2o.meta.inner.advance`)."""
    name = "pes"

    @torch.no_grad()
    def estimate(self, lopt: nn.Module, runs: Sequence[InnerRun], outer_step: int) -> Estimate:
        weights, grads = A.setup(lopt)
        values, results = [], []
        for run in runs:
            result, dropped = self._run(lopt, run, weights, grads, outer_step)
            result.nonfinite_pairs = dropped
            values.append(meta_loss_value(result, outer_step))
            results.append(result)
        total, nonfinite = A.finish(weights, grads, values)
        return Estimate(total, results, nonfinite)

    def _run(self, lopt, run: InnerRun, weights, grads, outer_step: int) -> tuple[UnrollResult, int]:
        """One run: the unperturbed unroll, and each pair's contribution added to ``grads``."""
        cfg, device = self.cfg, self.device
        entry = self.pool.get(run.spec)
        particles = run.particles or [{"+": run.state(), "-": run.state(),
                                       "xi": {n: torch.zeros_like(p) for n, p in weights.items()}}
                                      for _ in range(cfg.es_pairs)]
        result = unroll(lopt, run, entry, cfg.unroll, cfg, device, meta=False)
        new_particles, dropped = [], 0
        for j, pair in enumerate(particles):
            eps = A.noise(weights, cfg.seed, outer_step, run.slot, j, device)
            xi = {n: pair["xi"][n] + eps[n] for n in weights}
            out = {}
            for sign, key in ((1.0, "+"), (-1.0, "-")):
                out[key] = unroll(lopt, run.with_state(pair[key]), entry, cfg.unroll, cfg, device, meta=False,
                                  params_override=A.perturbed(weights, eps, sign, cfg.es_sigma))
            coef = (out["+"].meta_loss - out["-"].meta_loss) / (2.0 * cfg.es_sigma * len(particles) * self.global_batch)
            if torch.isfinite(coef):
                for n in grads:
                    grads[n].add_(coef * xi[n])
            else:
                dropped += 1
            if out["+"].diverged or out["-"].diverged:
                fresh = carried(result)
                new_particles.append({"+": fresh, "-": fresh, "xi": {n: torch.zeros_like(v) for n, v in xi.items()}})
            else:
                new_particles.append({"+": carried(out["+"]), "-": carried(out["-"]), "xi": xi})
        result.final["particles"] = new_particles
        return result, dropped


def carried(result: UnrollResult) -> dict:
    """The part of an unroll's final state a PES particle carries."""
    return {k: result.final[k] for k in ("params", "grad", "buffers", "lopt_state")}
