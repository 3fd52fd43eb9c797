"""MLP classifiers (Flatten -> [Linear -> (LayerNorm) -> act] * depth -> Linear).

Named train tasks: depth 1-2, width 32-64, relu/tanh/gelu, no norm.  The train
sampler: depth 1-4, width 8-128, every activation, LayerNorm or not, on digits,
mnist1d and the synthetic teacher.  Held out: deeper (4-6) and wider (80-128).
"""
from __future__ import annotations

from torch import nn

from ..task import Task
from .layers import DATA_SPECS, HELDOUT_ACTIVATIONS, SAMPLED_ACTIVATIONS, activation, family_rng, features, sampled_name

FAMILY = "mlp"


def build_mlp(in_features: int, widths: list[int], out_features: int, act: str,
              layer_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = in_features
    for width in widths:
        layers.append(nn.Linear(width_in, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(activation(act))
        width_in = width
    layers.append(nn.Linear(width_in, out_features))
    return nn.Sequential(*layers)


def mlp_task(name: str, split: str, dataset: str, widths: list[int], act: str,
             layer_norm: bool = False, batch_size: int = 64, family: str = FAMILY,
             objective: str = "classify") -> Task:
    shape, outputs = DATA_SPECS[dataset]
    config = dict(widths=list(widths), activation=act, layer_norm=layer_norm)
    return Task(name=name, family=family, split=split, dataset=dataset, batch_size=batch_size,
                build=lambda: build_mlp(features(shape), widths, outputs, act, layer_norm),
                objective=objective, input_shape=shape, config=config)


def named_tasks() -> list[Task]:
    return [
        mlp_task("mlp_digits", "train", "digits", [32], "relu"),
        mlp_task("mlp_mnist1d", "train", "mnist1d", [64, 32], "tanh"),
        mlp_task("mlp_synthetic", "train", "synthetic_cls", [32, 32], "gelu", batch_size=128),
        mlp_task("mlp_digits_deep_silu", "heldout", "digits", [96] * 5, "silu"),
        mlp_task("mlp_mnist1d_wide_ln", "heldout", "mnist1d", [128, 128], "elu", layer_norm=True),
        mlp_task("mlp_mnist", "heldout", "mnist", [128, 64], "relu", batch_size=128),
        # >= 10x the largest meta-training model (~100k parameters)
        mlp_task("mlp_mnist1d_large", "heldout", "mnist1d", [1024, 1024, 512], "gelu", layer_norm=True,
                 batch_size=128),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    dataset = rng.choice(["digits", "mnist1d", "synthetic_cls"])
    if split == "train":
        # widths over a 16x range, depth 1-4, every activation, LayerNorm or not
        widths = [rng.choice([8, 16, 32, 64, 128]) for _ in range(rng.randint(1, 4))]
        act, layer_norm = rng.choice(SAMPLED_ACTIVATIONS), rng.random() < 0.4
    else:
        widths = [rng.choice([80, 96, 128]) for _ in range(rng.randint(4, 6))]
        act, layer_norm = rng.choice(HELDOUT_ACTIVATIONS), rng.random() < 0.5
    return mlp_task(sampled_name(FAMILY, split, seed), split, dataset, widths, act, layer_norm,
                    batch_size=rng.choice([32, 64, 128]))
