"""Outer learning rate: linear warmup, then cosine decay to ``min_lr_frac * lr``.

A pure function of the step (no scheduler object), so resuming needs nothing
but the step counter.
"""
import math


def outer_lr(step: int, lr: float, warmup: int, total: int, min_lr_frac: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))
