"""The learned optimizers' no-grad step on each backend (:mod:`l2o.fast`):
the chunked implementation with its passes as torch ops (``chunked``) and as
fused C kernels (``fused``, ``l2o/fast/kernels.c``), against the
differentiable forward they replace (``forward``), per architecture, in one
run; the last column is what ``impl="auto"`` picks on this CPU.

    python bench/fast_step.py [--repeats 7] [--threads 2]

All backends compute the same function (tests/test_backends.py); the table
reports median milliseconds of ``backend.step_flat`` and the speedup of the
fused step over the forward.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import l2o
from l2o.fast import make_backend, native, select_impl
from l2o.layout import tensor_layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import reference_cnn, reference_mlp  # noqa: E402


def transformer():
    return (nn.Sequential(nn.Embedding(1000, 256),
                          nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 3),
                          nn.Linear(256, 1000)),
            (torch.randint(0, 1000, (2, 16)),))


def wide_cnn():
    return (nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(256, 10)),
            (torch.randn(2, 3, 32, 32),))


def depthwise_cnn():
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1)]
    for _ in range(4):
        layers += [nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers), (torch.randn(2, 3, 32, 32),)


MODELS = {
    "reference CNN": lambda: (reference_cnn(), None),
    "depthwise CNN": depthwise_cnn,
    "wide CNN": wide_cnn,
    "reference MLP 784-1024-1024-10": lambda: (reference_mlp(), None),
    "transformer d256 x3 + vocab 1000": transformer,
}


PATHS = ("forward", "chunked", "fused")


def time_backends(backends: dict, lopt, flat, grad, repeats: int) -> dict[str, float]:
    """Median ms of each backend's ``step_flat``, the backends interleaved in
    an order rotated every round (each on its own state)."""
    keys = list(backends)
    times: dict[str, list[float]] = {k: [] for k in keys}
    states = {k: lopt.init_state(flat) for k in keys}
    for r in range(repeats + 1):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            backends[k].step_flat(flat, grad, states[k])
            if r:  # the first round allocates the workspaces
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def time_paths(lopt, graph, flat, grad, repeats: int) -> dict[str, float]:
    return time_backends({path: make_backend(lopt, graph, "cpu", path) for path in PATHS}, lopt, flat, grad, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} interleaved steps; "
          f"'auto picks' is the backend GMNOptimizer / MLPOptimizer.step take on CPU; "
          f"chunked = torch ops, fused = C kernels ({native.status()})\n")
    print(f"{'model':<34} {'params':>9} {'tensors':>7} {'lopt':>5} {'forward ms':>11} {'chunked ms':>11} "
          f"{'fused ms':>9} {'speedup':>8}  auto picks")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, example = make()
        graph = l2o.build_graph(model, example)
        layout = tensor_layout([p.shape for p in model.parameters()])
        flat = graph.gather([p.detach() for p in model.parameters()])
        grad = torch.randn_like(flat)
        for lopt, g in ((l2o.GMNLOpt(), graph), (l2o.MLPLOpt(), layout)):
            lopt.requires_grad_(False)
            flat_l = g.gather([p.detach() for p in model.parameters()])
            t = time_paths(lopt, g, flat_l, grad, args.repeats)
            print(f"{name:<34} {graph.num_params:>9} {graph.num_tensors:>7} {lopt.kind:>5} {t['forward']:>11.1f} "
                  f"{t['chunked']:>11.1f} {t['fused']:>9.1f} {t['forward'] / t['fused']:>7.2f}x  "
                  f"{select_impl(lopt, g, 'cpu')}")


if __name__ == "__main__":
    main()
