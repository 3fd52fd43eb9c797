"""Synthetic teacher-network datasets: labels/targets from a fixed random MLP."""
from __future__ import annotations

import torch

from .arrays import ArrayData

IN_FEATURES = 16
N_CLASSES = 4
REG_OUTPUTS = 4
N_TRAIN, N_TEST = 4096, 1024


def _teacher(x: torch.Tensor, out_features: int, g: torch.Generator) -> torch.Tensor:
    hidden = 32
    w1 = torch.randn(x.shape[1], hidden, generator=g) / x.shape[1] ** 0.5
    w2 = torch.randn(hidden, out_features, generator=g) / hidden ** 0.5
    return torch.tanh(x @ w1 * 1.5) @ w2


def _inputs_and_outputs(out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, IN_FEATURES, generator=g)
    return x, _teacher(x, out_features, g)


def load_classification_data(seed: int = 0) -> ArrayData:
    x, logits = _inputs_and_outputs(N_CLASSES, seed)
    y = logits.argmax(1)
    return ArrayData((x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:]))


def load_regression_data(seed: int = 1) -> ArrayData:
    x, target = _inputs_and_outputs(REG_OUTPUTS, seed)
    g = torch.Generator().manual_seed(seed + 100)
    target = target + 0.05 * torch.randn(target.shape, generator=g)
    target = (target - target[:N_TRAIN].mean(0)) / target[:N_TRAIN].std(0)
    return ArrayData((x[:N_TRAIN], target[:N_TRAIN]), (x[N_TRAIN:], target[N_TRAIN:]))
