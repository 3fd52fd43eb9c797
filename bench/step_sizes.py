"""How large the steps of a learned optimizer are along a run: update norm and loss.

    python bench/step_sizes.py --weights a.safetensors,b.safetensors mlp~valid~1 cnn~valid~0

For each task and weights file: the training loss and the norm of the whole
update (all parameters) every ``--every`` steps, and the median over tensors of
the controller's log step multiplier at those steps. Used to see what
meta-training changed in the step schedule (docs/experiments.md, v7) and how the
controller anneals over long runs (README, "Results").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2o  # noqa: E402
import tasks  # noqa: E402


def profile(task, weights: str, steps: int, every: int) -> tuple[list[float], list[float], list[float]]:
    model = task.init(0)
    opt = l2o.GMNOptimizer(model, weights=weights)
    batches = task.batches("train", seed=0)
    losses, norms, log_lrs = [], [], []
    for step in range(steps):
        opt.zero_grad()
        loss = task.loss(model, next(batches))
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step % every == 0:
            losses.append(loss.item())
            norms.append(sum(float((p.detach() - b).norm()) ** 2 for p, b in zip(model.parameters(), before)) ** 0.5)
            log_lr = [float(s["log_lr"]) for s in opt.state.values() if "log_lr" in s]
            if log_lr:
                log_lrs.append(float(torch.tensor(log_lr).median()))
    return losses, norms, log_lrs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="+")
    p.add_argument("--weights", default="pretrained", help="comma-separated GMN weights files")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.tasks:
        task = tasks.get_task(name)
        for weights in args.weights.split(","):
            losses, norms, log_lr = profile(task, weights, args.steps, args.every)
            print(f"{name} {Path(weights).name}: loss {' '.join(f'{x:.4g}' for x in losses)}; "
                  f"|update| {' '.join(f'{x:.2e}' for x in norms)}"
                  + (f"; median log step multiplier {' '.join(f'{x:.2f}' for x in log_lr)}" if log_lr else ""))


if __name__ == "__main__":
    main()
