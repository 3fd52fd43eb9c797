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

import torch

from . import antithetic as A
from .inner import UnrollResult, unroll


@torch.no_grad()
def estimate(lopt, runs, pool, cfg: dict, device, global_batch: int, outer_step: int) -> tuple[float, list[UnrollResult], bool]:
    """Same contract as :func:`l2o.meta.tbptt.estimate`: writes ``.grad``."""
    sigma, pairs = float(cfg["es_sigma"]), int(cfg["es_pairs"])
    weights, grads = A.setup(lopt)
    values, results = [], []
    for run in runs:
        entry = pool.get(run.spec)
        dropped = 0
        for pair in range(pairs):
            eps = A.noise(weights, cfg["seed"], outer_step, run.slot, pair, device)
            losses = [unroll(lopt, run, entry, cfg["unroll"], cfg, device, meta=False,
                             params_override=A.perturbed(weights, eps, sign, sigma)).meta_loss
                      for sign in (1.0, -1.0)]
            coef = (losses[0] - losses[1]) / (2.0 * sigma * pairs * global_batch)
            if not torch.isfinite(coef):
                dropped += 1
                continue
            for n in grads:
                grads[n].add_(coef * eps[n])
        result = unroll(lopt, run, entry, cfg["unroll"], cfg, device, meta=False)
        result.nonfinite_pairs = dropped
        values.append(A.run_value(result, cfg, outer_step))
        results.append(result)
    total, nonfinite = A.finish(weights, grads, values)
    return total, results, nonfinite
