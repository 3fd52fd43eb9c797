"""How fast each fused GMN pass runs on Hugging Face GPT-2 small, against this machine's matmul rate.

    .venv/bin/python bench/pass_rates.py [--steps 3] [--threads 2] [--edge-states float16]

One ``GMNOptimizer`` on GPT-2 small (random init, batch 4 x 128 tokens);
after a warm-up step, ``--steps`` steps each time every call of the fused
pass kernel (``FusedKernels.gmn_pass``), grouped by kind: a round pass
(which rounds it runs, from which kept state) or the read-out. Per kind it
prints the time per edge and the multiply-adds per second, counting the
products of the metanetwork's edge layers an edge goes through in that pass
(encoder ``F x De``, each message layer ``De x De``, the read-out
``(De + F) x H`` and its head ``H x 2``; node terms, features and the update
formula are not counted). The reference is ``torch.mm`` of two 2048 x 2048
float32 matrices on the same threads, timed in the same process: what this
CPU's multiply-add units reach on dense, cache-blocked work. Minimum over the
steps (the least disturbed by other work on a shared machine) and median.
"""
from __future__ import annotations

import argparse
import statistics
import time


def matmul_gmacs(reps: int = 5, n: int = 2048) -> float:
    """torch.mm's multiply-adds per second (best of ``reps``)."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edge-states", default="float16", choices=["auto", "recompute", "float32", "float16"])
    args = ap.parse_args()
    import torch
    import transformers

    import l2o
    from l2o.features import NUM_ENTRY_FEATURES
    from l2o.fast import kernel_calls

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    x = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(1))
    opt = l2o.GMNOptimizer(model, edge_states=args.edge_states)
    lopt = opt.lopt
    de, hid, nf = lopt.edge_dim, lopt.hidden, NUM_ENTRY_FEATURES

    def macs(rounds: int, first: int, readout: bool) -> int:
        """Multiply-adds per edge of a pass running rounds [first, rounds) (and the read-out)."""
        return ((nf * de if first == 0 else 0) + (rounds - first) * de * de
                + ((de + nf) * hid + 2 * hid if readout else 0))

    step_times: dict[tuple, float] = {}
    edges: dict[tuple, int] = {}
    inner = kernel_calls.FusedKernels.gmn_pass

    def timed(self, state, rows, cols, per_group, encode, layers, first, kept, **out):
        t0 = time.perf_counter()
        result = inner(self, state, rows, cols, per_group, encode, layers, first, kept, **out)
        key = ("read-out" if "readout" in out else "round pass", len(layers), first)
        step_times[key] = step_times.get(key, 0.0) + time.perf_counter() - t0
        edges[key] = edges.get(key, 0) + rows * cols
        return result

    kernel_calls.FusedKernels.gmn_pass = timed
    times: dict[tuple, list[float]] = {}
    step_edges: dict[tuple, int] = {}
    for s in range(args.steps + 1):       # step 0: warm-up
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        step_times.clear()
        edges.clear()
        opt.step()
        if s:
            for key, t in step_times.items():
                times.setdefault(key, []).append(t)
            step_edges = dict(edges)
    reference = matmul_gmacs()
    print(f"GPT-2 small, edge_states={args.edge_states}, {args.threads} threads; torch.mm 2048^3: "
          f"{reference:.1f} GMAC/s")
    if not times:
        print("no fused pass ran (the fused kernels did not build here: l2o.fast.native.status())")
    for key, ts in sorted(times.items(), key=lambda kv: (kv[0][0] == "read-out", kv[0][1], kv[0][2])):
        kind, rounds, first = key
        n, per_edge = step_edges[key], macs(rounds, first, kind == "read-out")
        best, med = min(ts), statistics.median(ts)
        label = f"{kind} (rounds {first}..{rounds - 1})" if kind == "round pass" else \
            f"{kind} (after rounds 0..{first - 1} kept)" if first else f"{kind} (all rounds recomputed)"
        print(f"  {label:<40} {n / 1e6:6.1f}M edges  {per_edge:4d} MAC/edge  min {best:.3f} s "
              f"({best / n * 1e9:5.2f} ns/edge, {per_edge * n / best / 1e9:5.1f} GMAC/s, "
              f"{per_edge * n / best / 1e9 / reference:4.0%} of torch.mm)  median {med:.3f} s")


if __name__ == "__main__":
    main()
