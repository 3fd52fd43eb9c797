"""``python -m l2o.evaluate`` (also ``python -m l2o.eval``): run the protocol, write the report.

    python -m l2o.evaluate                          # held-out suite, all optimizers
    python -m l2o.evaluate conv1d_mnist1d --steps 300 --seeds 1 --optimizers gmn,adam

Cost: the default (held-out suite, 400 steps, 3 seeds, 1 tuning seed,
6+6+7 grid values: 34 runs per task) takes about 15-20 minutes on an idle
2-core CPU: ~2,000 CPU-seconds of runs over two worker processes
(extrapolated from the CPU time a 40-step run of the same protocol used:
225 s; the learned optimizers' steps are 2-4x an Adam step).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .optimizers import DEFAULT_GRIDS, HAND_DESIGNED, OPTIMIZERS, EvaluationInputError, MissingWeightsError
from .protocol import DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_TUNE_SEEDS, TUNE_SEED_BASE, evaluate
from .report import FIGURES, check_out_dir, format_report, write_report


def parse_floats(text: str) -> list[float]:
    """"1e-3,3e-3" -> [0.001, 0.003] (an argparse type)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_grid(text: str) -> tuple[str, list[float]]:
    """One ``--lr-grid NAME=v1,v2`` value as (NAME, [v1, v2]) (an argparse type, so
    a bad value is argparse's one-line usage error, not a traceback)."""
    name, sep, values = text.partition("=")
    if not sep or name not in HAND_DESIGNED:
        raise argparse.ArgumentTypeError(
            f"expected NAME=v1,v2,... with NAME in {', '.join(HAND_DESIGNED)}, got {text!r}")
    grid = parse_floats(values)
    if not grid:
        raise argparse.ArgumentTypeError(f"{name}: empty grid")
    # Checked here: torch.optim would reject lr <= 0 only inside a run, as a traceback.
    bad = [v for v in grid if not (math.isfinite(v) and v > 0)]
    if bad:
        raise argparse.ArgumentTypeError(f"{name}: learning rates must be positive numbers, got "
                                         f"{', '.join(f'{v:g}' for v in bad)}")
    return name, grid


def parse_grids(items: list[str] | None) -> dict[str, list[float]]:
    """``--lr-grid NAME=v1,v2`` values (repeatable) as {NAME: [v1, v2]}."""
    return dict(parse_grid(item) for item in items or [])


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l2o.evaluate",
        description="Evaluate the learned optimizers against per-task LR-tuned Adam, AdamW and SGD.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("tasks", nargs="*", help="task names (default: the --suite split)")
    p.add_argument("--suite", default="heldout", choices=["heldout", "valid", "train", "all"],
                   help="heldout = the test split (report only); valid = the split every choice is made on")
    # Counts below 1 would mean an empty report (--seeds 0) or an untuned "tuned"
    # Adam (--tune-seeds 0): refused here rather than run.
    p.add_argument("--steps", type=at_least(1), default=DEFAULT_STEPS, help="training steps per run (the budget)")
    p.add_argument("--seeds", type=at_least(1), default=DEFAULT_SEEDS, help="evaluation seeds 0..N-1")
    p.add_argument("--tune-seeds", type=at_least(1), default=DEFAULT_TUNE_SEEDS,
                   help=f"LR-tuning seeds {TUNE_SEED_BASE}..{TUNE_SEED_BASE}+N-1 (disjoint from evaluation)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--gmn-weights", default=None, help="GMN weights file (default: shipped pretrained)")
    p.add_argument("--mlp-weights", default=None, help="MLP weights file (default: shipped pretrained)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="if pretrained weights are missing, evaluate an untrained metanetwork instead of stopping")
    p.add_argument("--lr-grid", action="append", type=parse_grid, metavar="NAME=v1,v2,...",
                   help="override a grid, e.g. --lr-grid adam=1e-3,3e-3 (repeatable). Defaults: "
                        + "; ".join(f"{o}: {','.join(f'{v:g}' for v in g)}" for o, g in DEFAULT_GRIDS.items()))
    p.add_argument("--out", default="out/eval", help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--test-every", type=at_least(0), default=0, help="also log test metrics every N steps (0: only at the end)")
    p.add_argument("--workers", type=at_least(1), default=None, help="parallel runs on CPU (default: one per core)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--no-progress", action="store_true")
    return p


def user_errors() -> tuple[type[Exception], ...]:
    """The errors meant for users (bad names, arguments, missing or corrupt data
    or weights): one line each; anything else is a bug and keeps its traceback."""
    from tasks.data import DatasetFormatError, UnknownDatasetError
    from tasks.registry import UnknownTaskError

    from ..checkpoint import WeightsFileError

    return (MissingWeightsError, FileNotFoundError, UnknownTaskError, UnknownDatasetError, EvaluationInputError,
            WeightsFileError, DatasetFormatError)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 (and one line on stderr) for a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not optimizers:
        parser.error(f"--optimizers: no optimizer given; choose from {','.join(OPTIMIZERS)}")
    suite = args.tasks or args.suite
    command = ("python -m l2o.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    try:
        check_out_dir(args.out)
        results = evaluate(suite, optimizers, steps=args.steps, seeds=args.seeds, tune_seeds=args.tune_seeds,
                           lr_grids=dict(args.lr_grid or []), gmn_weights=args.gmn_weights,
                           mlp_weights=args.mlp_weights, allow_untrained=args.allow_untrained, device=args.device,
                           test_every=args.test_every, workers=args.workers, threads=args.threads, out_dir=None,
                           progress=not args.no_progress)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_report(results, args.out, command=command)
    print(format_report(results, command))
    print(f"wrote {out}/{', '.join(written_files(out))}")
    return 0


def written_files(out: Path) -> list[str]:
    """The report files in ``out``: write_report removes figures of ours it did not
    draw this time, so what is there is what this run wrote."""
    names = ["results.md", "results.csv", "results.json"]
    names += [name for name in FIGURES if (Path(out) / name).is_file()]
    if (Path(out) / "tb").is_dir():
        names.append("tb/")
    return names
