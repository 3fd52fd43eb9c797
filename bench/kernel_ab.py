"""Interleaved A/B of versions of the fused kernels' source (``l2o/fast/kernels.c``):
one kernel library per source file, each driving its own ``ChunkedBackend``
over the same GPT-2-like stack (an embedding tied to the output, MLP blocks of
width 4 d), the read-out applying the updates to the parameters as in
``GMNOptimizer``, the backends' steps alternated in an order rotated every
round in one process; prints each source's median step time and its ratio to
the first: the median over rounds of the two steps' ratio within a round.

    git show HEAD~1:l2o/fast/kernels.c > /tmp/old.c
    python bench/kernel_ab.py /tmp/old.c l2o/fast/kernels.c [--edge-states float16]

Give the same file twice to see this machine's noise floor: on the 2-core
EPYC of 2026-12-02 two identical builds differed by up to 7% in the whole
step, and by 5-15% in single phases in a later session (ratios of medians,
before they were paired per round), so a change has to do better than that
to be told apart there. The
per-phase medians (``bench/gpt2_step.py``'s phases) show the passes a change
touches on their own: a round-pass change in the message-passing rounds. The sources must keep the
C interface ``l2o/fast/native.py`` and ``kernel_calls.py`` expect.
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
from l2o.fast.backend import ChunkedBackend, fused_kernels
from l2o.fast.features import DirectApply
from l2o.fast.gmn import EDGE_STATES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_step import PHASES, time_phases  # noqa: E402


class TiedStack(nn.Module):
    def __init__(self, vocab: int, d: int, blocks: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                      for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(self.emb(x)) @ self.emb.weight.t()


class ApplyToParams:
    """A sink as ``GMNOptimizer``'s: the fused read-out applies each run's
    update to the parameters itself (``DirectApply``), which ``step_flat``
    would write into a flat update instead; each backend steps its own copy."""

    def __init__(self, params: list[torch.Tensor], graph, lr: float = 1e-4):
        self.params, self.starts, self.lr = params, [t.start for t in graph.tensor_slices], lr

    def direct(self, k: int, s: int, e: int) -> DirectApply:
        return DirectApply(self.params[k][s - self.starts[k]:e - self.starts[k]], self.lr, 1.0, lambda count: None)

    def __call__(self, k: int, s: int, e: int, u: torch.Tensor) -> None:
        self.params[k][s - self.starts[k]:e - self.starts[k]].add_(u, alpha=self.lr)


def kernels_of(lopt, source: Path):
    """The kernel library built from ``source`` (into a fresh cache)."""
    native._SOURCE, os.environ["L2O_CACHE"] = source, tempfile.mkdtemp(prefix="l2o_ab_")
    native.forget()
    kernels = fused_kernels(lopt, "cpu")
    if kernels is None:
        raise SystemExit(f"{source}: {native.status()}")
    return kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path, help="kernels.c versions (the first is the baseline)")
    ap.add_argument("--edge-states", default="float16", choices=EDGE_STATES)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per source (after one untimed)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for source in args.sources:
        if not source.is_file():
            ap.error(f"no such file: {source}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TiedStack(args.vocab, args.width, args.blocks)
    graph = l2o.build_graph(model, (torch.zeros(2, 8, dtype=torch.long),))
    lopt = l2o.GMNLOpt().requires_grad_(False)
    original = native._SOURCE
    try:
        backends = [ChunkedBackend(lopt, graph, kernels_of(lopt, s), edge_states=args.edge_states)
                    for s in args.sources]
    finally:
        native._SOURCE = original
        native.forget()
    flat = graph.gather([p.detach() for p in model.parameters()])
    grads = list((torch.randn_like(flat) * 1e-3).split(graph.numels))
    sinks = [ApplyToParams(list(flat.clone().split(graph.numels)), graph) for _ in backends]
    states = [lopt.init_state(flat) for _ in backends]
    times: list[list[float]] = [[] for _ in backends]
    phases: list[dict[str, list[float]]] = [{name: [] for name in PHASES} for _ in backends]
    totals: dict[str, float] = {}
    time_phases(totals)
    print(f"{graph.num_params / 1e6:.1f}M parameters, edge_states={args.edge_states}, {args.threads} threads, "
          f"median of {args.steps} interleaved steps", flush=True)
    order = list(range(len(backends)))
    for r in range(args.steps + 1):
        for i in order[r % len(order):] + order[:r % len(order)]:
            totals.clear()
            t0 = time.perf_counter()
            backends[i].step_entries(sinks[i].params, grads, states[i], sinks[i])
            if r:   # the first round allocates the workspaces
                times[i].append(time.perf_counter() - t0)
                for name in PHASES:
                    phases[i][name].append(totals.get(name, 0.0))
    # each ratio pairs a step with the first source's step of the same round: the
    # machine's speed drifts by more than a change's effect over a run, less within a round
    for source, t, ph in zip(args.sources, times, phases):
        print(f"  {str(source):<40} {statistics.median(t):7.3f} s  {paired_ratio(t, times[0]):.3f}x")
        print("    " + ", ".join(f"{name} {statistics.median(v):.3f} s ({paired_ratio(v, phases[0][name]):.3f}x)"
                                   for name, v in ph.items() if statistics.median(phases[0][name]) > 0))


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over rounds of a step's time over the baseline's in the same round
    (rounds where the baseline took no time in a phase left out)."""
    return statistics.median([t / b for t, b in zip(times, base) if b > 0] or [float("nan")])


if __name__ == "__main__":
    main()
