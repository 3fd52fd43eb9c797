"""Where "auto" should stop taking the fused step on small models: the forward
and the fused no-grad step of both metanetworks, timed interleaved on the task
samplers' models (8k+ parameters, where "auto" may pick fused), then, for each
candidate ``FUSED_MIN_PARAMS_PER_TENSOR``, the total time and the number of
models where the rule picks the slower step:

    python bench/impl_thresholds.py [--seeds 4] [--valid-seeds 3] [--test-seeds 3] [--repeats 7]

The threshold is chosen on the validation split's samples (the train split's
shown beside) and reported on the held-out split's
(``l2o.fast.backend.FUSED_MIN_PARAMS_PER_TENSOR`` holds the chosen values).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import l2o
import tasks
from l2o.fast.backend import make_backend
from l2o.layout import tensor_layout
from tasks.registry import FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_step import time_backends  # noqa: E402

THRESHOLDS = (500, 750, 1000, 1500, 2000, 3000, 4000, 6000)


def measure(split: str, seeds: int, repeats: int) -> list[dict]:
    rows = []
    for family in FAMILIES:
        for seed in range(seeds):
            task = tasks.sample_task(family, seed, split)
            model = task.init(0)
            n = sum(p.numel() for p in model.parameters())
            if n < 8000:
                continue
            graph = l2o.build_graph(model, task.example_inputs())
            for lopt in (l2o.GMNLOpt(), l2o.MLPLOpt()):
                lopt.requires_grad_(False)
                layout = graph if lopt.kind == "gmn" else tensor_layout([p.shape for p in model.parameters()])
                flat = layout.gather([p.detach() for p in model.parameters()])
                backends = {k: make_backend(lopt, layout, "cpu", k) for k in ("forward", "fused")}
                ms = time_backends(backends, lopt, flat, torch.randn_like(flat), repeats)
                rows.append(dict(task=f"{family}~{split}~{seed}", n=n, t=graph.num_tensors, kind=lopt.kind, **ms))
                print(f"  {rows[-1]['task']:<22} {lopt.kind}  {n:>7} params {graph.num_tensors:>3} tensors  "
                      f"forward {ms['forward']:6.1f} ms  fused {ms['fused']:6.1f} ms", flush=True)
    return rows


def report(split: str, rows: list[dict]) -> None:
    print(f"{split}: total ms over the models (models where the rule picks the slower step), "
          f"fused when params >= threshold x tensors")
    for kind in ("gmn", "mlp"):
        mine = [r for r in rows if r["kind"] == kind]
        best = sum(min(r["fused"], r["forward"]) for r in mine)
        cells = []
        for th in THRESHOLDS:
            fused = [r["n"] >= th * r["t"] for r in mine]
            total = sum(r["fused"] if f else r["forward"] for r, f in zip(mine, fused))
            wrong = sum(f != (r["fused"] < r["forward"]) for r, f in zip(mine, fused))
            cells.append(f"{th}: {total:.0f} ({wrong})")
        print(f"  {kind}  " + "  ".join(cells) + f"  | best possible {best:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--valid-seeds", type=int, default=3)
    ap.add_argument("--test-seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {split: measure(split, seeds, args.repeats)
               for split, seeds in (("train", args.seeds), ("valid", args.valid_seeds),
                                    ("heldout", args.test_seeds))}
    for split, rows in results.items():
        report(split, rows)


if __name__ == "__main__":
    main()
