"""Shared building blocks: activations, norms, dataset shapes, config sampling."""
from __future__ import annotations

import math
import random

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
    "silu": nn.SiLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
}
# The named train tasks use the first three; the train-split samplers draw from
# all of them, so every layer kind the graph builder supports is meta-trained on
# and held-out tasks differ by architecture, size and data, not by unseen layers.
TRAIN_ACTIVATIONS = ("relu", "tanh", "gelu")
HELDOUT_ACTIVATIONS = ("silu", "elu", "leaky_relu")
SAMPLED_ACTIVATIONS = TRAIN_ACTIVATIONS + HELDOUT_ACTIVATIONS

# (per-example input shape, number of classes or outputs)
DATA_SPECS = {
    "digits": ((1, 8, 8), 10),
    "mnist1d": ((1, 40), 10),
    "synthetic_cls": ((16,), 4),
    "synthetic_reg": ((16,), 4),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def norm2d(kind: str, channels: int) -> nn.Module | None:
    """BatchNorm2d, GroupNorm (groups of ~4 channels) or nothing."""
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, max(1, channels // 4)), channels)
    raise ValueError(f"unknown norm {kind!r}")


def features(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def family_rng(family: str, split: str, seed: int) -> random.Random:
    """A config RNG private to (family, split, seed): string seeds are stable across runs."""
    return random.Random(f"{family}/{split}/{seed}")


def sampled_name(family: str, split: str, seed: int) -> str:
    return f"{family}~{split}~{seed}"
