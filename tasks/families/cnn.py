"""Plain CNNs: [Conv2d -> (norm) -> act] * depth -> (global avg pool | flatten) -> Linear.

Train sampler: 1-3 conv layers of 4-32 channels, kernel 3 or 5 (2 or 3 with
stride 2), BatchNorm, GroupNorm or no norm, every activation, on digits (and
FashionMNIST when the data is present).  Held out: more and wider layers, and
CIFAR-10.
"""
from __future__ import annotations

from torch import nn

from ..task import Task
from .layers import DATA_SPECS, HELDOUT_ACTIVATIONS, SAMPLED_ACTIVATIONS, activation, family_rng, norm2d, sampled_name

FAMILY = "cnn"


def build_cnn(in_shape: tuple[int, int, int], channels: list[int], kernels: list[int],
              strides: list[int], norm: str, act: str, head: str, classes: int) -> nn.Sequential:
    c_in, height, width = in_shape
    layers: list[nn.Module] = []
    for c_out, k, s in zip(channels, kernels, strides):
        padding = k // 2 if k % 2 else 0
        layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=padding, bias=(norm == "none")))
        norm_layer = norm2d(norm, c_out)
        if norm_layer is not None:
            layers.append(norm_layer)
        layers.append(activation(act))
        height = (height + 2 * padding - k) // s + 1
        width = (width + 2 * padding - k) // s + 1
        c_in = c_out
    if head == "pool":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    elif head == "flatten":
        layers += [nn.Flatten(), nn.Linear(c_in * height * width, classes)]
    else:
        raise ValueError(f"unknown head {head!r}")
    return nn.Sequential(*layers)


def cnn_task(name, split, dataset, channels, kernels, strides, norm, act, head,
             batch_size=64, family=FAMILY) -> Task:
    shape, classes = DATA_SPECS[dataset]
    config = dict(channels=list(channels), kernels=list(kernels), strides=list(strides),
                  norm=norm, activation=act, head=head)
    return Task(name=name, family=family, split=split, dataset=dataset, batch_size=batch_size,
                build=lambda: build_cnn(shape, channels, kernels, strides, norm, act, head, classes),
                objective="classify", input_shape=shape, config=config)


def named_tasks() -> list[Task]:
    return [
        cnn_task("cnn_digits", "train", "digits", [8, 16], [3, 3], [1, 2], "none", "relu", "pool"),
        cnn_task("cnn_digits_bn", "train", "digits", [8, 16], [3, 3], [1, 2], "batch", "relu", "flatten"),
        cnn_task("cnn_fashion_bn", "train", "fashion_mnist", [8, 16], [3, 3], [2, 2], "batch", "relu", "pool"),
        cnn_task("cnn_digits_gn_deep", "heldout", "digits", [16, 32, 32, 32], [5, 3, 3, 3], [1, 1, 2, 1],
                 "group", "silu", "pool"),
        cnn_task("cnn_cifar10", "heldout", "cifar10", [16, 32, 32], [3, 3, 3], [1, 2, 2], "batch", "relu", "pool",
                 batch_size=128),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    depth = rng.randint(1, 3) if split == "train" else rng.randint(3, 5)
    # Downsample (stride 2) in at most the last two layers: 8x8 digits stay >= 2x2.
    n_down = rng.randint(0, min(2, depth))
    strides = [1] * (depth - n_down) + [2] * n_down
    if split == "train":
        channels = [rng.choice([4, 8, 16, 32]) for _ in range(depth)]
        kernels = [rng.choice([2, 3]) if s == 2 else rng.choice([3, 5]) for s in strides]
        norm, act = rng.choice(["none", "batch", "group"]), rng.choice(SAMPLED_ACTIVATIONS)
    else:
        channels = [rng.choice([24, 32]) for _ in range(depth)]
        kernels = [rng.choice([3, 5]) for _ in strides]
        norm, act = "group", rng.choice(HELDOUT_ACTIVATIONS)
    return cnn_task(sampled_name(FAMILY, split, seed), split, "digits", channels, kernels, strides,
                    norm, act, rng.choice(["pool", "flatten"]), batch_size=rng.choice([32, 64, 128]))
