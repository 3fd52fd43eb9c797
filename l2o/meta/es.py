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

Noise is drawn from a generator seeded by (seed, outer step, slot, pair):
reproducible, resumable, and identical whatever the number of ranks.
"""
from __future__ import annotations

import math

import torch

from .inner import UnrollResult, unroll


def _noise(shapes: dict[str, torch.Size], seed: int, outer_step: int, slot: int, pair: int, device):
    gen = torch.Generator().manual_seed((seed * 1_000_003 + outer_step * 10_007 + slot * 101 + pair) % (2**63))
    return {n: torch.randn(s, generator=gen).to(device) for n, s in shapes.items()}


@torch.no_grad()
def estimate(lopt, runs, pool, cfg: dict, device, global_batch: int, outer_step: int) -> tuple[float, list[UnrollResult], bool]:
    """Same contract as :func:`l2o.meta.tbptt.estimate`: writes ``.grad``."""
    sigma, pairs = float(cfg["es_sigma"]), int(cfg["es_pairs"])
    weights = {n: p for n, p in lopt.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in weights.items()}
    total, results, nonfinite = 0.0, [], False
    for run in runs:
        entry = pool.get(run.spec)
        dropped = 0
        for pair in range(pairs):
            eps = _noise({n: p.shape for n, p in weights.items()}, cfg["seed"], outer_step, run.slot, pair, device)
            losses = []
            for sign in (1.0, -1.0):
                perturbed = {n: p + sign * sigma * eps[n] for n, p in weights.items()}
                losses.append(unroll(lopt, run, entry, cfg["unroll"], cfg, device, meta=False,
                                     params_override=perturbed).meta_loss)
            coef = (losses[0] - losses[1]) / (2.0 * sigma * pairs * global_batch)
            if not torch.isfinite(coef):
                dropped += 1
                continue
            for n in grads:
                grads[n].add_(coef * eps[n])
        result = unroll(lopt, run, entry, cfg["unroll"], cfg, device, meta=False)
        result.nonfinite_pairs = dropped
        value = float(result.meta_loss)
        if outer_step in cfg.get("inject_nan_steps", []):
            value = float("nan")
        nonfinite |= not math.isfinite(value)
        total += value
        results.append(result)
    for n, p in weights.items():
        p.grad = grads[n] if p.grad is None else p.grad + grads[n]
    return total, results, nonfinite
