"""Helpers shared by the optimizer tests."""
from __future__ import annotations

import torch


def seeded_weights(lopt, seed: int = 0, scale: float = 0.3):
    """`lopt` with every weight drawn from N(0, scale^2) by a seeded generator:
    away from the near-zero output initialisation, so every path of the
    metanetwork shows in its update. Returns `lopt`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lopt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return lopt
