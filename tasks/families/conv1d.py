"""1-D CNNs on MNIST-1D signals: [Conv1d -> (BatchNorm1d) -> act] * depth -> pool/flatten -> Linear.

Held out as a whole family: Conv1d appears in no train model, so these
tasks test transfer to an unseen layer type on a known kind of signal.
"""
from __future__ import annotations

from torch import nn

from ..task import Task
from .layers import ACTIVATIONS, DATA_SPECS, activation, family_rng, sampled_name

FAMILY = "conv1d"


def build_conv1d(in_shape: tuple[int, int], channels: list[int], kernel: int, strides: list[int],
                 batch_norm: bool, act: str, head: str, classes: int) -> nn.Sequential:
    c_in, length = in_shape
    layers: list[nn.Module] = []
    for c_out, stride in zip(channels, strides):
        layers.append(nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2))
        if batch_norm:
            layers.append(nn.BatchNorm1d(c_out))
        layers.append(activation(act))
        length = (length + 2 * (kernel // 2) - kernel) // stride + 1
        c_in = c_out
    if head == "pool":
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    else:
        layers += [nn.Flatten(), nn.Linear(c_in * length, classes)]
    return nn.Sequential(*layers)


def conv1d_task(name, split, channels, kernel, strides, batch_norm, act, head, batch_size=64) -> Task:
    shape, classes = DATA_SPECS["mnist1d"]
    config = dict(channels=list(channels), kernel=kernel, strides=list(strides), batch_norm=batch_norm,
                  activation=act, head=head)
    return Task(name=name, family=FAMILY, split=split, dataset="mnist1d", batch_size=batch_size,
                build=lambda: build_conv1d(shape, channels, kernel, strides, batch_norm, act, head, classes),
                objective="classify", input_shape=shape, config=config)


def named_tasks() -> list[Task]:
    return [
        conv1d_task("conv1d_mnist1d", "heldout", [16, 32, 32], 5, [1, 2, 2], False, "relu", "flatten"),
        conv1d_task("conv1d_mnist1d_bn", "heldout", [32, 32, 64], 3, [2, 2, 1], True, "gelu", "pool"),
    ]


def sample(seed: int, split: str = "heldout") -> Task:
    """The family is held out: "train" draws what "heldout" draws; "valid" has its own stream."""
    split = "valid" if split == "valid" else "heldout"
    rng = family_rng(FAMILY, split, seed)
    depth = rng.randint(2, 4)
    channels = [rng.choice([16, 24, 32]) for _ in range(depth)]
    strides = [rng.choice([1, 2]) for _ in range(depth)]
    return conv1d_task(sampled_name(FAMILY, split, seed), split, channels, rng.choice([3, 5, 7]),
                       strides, rng.random() < 0.5, rng.choice(sorted(ACTIVATIONS)),
                       rng.choice(["pool", "flatten"]), batch_size=rng.choice([32, 64, 128]))
