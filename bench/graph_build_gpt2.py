"""Time build_graph on Hugging Face GPT-2 small (124M parameters, random init).

Usage: .venv/bin/python bench/graph_build_gpt2.py [--repeats 3]
Reports the median of uncached builds (one thread, as the builder runs) and
the build summary. Needs ``transformers``; no download (config only).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    transformers.logging.set_verbosity_error()
    from l2o.graph import build_graph

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        g = build_graph(model, use_cache=False)
        times.append(time.perf_counter() - t0)
    print(g.summary())
    print(f"GPT-2 small: {g.num_params / 1e6:.1f}M parameters, pieces {g.edge_components()}, "
          f"build median {statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
