"""The evaluation's results: per-(task, optimizer) rows from the runs, and the
summary over tasks (win counts, median speedup, diverged runs)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .metrics import beats, speedup
from .optimizers import HAND_DESIGNED, LEARNED
from .runner import RunResult


@dataclass
class EvalResults:
    config: dict[str, Any]
    tuning: dict[str, dict[str, dict[str, Any]]]        # task -> optimizer -> grid scores, chosen lr
    rows: list[dict[str, Any]]                          # one per (task, optimizer): the table
    summary: dict[str, Any]
    runs: list[RunResult] = field(repr=False, default_factory=list)

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """task -> optimizer -> [seeds, steps] training losses of the evaluation runs."""
        out: dict[str, dict[str, list]] = {}
        for r in sorted(self.runs, key=lambda r: r.seed):
            out.setdefault(r.task, {}).setdefault(r.optimizer, []).append(r.train_loss)
        # Suite order for the panels, not the order runs happened to finish in.
        suite = self.config.get("suite", [])
        order = [t for t in suite if t in out] + [t for t in out if t not in suite]
        opt_order = self.config.get("optimizers", [])
        rank = lambda o: opt_order.index(o) if o in opt_order else 99   # noqa: E731
        return {t: {o: np.stack(out[t][o]) for o in sorted(out[t], key=rank)} for t in order}

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "tuning": self.tuning, "rows": self.rows, "summary": self.summary}


def mean_curve(runs: list[RunResult]) -> np.ndarray:
    """Mean over seeds of the raw losses; a diverged seed makes the mean NaN
    from its stop onwards, so a diverged optimizer cannot look fast."""
    return np.mean(np.stack([r.train_loss for r in runs]), axis=0)


def metric_name(test: dict[str, float]) -> str | None:
    """The task's test metric other than the loss (accuracy, mse, ...)."""
    names = [k for k in test if k != "loss"]
    return names[0] if names else None


def table_rows(task_list, optimizers: Sequence[str], runs: list[RunResult], tuning: dict,
               weight_labels: dict[str, str]) -> list[dict]:
    """One row per (task, optimizer) that has evaluation runs, in suite order."""
    by: dict[tuple[str, str], list[RunResult]] = {}
    for r in runs:
        by.setdefault((r.task, r.optimizer), []).append(r)
    rows = []
    for t in task_list:
        adam = by.get((t.name, "adam"))
        adam_curve = mean_curve(adam) if adam else None
        for o in optimizers:
            rs = sorted(by.get((t.name, o), []), key=lambda r: r.seed)
            if not rs:
                continue
            row = _row(t, o, rs, weight_labels)
            row.update(_speedup_fields(o, rs, adam_curve, row["diverged_seeds"]))
            if o in HAND_DESIGNED and t.name in tuning:
                row["lr_at_grid_edge"] = tuning[t.name][o]["at_grid_edge"]
            rows.append(row)
    return rows


def _row(task, optimizer: str, rs: list[RunResult], weight_labels: dict[str, str]) -> dict[str, Any]:
    finals = np.array([r.final_train_loss for r in rs])
    n_div = sum(r.diverged for r in rs)
    tests = [r.final_test for r in rs if r.final_test and not r.diverged]
    metric = metric_name(rs[0].final_test or (tests[0] if tests else {}))
    test_loss_key = "loss" if tests and "loss" in tests[0] else metric
    return {
        "task": task.name, "family": task.family, "optimizer": optimizer,
        "lr": rs[0].lr if optimizer in HAND_DESIGNED else None,
        "weights": weight_labels.get(optimizer, ""),
        "seeds": len(rs), "steps": rs[0].steps,
        "final_train_loss": float(np.mean(finals)) if n_div == 0 else float("nan"),
        "final_train_loss_std": float(np.std(finals)) if n_div == 0 else float("nan"),
        "test_loss": float(np.mean([x[test_loss_key] for x in tests])) if tests and test_loss_key else float("nan"),
        "test_metric_name": metric or "",
        "test_metric": float(np.mean([x[metric] for x in tests])) if tests and metric else float("nan"),
        "diverged_seeds": int(n_div),
        "wall_time_s": float(np.mean([r.wall_time for r in rs])),
        "cpu_time_s": float(np.mean([r.cpu_time for r in rs])),
    }


def _speedup_fields(optimizer: str, rs: list[RunResult], adam_curve, n_div: int) -> dict[str, Any]:
    if adam_curve is not None and optimizer != "adam" and n_div:
        # A run that blew up may have passed Adam's loss on the way: no credit.
        return dict(speedup_vs_adam=0.0, speedup_reached=False, adam_steps_to_final=None,
                    steps_to_adam_final=None, speedup_str="diverged")
    if adam_curve is not None and optimizer != "adam":
        sp = speedup(adam_curve, mean_curve(rs))
        return dict(speedup_vs_adam=sp.value, speedup_reached=sp.reached, adam_steps_to_final=sp.ref_steps,
                    steps_to_adam_final=sp.steps, speedup_str=str(sp))
    return dict(speedup_vs_adam=float("nan"), speedup_reached=None, adam_steps_to_final=None,
                steps_to_adam_final=None, speedup_str="" if optimizer == "adam" else "n/a")


def summarize(rows: list[dict], optimizers: Sequence[str]) -> dict[str, Any]:
    """Over tasks: wins/ties of each learned optimizer against each other one
    (train and test loss), median speedup vs Adam, diverged runs, best per task."""
    idx = {(r["task"], r["optimizer"]): r for r in rows}
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    summary: dict[str, Any] = {"tasks": len(task_names), "wins": {}, "test_wins": {},
                               "median_speedup_vs_adam": {}, "speedup_reached": {}, "diverged_runs": {},
                               "best_on": {}}
    pairs = [(a, b) for a in LEARNED for b in ("adam", "adamw", "sgd", "adam_default", "mlp")
             if a != b and a in optimizers and b in optimizers and not (a == "mlp" and b == "gmn")]
    for a, b in pairs:
        for table, key in (("wins", "final_train_loss"), ("test_wins", "test_loss")):
            outcomes = [beats(idx.get((t, a)), idx.get((t, b)), key) for t in task_names]
            outcomes = [x for x in outcomes if x is not None]
            summary[table][f"{a}_vs_{b}"] = {"wins": outcomes.count("win"), "ties": outcomes.count("tie"),
                                             "of": len(outcomes)}
    for o in optimizers:
        sp = [idx[(t, o)] for t in task_names if (t, o) in idx and math.isfinite(idx[(t, o)]["speedup_vs_adam"])]
        if sp:
            summary["median_speedup_vs_adam"][o] = float(np.median([r["speedup_vs_adam"] for r in sp]))
            summary["speedup_reached"][o] = {"reached": sum(bool(r["speedup_reached"]) for r in sp), "of": len(sp)}
        summary["diverged_runs"][o] = int(sum(idx[(t, o)]["diverged_seeds"] for t in task_names if (t, o) in idx))
    for t in task_names:
        cands = [idx[(t, o)] for o in optimizers if (t, o) in idx and math.isfinite(idx[(t, o)]["final_train_loss"])]
        summary["best_on"][t] = min(cands, key=lambda r: r["final_train_loss"])["optimizer"] if cands else None
    return summary
