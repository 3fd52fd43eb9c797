"""Compare candidate optimizer rows with baseline rows from earlier evaluations.

Choosing a checkpoint on validation means evaluating many snapshots against the
same tuned baselines; tuning Adam again for every snapshot would cost more than
the snapshot's own runs. Evaluate the baselines once (``--optimizers
adam,adam_default``) and each snapshot alone (``--optimizers gmn``) with the same
suite, seeds and steps, then::

    python -m l2o.eval.compare --baseline out/valid_base --candidate out/valid_snap_500 [...]

Rows are matched by task; the protocol (steps, seeds) must agree, or the
comparison is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from .metrics import beats


# How the candidate did against the baseline, per task (from metrics.beats).
VERDICTS = {"win": "better", "tie": "tie", "loss": "worse"}


def load_rows(directory: str | Path) -> tuple[dict, list[dict]]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run python -m l2o.evaluate --out {directory} first)")
    try:
        data = json.loads(path.read_text())
        return data["config"], data["rows"]
    except (ValueError, KeyError, TypeError) as err:   # ValueError: invalid JSON
        raise ValueError(f"{path}: not an evaluation results.json ({type(err).__name__}: {err})") from None


def with_nan(row: dict) -> dict:
    """``row`` with the losses results.json stores as null (a diverged run's NaN:
    strict JSON has no NaN) back as NaN, which the comparison rules expect."""
    return {**row, **{k: float("nan") for k in ("final_train_loss", "test_loss") if row.get(k) is None}}


def rows_of(directories: list[str], optimizer: str) -> tuple[dict[str, dict], dict]:
    """Rows of ``optimizer`` by task across ``directories`` (later ones win), and their protocol."""
    rows, protocol = {}, None
    for directory in directories:
        config, found = load_rows(directory)
        this = {"steps": config.get("steps"), "seeds": config.get("seeds")}
        if protocol is not None and this != protocol:
            raise ValueError(f"{directory}: protocol {this} differs from {protocol}")
        protocol = this
        rows.update({row["task"]: with_nan(row) for row in found if row["optimizer"] == optimizer})
    return rows, protocol or {}


def compare(baseline: dict[str, dict], candidate: dict[str, dict]) -> dict:
    """Win/tie/loss counts on final train loss and on test loss, per task and in total."""
    tasks = [t for t in candidate if t in baseline]
    per_task = {t: {"train": beats(candidate[t], baseline[t]),
                    "test": beats(candidate[t], baseline[t], key="test_loss"),
                    "ratio": candidate[t]["final_train_loss"] / baseline[t]["final_train_loss"]}
                for t in tasks}
    ratios = [r["ratio"] for r in per_task.values() if math.isfinite(r["ratio"]) and r["ratio"] > 0]
    return {"tasks": len(tasks), "per_task": per_task,
            "train_wins": sum(r["train"] == "win" for r in per_task.values()),
            "test_wins": sum(r["test"] == "win" for r in per_task.values()),
            "diverged": sum(candidate[t].get("diverged_seeds", 0) > 0 for t in tasks),
            "geomean_loss_ratio": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else float("nan"),
            "missing": sorted(set(candidate) - set(baseline))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l2o.eval.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", nargs="+", required=True, help="evaluation directories holding the baseline rows")
    p.add_argument("--candidate", nargs="+", required=True, help="evaluation directories holding the candidate rows")
    p.add_argument("--baseline-optimizer", default="adam")
    p.add_argument("--candidate-optimizer", default="gmn")
    args = p.parse_args(argv)
    try:
        base, base_protocol = rows_of(args.baseline, args.baseline_optimizer)
        cand, cand_protocol = rows_of(args.candidate, args.candidate_optimizer)
    # A missing or foreign directory is a mistyped argument: one usage line, no traceback.
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    if base_protocol != cand_protocol:
        p.error(f"protocols differ: baseline {base_protocol}, candidate {cand_protocol}")
    result = compare(base, cand)
    # Verdicts of the candidate as sentences ("train: worse"): a bare "train loss  test loss"
    # reads as the names of two columns, not as "lost on train and on test".
    print(f"{args.candidate_optimizer} vs {args.baseline_optimizer} per task (better / tie / worse on final "
          f"train loss and on test loss; loss ratio = {args.candidate_optimizer} / {args.baseline_optimizer} "
          "final train loss):")
    for task, r in result["per_task"].items():
        print(f"{task:24s} train: {VERDICTS[r['train']]:6s}  test: {VERDICTS[r['test']]:6s}  "
              f"loss ratio {r['ratio']:.3f}")
    n = result["tasks"]
    print(f"{args.candidate_optimizer} vs {args.baseline_optimizer}: train wins {result['train_wins']}/{n}, "
          f"test wins {result['test_wins']}/{n}, diverged {result['diverged']}, "
          f"geometric-mean final-loss ratio {result['geomean_loss_ratio']:.3f}")
    if result["missing"]:
        print(f"no baseline row for: {', '.join(result['missing'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
