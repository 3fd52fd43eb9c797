"""`make demo`: the learned optimizer vs LR-tuned Adam on a task it never saw.

    python -m l2o.demo                       # conv1d_mnist1d, ~1-2 minutes on a laptop CPU
    python -m l2o.demo --task transformer_reverse_prenorm --steps 400

The default task is a 1-D convolutional network: the whole conv1d family is
held out of meta-training, so the GMN meets this architecture for the first
time here. Adam gets its learning rate tuned on a separate seed (a small
grid); the GMN runs as shipped. Everything is the protocol of
``python -m l2o.evaluate``, reused, on one task.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import eval as ev
from . import plots
from .eval.cli import at_least, user_errors
from .eval.report import check_out_dir

DEFAULT_TASK = "conv1d_mnist1d"
DEFAULT_STEPS = 400  # the evaluation budget and the meta-training inner-run length
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l2o.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default=DEFAULT_TASK, help="a held-out task (python -m tasks list --split heldout)")
    p.add_argument("--steps", type=at_least(1), default=DEFAULT_STEPS)
    p.add_argument("--seeds", type=at_least(1), default=1)
    p.add_argument("--weights", default=None, help="GMN weights file (default: shipped pretrained)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--with-mlp", action="store_true", help="also run the graph-free MLP learned optimizer")
    args = p.parse_args(argv)

    import tasks

    try:
        task = tasks.get_task(args.task)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    if task.split != "heldout":
        print(f"note: {task.name} is in the meta-training split; the demo is meant for held-out tasks",
              file=sys.stderr)

    try:
        ev.resolve_weights("gmn", args.weights, allow_untrained=False)
        untrained = False
    except ev.MissingWeightsError:
        untrained = True
        print("NOTE: no pretrained GMN weights are installed (l2o/pretrained/gmn.safetensors).\n"
              "      Running an UNTRAINED GMN, which behaves like Adam at lr 1e-3; the comparison below\n"
              "      shows the machinery, not the learned optimizer. Meta-train with meta_train.py.\n",
              file=sys.stderr)
    except user_errors() as err:    # a weights file missing, corrupt or of the other kind
        print(f"error: {err}", file=sys.stderr)
        return 2

    optimizers = ["gmn", "mlp", "adam"] if args.with_mlp else ["gmn", "adam"]
    try:
        check_out_dir(args.out)
        print(f"Training {task.describe()} for {args.steps} steps: GMNOptimizer(model) vs Adam "
              f"(lr tuned over {', '.join(f'{x:g}' for x in ADAM_GRID)} on a separate seed)")
        with warnings.catch_warnings():
            # Graph-builder notes about unstructured parameters are expected on
            # some architectures; the evaluation reports results, not warnings.
            warnings.simplefilter("ignore", UserWarning)
            results = ev.evaluate([task.name], optimizers, steps=args.steps, seeds=args.seeds,
                                  lr_grids={"adam": ADAM_GRID}, gmn_weights=args.weights,
                                  allow_untrained=untrained or args.with_mlp, out_dir=None)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = {"gmn": "GMN (untrained)" if untrained else "GMN (pretrained)"}
    png = plots.plot_curves(results.curves(), out / "loss_curves.png", labels=labels,
                            title=f"{task.name}: GMNOptimizer vs tuned Adam ({args.steps} steps)")
    command = "python -m l2o.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(ev.format_report(results, command.strip()))

    print()
    print(ev.format_table(results))
    print()
    print(ev.format_summary(results))
    gmn = next(r for r in results.rows if r["optimizer"] == "gmn")
    adam = next(r for r in results.rows if r["optimizer"] == "adam")
    print(f"\nGMN final train loss {ev.fmt(gmn['final_train_loss'])} vs Adam (lr {adam['lr']:g}) "
          f"{ev.fmt(adam['final_train_loss'])}; speedup {gmn['speedup_str']}"
          + ("   [untrained GMN]" if untrained else ""))
    print(f"saved {png} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
