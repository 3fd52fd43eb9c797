"""Meta-training throughput on the tiny preset: GMN vs MLP, TBPTT (and ES).

    python bench/meta_train_throughput.py                 # CPU
    python bench/meta_train_throughput.py --device cuda --steps 20

For each metanetwork it times outer steps exactly as ``meta_train.py`` takes
them (estimate + all-reduce + clip + Adam step + carrying the inner runs;
no checkpoints or evaluation), and the same inner steps run as plain
learned-optimizer steps under ``no_grad`` (what using the optimizer costs).
The ratio of the two is the price of differentiating through the unroll.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2o.checkpoint import make_lopt  # noqa: E402
from l2o.meta import config as C  # noqa: E402
from l2o.meta import dist as D  # noqa: E402
from l2o.meta.inner import advance, start_run, unroll  # noqa: E402
from l2o.meta.outer import make_estimator, outer_update  # noqa: E402
from l2o.meta.tasks_pool import TaskPool, suite_specs  # noqa: E402


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(kind: str, estimator: str, device: str, steps: int, warmup: int, preset: str, repeats: int,
          meta_batch: int | None = None) -> dict:
    batched = estimator == "tbptt-batched"
    estimator = "tbptt" if batched else estimator
    cfg = C.resolve(preset, None, {"lopt": kind, "estimator": estimator, "device": device, "batch_runs": batched,
                                   "inner_steps": 10_000,  # no run ends during the timing
                                   **({"meta_batch": meta_batch} if meta_batch else {})})
    dev = torch.device(device)
    torch.manual_seed(0)
    lopt = make_lopt(kind).to(dev)
    params = [p for p in lopt.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    pool = TaskPool(kind, dev)
    specs = suite_specs(cfg.suite)
    runs = [start_run(pool, specs, lopt, 0, s, 0, cfg.inner_steps) for s in range(cfg.meta_batch)]
    gradient_estimator = make_estimator(cfg, pool, dev)
    info = D.DistInfo(device=dev)

    def outer_step(runs, i):
        step = outer_update(gradient_estimator, lopt, opt, params, runs, info, cfg.meta_batch, cfg.clip, i)
        return [advance(r, res) for r, res in zip(runs, step.results)], step.inner_steps

    for i in range(warmup):
        runs, _ = outer_step(runs, i)
    # Alternate timed blocks of outer steps and of plain steps and keep the best of each:
    # on a shared machine the minimum is the least disturbed measurement.
    t_outer = t_plain = float("inf")
    done = warmup
    for _ in range(repeats):
        sync(dev)
        t0, inner = time.perf_counter(), 0
        for i in range(steps):
            runs, n = outer_step(runs, done + i)
            inner += n
        sync(dev)
        t_outer = min(t_outer, time.perf_counter() - t0)
        done += steps
        # The same number of inner steps as plain learned-optimizer steps (no meta-graph).
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                runs = [advance(r, unroll(lopt, r, pool.get(r.spec), cfg.unroll, cfg, dev, meta=False))
                        for r in runs]
        sync(dev)
        t_plain = min(t_plain, time.perf_counter() - t0)
    return {"lopt": kind, "estimator": "tbptt-b" if batched else estimator, "outer_per_s": steps / t_outer, "inner_per_s": inner / t_outer,
            "plain_inner_per_s": inner / t_plain, "ratio": t_outer / t_plain,
            "params": sum(p.numel() for p in params)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed outer steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per configuration; the fastest counts")
    p.add_argument("--preset", default="tiny", choices=sorted(C.PRESETS))
    p.add_argument("--lopts", default="gmn,mlp")
    p.add_argument("--estimators", default="tbptt,tbptt-batched,es,pes",
                   help="tbptt-batched: --batch-runs (one metanetwork pass over the union of the runs' graphs)")
    p.add_argument("--meta-batch", type=int, default=None, help="inner runs per outer step (default: the preset's)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(k, e, args.device, args.steps, args.warmup, args.preset, args.repeats, args.meta_batch)
            for k in args.lopts.split(",") for e in args.estimators.split(",")]
    cfg = C.resolve(args.preset, None, {"meta_batch": args.meta_batch} if args.meta_batch else None)
    print(f"\npreset {args.preset}: meta_batch {cfg.meta_batch} x unroll {cfg.unroll} inner steps per outer "
          f"step, suite {cfg.suite}; device {args.device}, torch threads {torch.get_num_threads()}")
    print("inner/s: inner steps of the meta-batch per second (ES/PES also evaluate 2 x pairs perturbed copies);\n"
          "plain: the same steps as ordinary learned-optimizer steps under no_grad; outer/plain: time ratio")
    print(f"{'lopt':<5} {'estim':<7} {'weights':>8} {'outer/s':>8} {'inner/s':>8} {'plain inner/s':>14} "
          f"{'outer / plain':>14}")
    for r in rows:
        print(f"{r['lopt']:<5} {r['estimator']:<7} {r['params']:>8} {r['outer_per_s']:>8.2f} {r['inner_per_s']:>8.1f} "
              f"{r['plain_inner_per_s']:>14.1f} {r['ratio']:>13.2f}x")


if __name__ == "__main__":
    main()
