"""Time build_graph on a self-written ResNet-18 (~11.7M params) and smaller models.

Usage: .venv/bin/python bench/graph_build.py
Reports the median of several uncached builds (2 threads), plus graph sizes.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from l2o.graph import build_graph


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.down is None else self.down(x)
        return torch.relu(out + skip)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)))


def time_build(model, repeats: int = 5, **kw) -> tuple[float, object]:
    times, graph = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = build_graph(model, use_cache=False, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), graph


def main() -> None:
    torch.set_num_threads(2)
    models = [
        ("resnet18", ResNet18(), {}),
        ("resnet18 (example input)", ResNet18(), {"example_inputs": torch.randn(1, 3, 64, 64)}),
        ("mlp 784-256-256-10", nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                                             nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)), {}),
        ("small cnn", small_cnn(), {}),
        ("tiny transformer", TinyTransformer(), {}),
    ]
    print(f"{'model':28s} {'params':>11s} {'nodes':>7s} {'edges':>11s} {'median s':>9s}")
    for name, model, kw in models:
        t, g = time_build(model, **kw)
        print(f"{name:28s} {g.num_params:11d} {g.num_nodes:7d} {g.num_edges:11d} {t:9.3f}")
    m = models[0][1]
    build_graph(m)                      # fills the per-model cache
    t0 = time.perf_counter()
    build_graph(m)
    print(f"resnet18 cached call: {(time.perf_counter() - t0) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
