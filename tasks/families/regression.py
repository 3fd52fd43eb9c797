"""Regression MLPs on the synthetic teacher (MSE objective).

Train: 1-3 layers of width 16-64, relu/tanh/gelu.  Held out: deeper, with
LayerNorm and held-out activations.
"""
from __future__ import annotations

from ..task import Task
from .layers import HELDOUT_ACTIVATIONS, SAMPLED_ACTIVATIONS, family_rng, sampled_name
from .mlp import mlp_task

FAMILY = "regression"


def regression_task(name, split, widths, act, layer_norm=False, batch_size=64) -> Task:
    return mlp_task(name, split, "synthetic_reg", widths, act, layer_norm, batch_size,
                    family=FAMILY, objective="mse")


def named_tasks() -> list[Task]:
    return [
        regression_task("regression_teacher", "train", [32, 32], "relu"),
        regression_task("regression_teacher_deep_ln", "heldout", [64] * 4, "elu", layer_norm=True),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    if split == "train":
        widths = [rng.choice([8, 16, 32, 64, 128]) for _ in range(rng.randint(1, 3))]
        act, layer_norm = rng.choice(SAMPLED_ACTIVATIONS), rng.random() < 0.4
    else:
        widths = [rng.choice([64, 96, 128]) for _ in range(rng.randint(4, 5))]
        act, layer_norm = rng.choice(HELDOUT_ACTIVATIONS), True
    return regression_task(sampled_name(FAMILY, split, seed), split, widths, act, layer_norm,
                           batch_size=rng.choice([32, 64, 128]))
