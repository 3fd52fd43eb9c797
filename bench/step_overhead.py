"""Train-step cost (forward + backward + optimizer step) of Adam, MLPOptimizer
and GMNOptimizer on two reference models, as ratios to Adam in the same run.

    python bench/step_overhead.py [--rounds 7] [--steps 5] [--threads 2] [--device cuda]

Candidates are interleaved and their order rotated every round; the table
reports medians, because this machine's two cores are shared and noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import l2o


def reference_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def reference_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


OPTIMIZERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "mlp_lopt": lambda m: l2o.MLPOptimizer(m.parameters(), weights=None),
    "gmn": lambda m: l2o.GMNOptimizer(m, weights=None),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, opt, x, y, steps: int) -> tuple[float, float]:
    """Median ms of a whole train step and of opt.step alone."""
    whole, step_only = [], []
    sync(x.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sync(x.device)
        t1 = time.perf_counter()
        opt.step()
        sync(x.device)
        t2 = time.perf_counter()
        whole.append(t2 - t0)
        step_only.append(t2 - t1)
    return statistics.median(whole) * 1e3, statistics.median(step_only) * 1e3


def bench_model(name: str, make_model, x, y, rounds: int, steps: int) -> tuple[float, float]:
    """Prints the table; returns the GMN's train-step ratios to Adam and to the MLP-lopt."""
    runs = {}
    for key, make_opt in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = make_model().to(x.device)
        opt = make_opt(model)
        time_steps(model, opt, x, y, 2)  # warm-up: allocator, graph build already done
        runs[key] = (model, opt)
    whole = {k: [] for k in runs}
    step = {k: [] for k in runs}
    keys = list(runs)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            w, s = time_steps(*runs[key], x, y, steps)
            whole[key].append(w)
            step[key].append(s)
    n_params = sum(p.numel() for p in runs["adam"][0].parameters())
    adam = statistics.median(whole["adam"])
    print(f"\n{name}: {n_params / 1e3:.0f}k params, batch {x.shape[0]}")
    print(f"{'optimizer':<10} {'train step ms':>14} {'opt.step ms':>12} {'x Adam':>8}")
    for key in keys:
        w, s = statistics.median(whole[key]), statistics.median(step[key])
        print(f"{key:<10} {w:>14.1f} {s:>12.1f} {w / adam:>8.2f}")
    gmn, mlp = statistics.median(whole["gmn"]), statistics.median(whole["mlp_lopt"])
    print(f"GMN / MLP-lopt train-step ratio: {gmn / mlp:.2f}")
    return gmn / adam, gmn / mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, medians over {args.rounds} interleaved rounds")
    cnn_adam, _ = bench_model("reference CNN (convs 32/64/64, 28x28x1)", reference_cnn, x, y, args.rounds, args.steps)
    mlp_adam, mlp_mlp = bench_model("reference MLP (784-1024-1024-10)", reference_mlp, x, y, args.rounds, args.steps)
    print("\ntargets (issue 4):")
    for label, value, limit in (("CNN: GMN <= 1.5x Adam", cnn_adam, 1.5), ("MLP: GMN <= 6x Adam", mlp_adam, 6.0),
                                ("MLP: GMN <= 1.5x MLP-lopt", mlp_mlp, 1.5)):
        print(f"  {label:<28} {value:5.2f}  {'met' if value <= limit else 'NOT met'}")


if __name__ == "__main__":
    main()
