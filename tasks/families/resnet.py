"""ResNet-style nets: stem conv, residual basic blocks, global pool, Linear.

A block is conv3x3-norm-act-conv3x3-norm plus a shortcut (identity, or a
strided 1x1 conv + norm when the shape changes), then act.  Train sampler:
1-2 blocks, width 4-12, BatchNorm or GroupNorm, every activation.  Held out:
3-4 blocks, width 16+, and CIFAR-10.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..task import Task
from .layers import DATA_SPECS, HELDOUT_ACTIVATIONS, SAMPLED_ACTIVATIONS, activation, family_rng, norm2d, sampled_name

FAMILY = "resnet"


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm2d(norm, c_out)
        self.act1 = activation(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm2d(norm, c_out)
        self.act2 = activation(act)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          norm2d(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act2(h + skip)


class ResNet(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], strides: list[int], norm: str, act: str,
                 classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  norm2d(norm, widths[0]), activation(act))
        blocks, c_in = [], widths[0]
        for c_out, stride in zip(widths, strides):
            blocks.append(ResidualBlock(c_in, c_out, stride, norm, act))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


def resnet_task(name, split, dataset, widths, strides, norm, act, batch_size=64) -> Task:
    shape, classes = DATA_SPECS[dataset]
    config = dict(widths=list(widths), strides=list(strides), norm=norm, activation=act)
    return Task(name=name, family=FAMILY, split=split, dataset=dataset, batch_size=batch_size,
                build=lambda: ResNet(shape[0], widths, strides, norm, act, classes),
                objective="classify", input_shape=shape, config=config)


def named_tasks() -> list[Task]:
    return [
        resnet_task("resnet_digits_bn", "train", "digits", [8, 16], [1, 2], "batch", "relu", batch_size=32),
        resnet_task("resnet_digits_gn_deep", "heldout", "digits", [16, 16, 32, 32], [1, 1, 2, 1], "group", "silu"),
        resnet_task("resnet_cifar10_bn", "heldout", "cifar10", [16, 32, 32], [1, 2, 2], "batch", "relu",
                    batch_size=128),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    if split == "train":
        n_blocks, choices = rng.randint(1, 2), [4, 8, 12]
        norm, act = rng.choice(["batch", "group"]), rng.choice(SAMPLED_ACTIVATIONS)
    else:
        n_blocks, choices, norm, act = rng.randint(3, 4), [16, 24], "group", rng.choice(HELDOUT_ACTIVATIONS)
    base = rng.choice(choices)
    strides = [1] * n_blocks
    if rng.random() < 0.6:
        strides[-1] = 2
    widths = [base * (2 if (i == n_blocks - 1 and strides[-1] == 2) else 1) for i in range(n_blocks)]
    return resnet_task(sampled_name(FAMILY, split, seed), split, "digits", widths, strides, norm, act,
                       batch_size=32 if split == "train" else 64)
