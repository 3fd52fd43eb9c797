"""Optimizer memory per parameter: GMNOptimizer, MLPOptimizer and Adam, measured the same way.

    .venv/bin/python bench/memory.py [--widths 1024 2048 4096] [--gpt2] [--threads 1]
                                     [--optimizers adam mlp_lopt gmn gmn_f16]

``gmn`` is ``GMNOptimizer(model)`` (edge states by size), ``gmn_f16`` with
``edge_states="float16"`` (kept as half floats at every size).

Each (model, optimizer) pair runs in a fresh subprocess (so no freed memory of
another one is reused) on CPU: the model, a batch, and its gradients exist
first; then, with the resident set size (RSS, ``/proc/self/status``; the peak
is reset through ``/proc/self/clear_refs`` before each measured interval and
``malloc_trim`` returns freed heap first):

* ``state``: RSS after three steps minus RSS before the optimizer was built
  (what it keeps between steps: statistics, graph, plan, workspaces);
* ``step peak``: the largest peak RSS during ``opt.step()`` (steps 2 and 3)
  minus the RSS just before it (the step's transient working set);
* ``total``: the largest peak RSS during its three steps minus RSS before
  the optimizer was built (state, the first step's allocations and every
  step's working set): what the optimizer adds to training memory;
* ``build``: the peak RSS while building the optimizer (graph or layout
  construction included) minus RSS before it: a one-off.

All in bytes per parameter of the model. Models: 3-layer MLPs of width w
(w -> w -> w -> 10; w=4096 is 33.6M parameters) and, with ``--gpt2``, Hugging
Face GPT-2 small (124M, random init, batch 4 x 128 tokens).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "mlp_lopt", "gmn", "gmn_f16")


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _settle() -> int:
    """RSS after freeing what can be freed; resets the peak to it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()["VmRSS"]


def _model(name: str):
    import torch
    from torch import nn
    from torch.nn import functional as F
    if name == "gpt2":
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        x = torch.randint(0, 50257, (4, 128))
        return model, lambda: model(x, labels=x).loss
    w = int(name.removeprefix("mlp"))
    model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    x, y = torch.randn(64, w), torch.randint(0, 10, (64,))
    return model, lambda: F.cross_entropy(model(x), y)


def measure(model_name: str, opt_name: str, threads: int) -> dict:
    """One measurement, in this process (the driver runs it in a fresh one)."""
    import torch
    import l2o
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = _model(model_name)
    n = sum(p.numel() for p in model.parameters())
    loss_fn().backward()        # gradients exist before the optimizer does
    # modules the optimizers load on first use (l2o imports lazily; torch.optim
    # too) are loaded before measuring: their memory is no optimizer state
    import l2o.optim  # noqa: F401
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    torch.optim.Adam([w]).step()
    del w
    base = _settle()
    t0 = time.perf_counter()
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif opt_name == "mlp_lopt":
        opt = l2o.MLPOptimizer(model.parameters(), weights=None)
    else:
        opt = l2o.GMNOptimizer(model, weights=None, edge_states="float16" if opt_name == "gmn_f16" else "auto")
    build_s = time.perf_counter() - t0
    build_peak = _rss()["VmHWM"] - base
    total_peak = 0
    step_peaks, step_s = [], []
    for i in range(3):
        before = _settle()
        t0 = time.perf_counter()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        peak = _rss()["VmHWM"]
        total_peak = max(total_peak, peak)
        if i:
            step_peaks.append(peak - before)
    state = _settle() - base
    return {"model": model_name, "optimizer": opt_name, "params": n, "state_B": state / n,
            "step_peak_B": max(step_peaks) / n, "total_B": (total_peak - base) / n, "build_B": build_peak / n,
            "build_s": build_s, "step_s": min(step_s[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--gpt2", action="store_true", help="also GPT-2 small (124M; needs ~6 GB)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS,
                    help="which to measure (adam always: the ratios are to it)")
    args = ap.parse_args()
    optimizers = ["adam"] + [o for o in args.optimizers if o != "adam"]
    if args.one:
        print(json.dumps(measure(*args.one, args.threads)))
        return
    models = [f"mlp{w}" for w in args.widths] + (["gpt2"] if args.gpt2 else [])
    rows = []
    print(f"{'model':>8} {'params':>8} | " + " | ".join(f"{o:^35}" for o in optimizers))
    print(f"{'':>8} {'':>8} | " + " | ".join(f"{'state':>7} {'step pk':>7} {'total':>7} {'x':>3} {'build':>7}"
                                           for _ in optimizers))
    for name in models:
        by_opt = {}
        for opt_name in optimizers:
            done = subprocess.run([sys.executable, __file__, "--one", name, opt_name, "--threads", str(args.threads)],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{name}/{opt_name} failed:\n{done.stderr[-2000:]}")
            by_opt[opt_name] = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(by_opt[opt_name])
        adam = by_opt["adam"]["total_B"]
        cells = [f"{r['state_B']:7.1f} {r['step_peak_B']:7.1f} {r['total_B']:7.1f} {r['total_B'] / adam:3.1f} "
                 f"{r['build_B']:7.1f}" for r in by_opt.values()]
        print(f"{name:>8} {by_opt['adam']['params'] / 1e6:7.1f}M | " + " | ".join(cells), flush=True)
    print("bytes per parameter; state: kept between steps; step pk: a step's transient peak; "
          "total: peak over 3 steps incl. state; x: total / Adam's total; build: peak while building the optimizer")
    for r in rows:
        print(f"  {r['model']:>8} {r['optimizer']:>8}: step {r['step_s'] * 1e3:8.1f} ms, build {r['build_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
