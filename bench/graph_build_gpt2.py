"""Time build_graph and GMNOptimizer(model) on Hugging Face GPT-2 small (124M parameters, random init).

Usage: .venv/bin/python bench/graph_build_gpt2.py [--repeats 5] [--model gpt2|gpt2-medium]

Reports, over ``--repeats`` runs in this process (each run's graph and
optimizer are freed before the next; one thread, as the builder runs):

* ``build_graph(model, use_cache=False)``: recording the forward, mapping it,
  assembling the graph;
* ``GMNOptimizer(model)``: its own graph build plus the step plan, the lean
  copy of the graph and the zeroed statistics (``m``, ``v``: 20 bytes per
  parameter, the one model-sized thing it must write);

the median, the runs, and the build summary. Needs ``transformers``; no
download (config only). Time on a shared machine is noisy: compare medians
from one run.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def time_build_and_construct(model, repeats: int, optimizer: bool = True) -> tuple[list[float], list[float]]:
    """Seconds of ``build_graph(model, use_cache=False)`` and of
    ``GMNOptimizer(model)``, ``repeats`` times each (alternating; everything
    freed between runs)."""
    import l2o
    from l2o.graph import build_graph

    builds, constructs = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        g = build_graph(model, use_cache=False)
        builds.append(time.perf_counter() - t0)
        del g
        if optimizer:
            gc.collect()
            t0 = time.perf_counter()
            opt = l2o.GMNOptimizer(model)
            constructs.append(time.perf_counter() - t0)
            del opt
    return builds, constructs


def fmt(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.2f} s (runs: {', '.join(f'{t:.2f}' for t in ts)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "gpt2-medium"])
    ap.add_argument("--skip-optimizer", action="store_true", help="time build_graph only")
    args = ap.parse_args()
    import transformers
    transformers.logging.set_verbosity_error()
    from l2o.graph import build_graph

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config() if args.model == "gpt2" else \
        transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)
    model = transformers.GPT2LMHeadModel(cfg)
    builds, constructs = time_build_and_construct(model, args.repeats, not args.skip_optimizer)
    g = build_graph(model, use_cache=False)
    print(g.summary())
    print(f"{args.model}: {g.num_params / 1e6:.1f}M parameters, graph pieces {g.edge_components()}, one thread")
    print(f"  build_graph         {fmt(builds)}")
    if constructs:
        print(f"  GMNOptimizer(model) {fmt(constructs)}")


if __name__ == "__main__":
    main()
