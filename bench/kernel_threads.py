"""The fused kernels' loops on torch's OpenMP thread pool vs on threads of
their own (the two ways ``l2o.fast.native._threading`` can build them), each
a library of its own, swapped under one optimizer step by step, interleaved
(the order rotated every round), on models whose runs are split over threads:

    python bench/kernel_threads.py [--repeats 7] [--threads 2]

The whole ``opt.step()`` is timed, not a kernel alone: what slows threads of
the kernels' own is torch's pool spinning after the torch ops between the
kernel calls (node terms, the step-size multiplier, ...), so the step has to
run as it does in training. The ratio column is each build's median over the
own-threads build's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import l2o
from l2o.fast import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_widths import kernels_per_build  # noqa: E402


def gpt2_mlp_blocks():
    """Two GPT-2-small MLP blocks (768 -> 3072 -> 768), 9.4M parameters."""
    layers = []
    for _ in range(2):
        layers += [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]
    return nn.Sequential(*layers), torch.randn(64, 768)


def wide_mlp():
    w = 2048
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)), torch.randn(64, w)


MODELS = {"GPT-2 MLP blocks x2 (9.4M)": gpt2_mlp_blocks, "MLP width 2048 (8.4M)": wide_mlp}


def kernels_per_threading(lopt) -> dict[str, object]:
    """One kernel library per way of threading (built into a fresh cache)."""
    ways = {"torch's OpenMP pool" if way[0] else "own threads": way for way in native._threading()}
    return kernels_per_build(lopt, "_threading", ways)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["L2O_CACHE"] = tempfile.mkdtemp(prefix="l2o_threads_")
    print(f"torch {torch.__version__}, {args.threads} threads, OpenMP runtime {native.torch_openmp_runtime()}, "
          f"median of {args.repeats} interleaved optimizer steps\n")
    for name, make in MODELS.items():
        for kind in (l2o.GMNOptimizer, l2o.MLPOptimizer):
            torch.manual_seed(0)
            model, x = make()
            opt = kind(model, impl="fused")
            model(x).pow(2).mean().backward()
            opt.step()   # builds the backend and its workspaces
            builds = kernels_per_threading(opt.lopt)
            times: dict[str, list[float]] = {k: [] for k in builds}
            keys = list(builds)
            for r in range(args.repeats):
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    opt.backend.kernels = builds[k]
                    t0 = time.perf_counter()
                    opt.step()
                    times[k].append(time.perf_counter() - t0)
            medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            base = medians.get("own threads")
            for k, ms in medians.items():
                ratio = f"{ms / base:.2f}x" if base else "-"
                print(f"{name:<28} {kind.__name__:<13} {k:<20} {ms:>8.1f} ms  {ratio}")
        print(flush=True)


if __name__ == "__main__":
    main()
