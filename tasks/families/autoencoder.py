"""MLP autoencoders: reconstruct the input through a narrow code (MSE).

Batches are (x, x).  Train: digits, one hidden layer each side, tanh/relu/gelu.
Held out: mnist1d signals, deeper encoders/decoders, held-out activations.
"""
from __future__ import annotations

from torch import nn

from ..task import Task
from .layers import DATA_SPECS, HELDOUT_ACTIVATIONS, SAMPLED_ACTIVATIONS, activation, family_rng, features, sampled_name

FAMILY = "autoencoder"


def build_autoencoder(in_features: int, hidden: list[int], code: int, act: str) -> nn.Sequential:
    widths = [in_features, *hidden, code, *reversed(hidden), in_features]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def autoencoder_task(name, split, dataset, hidden, code, act, batch_size=64) -> Task:
    shape, _ = DATA_SPECS[dataset]
    return Task(name=name, family=FAMILY, split=split, dataset=f"{dataset}_recon", batch_size=batch_size,
                build=lambda: build_autoencoder(features(shape), hidden, code, act),
                objective="mse", input_shape=shape,
                config=dict(hidden=list(hidden), code=code, activation=act))


def named_tasks() -> list[Task]:
    return [
        autoencoder_task("autoencoder_digits", "train", "digits", [32], 8, "tanh"),
        autoencoder_task("autoencoder_mnist1d_deep", "heldout", "mnist1d", [64, 32], 8, "silu"),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    if split == "train":
        dataset, act = "digits", rng.choice(SAMPLED_ACTIVATIONS)
        hidden = sorted((rng.choice([16, 32, 64]) for _ in range(rng.randint(1, 2))), reverse=True)
    else:
        dataset, act = "mnist1d", rng.choice(HELDOUT_ACTIVATIONS)
        hidden = sorted((rng.choice([32, 64, 96]) for _ in range(rng.randint(2, 3))), reverse=True)
    return autoencoder_task(sampled_name(FAMILY, split, seed), split, dataset, hidden,
                            rng.choice([4, 8, 12]), act, batch_size=rng.choice([32, 64, 128]))
