"""The learned optimizers' no-grad step: the chunked implementation
(``l2o/fast``, what ``GMNOptimizer.step`` runs on CPU from 20k parameters)
against the differentiable forward it replaces, per architecture, in one run.

    python bench/fast_step.py [--repeats 7] [--threads 2]

Both paths compute the same function (tests/test_fast.py); the table reports
median milliseconds of ``lopt.step_no_grad`` and the speedup.
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
from l2o import fast
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


def time_paths(lopt, graph, flat, grad, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"forward": [], "chunked": []}
    states = {path: lopt.init_state(flat) for path in times}
    for r in range(repeats + 1):
        for path in (("forward", "chunked") if r % 2 else ("chunked", "forward")):
            fast.FAST_MIN_PARAMS = 10**15 if path == "forward" else 0
            fast.FAST_MIN_PARAMS_PER_TENSOR = 0
            t0 = time.perf_counter()
            lopt.step_no_grad(graph, flat, grad, states[path])
            if r:  # the first round allocates the workspaces
                times[path].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    defaults = fast.FAST_MIN_PARAMS, fast.FAST_MIN_PARAMS_PER_TENSOR
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} interleaved steps; "
          f"'optimizers use' is the path GMNOptimizer / MLPOptimizer.step take on CPU\n")
    print(f"{'model':<34} {'params':>9} {'tensors':>7} {'lopt':>5} {'forward ms':>11} {'chunked ms':>11} "
          f"{'speedup':>8}  optimizers use")
    try:
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
                fast.FAST_MIN_PARAMS, fast.FAST_MIN_PARAMS_PER_TENSOR = defaults
                used = "chunked" if fast.use_fast_path(g.num_params, "cpu", g.num_tensors) else "forward"
                print(f"{name:<34} {graph.num_params:>9} {graph.num_tensors:>7} {lopt.kind:>5} {t['forward']:>11.1f} "
                      f"{t['chunked']:>11.1f} {t['forward'] / t['chunked']:>7.2f}x  {used}")
    finally:
        fast.FAST_MIN_PARAMS, fast.FAST_MIN_PARAMS_PER_TENSOR = defaults


if __name__ == "__main__":
    main()
