"""The evaluation report: results.md, results.csv, results.json, the figures
(curves.png, speedup.png) and TensorBoard scalars (tb/)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .. import plots
from .metrics import TIE_RTOL, smooth
from .optimizers import LEARNED, EvaluationInputError
from .results import EvalResults

CSV_COLUMNS = ["task", "family", "optimizer", "lr", "weights", "seeds", "steps", "final_train_loss",
               "final_train_loss_std", "test_loss", "test_metric_name", "test_metric", "diverged_seeds",
               "speedup_vs_adam", "speedup_reached", "adam_steps_to_final", "steps_to_adam_final",
               "lr_at_grid_edge", "wall_time_s", "cpu_time_s"]
FIGURES = ("curves.png", "speedup.png")


def fmt(x, digits: int = 4) -> str:
    """A table cell: ``digits`` significant digits, "—" for NaN/inf, "" for None."""
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def format_table(results: EvalResults) -> str:
    """The per-(task, optimizer) Markdown table."""
    head = ["task", "optimizer", "lr", "final train loss", "test loss", "test metric", "diverged", "speedup vs Adam"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = results.summary.get("best_on", {})
    for r in results.rows:
        loss = fmt(r["final_train_loss"])
        if math.isfinite(r["final_train_loss"]) and r["seeds"] > 1:
            loss += f" ± {fmt(r['final_train_loss_std'], 2)}"
        if best.get(r["task"]) == r["optimizer"]:
            loss = f"**{loss}**"
        metric = f"{r['test_metric_name']} {fmt(r['test_metric'])}" if r["test_metric_name"] else ""
        div = f"{r['diverged_seeds']}/{r['seeds']}" if r["diverged_seeds"] else "no"
        lr = fmt(r["lr"], 2) if r["lr"] is not None else "learned"
        if r.get("lr_at_grid_edge"):
            lr += " (edge)"
        lines.append("| " + " | ".join([r["task"], r["optimizer"], lr, loss, fmt(r["test_loss"]), metric, div,
                                        r.get("speedup_str", "")]) + " |")
    return "\n".join(lines)


def format_summary(results: EvalResults) -> str:
    s, cfg = results.summary, results.config
    out = []
    for key, w in s["wins"].items():
        a, b = key.split("_vs_")
        other = {"mlp": "the MLP learned-optimizer baseline", "adam_default": "Adam at its default lr 1e-3"}.get(
            b, f"tuned {b.upper()}")
        t = s.get("test_wins", {}).get(key)
        out.append(f"- {a.upper()} beats {other} on final train loss on "
                   f"**{w['wins']}/{w['of']}** tasks" + (f" ({w['ties']} ties: within {TIE_RTOL:.1%})" if w["ties"] else "")
                   + (f"; on test loss on **{t['wins']}/{t['of']}**" if t else ""))
    for o, med in s["median_speedup_vs_adam"].items():
        reached = s["speedup_reached"][o]
        out.append(f"- median speedup of {o.upper()} vs tuned Adam: **{med:.2f}x** (reached Adam's final loss "
                   f"on {reached['reached']}/{reached['of']} tasks; where not, the value is an upper bound)")
    div = ", ".join(f"{o}: {n}" for o, n in s["diverged_runs"].items())
    out.append(f"- diverged evaluation runs: {div} (of {len(cfg['seeds'])} seeds x {s['tasks']} tasks each)")
    if cfg.get("skipped_no_data"):
        out.append(f"- skipped (dataset not in the data directory): {', '.join(cfg['skipped_no_data'])}")
    return "\n".join(out)


def format_protocol(results: EvalResults) -> str:
    cfg = results.config
    grids = "\n".join(f"  - {o}: {', '.join(fmt(x, 2) for x in g)}" for o, g in cfg["lr_grids"].items())
    weights = "\n".join(f"  - {o}: {w}" for o, w in cfg["weights"].items())
    return f"""- budget: {cfg['steps']} steps per run; evaluation seeds {cfg['seeds']} (model init and batch stream);
  tuning seeds {cfg['tune_seeds']}
- learned optimizers (lr multiplier 1.0, not tuned):
{weights or '  - none'}
- learning-rate grids (Adam/AdamW: default betas, AdamW weight decay {cfg['adamw_weight_decay']}; SGD momentum {cfg['sgd_momentum']}):
{grids or '  - none'}
- tuning rule: per task and optimizer, the grid value with the lowest mean final train loss on the tuning
  seeds; values where a tuning run diverged are excluded. "(edge)" marks a choice at the end of the grid.
- final train loss: mean of the last {int(cfg['smooth_frac'] * 100)}% of per-step minibatch losses, mean ± std over seeds
  (bold: best on the task; win counts treat a difference under {TIE_RTOL:.1%} as a tie). Test loss/metric: mean over {cfg['test_batches']} held-out test batches after training.
- diverged: a non-finite loss or the smoothed loss above {cfg['diverge_factor']:g}x the initial loss; such runs stop
  and lose every comparison.
- speedup vs Adam: steps tuned Adam needs to reach its own final smoothed loss / steps the optimizer needs to reach
  it (seed-averaged curves, trailing {int(cfg['smooth_frac'] * 100)}% window). "<x" = never reached within the
  budget; x is an upper bound.
- device {cfg['device']}, {cfg['workers']} worker(s) x {cfg['threads_per_worker']} thread(s), torch {cfg['torch']};
  wall time {cfg.get('wall_time_s', '?')} s, CPU time of all runs {cfg.get('cpu_time_s', '?')} s"""


def format_report(results: EvalResults, command: str | None = None) -> str:
    parts = ["# l2o evaluation", ""]
    if command:
        parts += ["Command:", "", f"    {command}", ""]
    untrained = [o for o, w in results.config["weights"].items() if w.startswith("UNTRAINED")]
    if untrained:
        parts += [f"> **Note:** {', '.join(o.upper() for o in untrained)} ran with an UNTRAINED metanetwork "
                  "(no pretrained weights installed); these numbers say nothing about the learned optimizer.", ""]
    parts += ["## Summary", "", format_summary(results), "", "## Results", "", format_table(results), "",
              "## Protocol", "", format_protocol(results), ""]
    return "\n".join(parts)


def check_out_dir(out) -> None:
    """Refuse, before any run, an ``--out`` the report could not be written to
    (a file, or a path under one or in a directory that is not writable): it
    would otherwise fail only after the whole evaluation."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvaluationInputError(f"--out {out} is a file, not a directory")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise EvaluationInputError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationInputError(f"--out {out}: {existing} is not writable")


def write_report(results: EvalResults, out_dir, command: str | None = None) -> Path:
    """results.md, results.csv, results.json, curves.png and speedup.png (those that
    apply: see :func:`write_figures`) and TensorBoard scalars."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(format_report(results, command))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    payload = results.to_json()
    payload["command"] = command
    (out / "results.json").write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    curves = results.curves()
    write_figures(results, curves, out)
    write_tensorboard(results, curves, out / "tb")
    return out


def write_figures(results: EvalResults, curves, out: Path) -> list[str]:
    """curves.png (every evaluation curve) and speedup.png (learned optimizers vs Adam);
    the names of those drawn. A figure of ours that this evaluation does not draw
    is removed: left from an earlier evaluation into the same --out, it would
    pass for this one's (a speedup.png beside results without Adam, say)."""
    written = []
    if curves:
        label = results.config.get("suite_label") or "evaluation"
        plots.plot_curves(curves, out / "curves.png",
                          title=f"Training loss, {label} ({results.config['steps']} steps)")
        written.append("curves.png")
    sp = {r["task"]: {} for r in results.rows}
    reached = {r["task"]: {} for r in results.rows}
    for r in results.rows:
        if r["optimizer"] in LEARNED and math.isfinite(r["speedup_vs_adam"]):
            sp[r["task"]][r["optimizer"]] = r["speedup_vs_adam"]
            reached[r["task"]][r["optimizer"]] = bool(r["speedup_reached"])
    if any(sp.values()):
        plots.plot_speedup({t: v for t, v in sp.items() if v}, out / "speedup.png", reached)
        written.append("speedup.png")
    for name in FIGURES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return written


def write_tensorboard(results: EvalResults, curves, tb_dir: Path) -> None:
    """Smoothed train loss, test metrics and speedup per (task, optimizer) under ``tb_dir``."""
    # Start from an empty tb/: event files of an earlier evaluation into the same
    # --out would otherwise sit beside these and TensorBoard would overlay both.
    # Only this subdirectory is cleared; the rest of --out is overwritten file by file
    # (figures this evaluation does not draw are removed by write_figures).
    if tb_dir.is_dir():
        shutil.rmtree(tb_dir)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard is optional for the report; say so rather than fail
        print("tensorboard not installed: skipped TensorBoard scalars", file=sys.stderr)
        return
    rows = {(r["task"], r["optimizer"]): r for r in results.rows}
    tests: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for run in results.runs:
        for step, m in zip(run.test_steps, run.test):
            if m:
                tests.setdefault((run.task, run.optimizer), {}).setdefault(step, []).append(m)
    for task, opts in curves.items():
        for opt, runs in opts.items():
            # One writer per (task, optimizer): TensorBoard overlays optimizers per task.
            with SummaryWriter(log_dir=str(tb_dir / task / opt)) as w:
                sm = np.mean(np.stack([smooth(r) for r in runs]), axis=0)
                stride = max(1, len(sm) // 500)
                for i in range(0, len(sm), stride):
                    if math.isfinite(sm[i]):
                        w.add_scalar(f"{task}/train_loss_smoothed", float(sm[i]), i + 1)
                for step, ms in sorted(tests.get((task, opt), {}).items()):
                    for k in ms[0]:
                        w.add_scalar(f"{task}/test_{k}", float(np.mean([m[k] for m in ms])), step)
                row = rows.get((task, opt))
                if row and math.isfinite(row["speedup_vs_adam"]):
                    w.add_scalar(f"{task}/speedup_vs_adam", row["speedup_vs_adam"], row["steps"])


def jsonable(x):
    """``x`` with numpy scalars as Python ones and NaN/inf as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
