"""GMNOptimizer vs AdamW on Hugging Face GPT-2 small (124M parameters) on CPU.

    .venv/bin/python bench/gpt2_step.py [--rounds 3] [--threads 2] [--batch 4] [--seq 128] [--adamw-lr 1e-4]
                                        [--edge-states auto [float16 ...]] [--phases]

Random init from ``transformers.GPT2Config()`` (no download). Prints:

* the time to build the parameter graph (``build_graph``, uncached) and to
  construct ``GMNOptimizer`` (graph build + plan + lean copy + state), each a
  median over ``--build-repeats`` runs (``bench/graph_build_gpt2.py``);
* the train step (forward + backward + optimizer step) of each optimizer,
  interleaved on identical copies of the model with the order rotated
  every round (this machine's cores are shared: medians and ratios in one
  run are what compare), and the optimizer step alone; one GMN optimizer per
  ``--edge-states`` value (``GMNOptimizer(edge_states=...)``);
* the process's peak resident memory, and each run's loss and times round by round;
* with ``--phases``, where the GMN's optimizer step spends its time (medians
  over the timed rounds): the step's setup (the statistics pass: the
  per-tensor feature sums and the step-size controller's), the message-passing rounds,
  the read-out (which also applies the update), the node-held entries.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2**20
    return float("nan")


PHASES = {"statistics pass + setup": ("l2o.fast.gmn", "GMNChunkedStep", "__init__"),
          "message-passing rounds": ("l2o.fast.gmn", "GMNChunkedStep", "message_passing"),
          "read-out + apply": ("l2o.fast.gmn", "GMNChunkedStep", "readout_edges"),
          "node-held entries": ("l2o.fast.gmn", "GMNChunkedStep", "readout_nodes")}


def time_phases(totals: dict[str, float]) -> None:
    """Wraps each function of ``PHASES`` to add its time to ``totals``."""
    import functools
    import importlib

    for name, (module, cls, fn) in PHASES.items():
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        inner = getattr(owner, fn)

        @functools.wraps(inner)
        def timed(*a, _inner=inner, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0
        setattr(owner, fn, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--weights", default="pretrained", help="GMN weights: 'pretrained' or 'none'")
    ap.add_argument("--adamw-lr", type=float, default=1e-4)
    ap.add_argument("--build-repeats", type=int, default=3)
    ap.add_argument("--edge-states", nargs="+", default=["auto"], choices=["auto", "recompute", "float32", "float16"],
                    help="one GMN optimizer per value, each on its own copy of the model")
    ap.add_argument("--phases", action="store_true", help="time the phases of the GMN's optimizer step")
    args = ap.parse_args()
    import torch
    import transformers
    import l2o
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"adamw": transformers.GPT2LMHeadModel(transformers.GPT2Config())}
    gmns = ["gmn" if es == "auto" else f"gmn {es}" for es in args.edge_states]
    for name in gmns:
        models[name] = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        models[name].load_state_dict(models["adamw"].state_dict())
    n = sum(p.numel() for p in models["adamw"].parameters())
    x = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    from graph_build_gpt2 import fmt, time_build_and_construct
    builds, constructs = time_build_and_construct(models[gmns[0]], args.build_repeats)
    opts = {"adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=args.adamw_lr)}
    for name, es in zip(gmns, args.edge_states):
        opts[name] = l2o.GMNOptimizer(models[name], weights=None if args.weights == "none" else args.weights,
                                      edge_states=es)
    print(f"GPT-2 small: {n / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} threads\n  build_graph {fmt(builds)}\n  GMNOptimizer(model) {fmt(constructs)}",
          flush=True)

    totals: dict[str, float] = {}
    phases = {g: {name: [] for name in PHASES} for g in gmns}
    if args.phases:
        time_phases(totals)
    times = {k: {"train": [], "opt": []} for k in opts}
    losses = {k: [] for k in opts}
    for r in range(args.rounds + 1):          # round 0: warm-up (first-step allocations)
        order = list(opts)[r % len(opts):] + list(opts)[:r % len(opts)]
        for name in order:
            model, opt = models[name], opts[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(x, labels=x).loss
            loss.backward()
            t1 = time.perf_counter()
            totals.clear()
            opt.step()
            t2 = time.perf_counter()
            if r and name in phases and args.phases:
                for phase in PHASES:
                    phases[name][phase].append(totals.get(phase, 0.0))
            losses[name].append(loss.item())
            if r:
                times[name]["train"].append(t2 - t0)
                times[name]["opt"].append(t2 - t1)
        print(f"  round {r}: " + ", ".join(f"{k} loss {losses[k][-1]:.3f}"
                                          + (f" step {times[k]['train'][-1]:.2f} s (opt {times[k]['opt'][-1]:.2f})"
                                             if r else "") for k in opts)
              + f"  (peak RSS so far {_peak_gib():.1f} GiB)", flush=True)
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
    for k in opts:
        print(f"{k:>6}: train step {med[k]['train']:7.2f} s (optimizer step {med[k]['opt']:6.2f} s), "
              f"loss {losses[k][0]:.3f} -> {losses[k][-1]:.3f}")
    for g in gmns:
        print(f"train step {g} / AdamW: {med[g]['train'] / med['adamw']['train']:.2f}x "
              f"(optimizer step alone {med[g]['opt'] / med['adamw']['opt']:.2f}x)")
        if args.phases:
            print(f"{g} optimizer step by phase (medians): " + ", ".join(
                f"{phase} {statistics.median(v):.2f} s" for phase, v in phases[g].items()))
    print(f"peak RSS of this process (all models and optimizers) {_peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
