"""Pieces shared by the antithetic estimators (:mod:`.es` and :mod:`.pes`).

Noise is drawn from a generator seeded by (seed, outer step, slot, pair):
reproducible, resumable, and identical whatever the number of ranks.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def setup(lopt: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """The metanetwork's trainable weights by name, and a zero gradient for each."""
    weights = {n: p for n, p in lopt.named_parameters() if p.requires_grad}
    return weights, {n: torch.zeros_like(p) for n, p in weights.items()}


def noise(weights: dict[str, torch.Tensor], seed: int, outer_step: int, slot: int, pair: int, device):
    """Unit Gaussian noise shaped like ``weights``, a pure function of the counters."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + outer_step * 10_007 + slot * 101 + pair) % (2**63))
    return {n: torch.randn(p.shape, generator=gen).to(device) for n, p in weights.items()}


def perturbed(weights: dict[str, torch.Tensor], eps: dict[str, torch.Tensor], sign: float, sigma: float):
    return {n: p + sign * sigma * eps[n] for n, p in weights.items()}


def finish(weights: dict[str, nn.Parameter], grads: dict[str, torch.Tensor], values: list[float]) -> tuple[float, bool]:
    """Add the estimate to each weight's ``.grad``; (total meta-loss, whether any run's is non-finite)."""
    for n, p in weights.items():
        p.grad = grads[n] if p.grad is None else p.grad + grads[n]
    return sum(values), any(not math.isfinite(v) for v in values)
