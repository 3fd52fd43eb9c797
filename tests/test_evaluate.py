"""Evaluation: the measuring functions on hand-made curves, LR tuning on a
constructed problem, and a tiny end-to-end run writing every output file."""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2o import eval as ev
from l2o.eval import cli


# ------------------------------------------------------------------ curves
def test_smooth_is_trailing_mean():
    x = np.array([4.0, 2.0, 6.0, 0.0])
    np.testing.assert_allclose(ev.smooth(x, window=2), [4.0, 3.0, 4.0, 3.0])
    np.testing.assert_allclose(ev.smooth(np.full(50, 7.0)), 7.0)
    assert ev.final_loss(np.r_[np.full(90, 9.0), np.full(10, 1.0)]) == 1.0   # last 10%


def test_speedup_known_answer():
    steps = np.arange(100)
    adam = np.maximum(100.0 - 2 * steps, 1.0)      # first <= 1 at index 50 -> 51 steps
    fast = np.maximum(100.0 - 4 * steps, 1.0)      # index 25 -> 26 steps
    sp = ev.speedup(adam, fast, window=1)
    assert sp.reached and sp.ref_steps == 51 and sp.steps == 26
    assert sp.value == pytest.approx(51 / 26)
    assert str(sp) == f"{51 / 26:.2f}x"
    # the same curve is exactly 1x; a slower one below 1
    assert ev.speedup(adam, adam, window=1).value == 1.0
    slow = np.maximum(100.0 - 1 * steps, 1.0)      # index 99 -> 100 steps
    assert ev.speedup(adam, slow, window=1).value == pytest.approx(51 / 100)


def test_speedup_never_reached_is_an_upper_bound():
    steps = np.arange(100)
    adam = np.maximum(100.0 - 2 * steps, 1.0)
    sp = ev.speedup(adam, np.full(100, 50.0), window=1)
    assert not sp.reached and sp.steps is None
    assert sp.value == pytest.approx(51 / 100)
    assert str(sp).startswith("<")
    # a diverged candidate (NaN after its stop) never reaches the target either
    bad = np.r_[np.full(10, 90.0), np.full(90, np.nan)]
    assert not ev.speedup(adam, bad, window=1).reached
    # an undefined reference gives NaN, not a number that looks real
    assert math.isnan(ev.speedup(np.full(100, np.nan), adam, window=1).value)


def test_speedup_uses_smoothed_curves():
    adam = np.exp(-np.linspace(0, 3, 400))
    # one lucky minibatch at step 6 must not count as reaching Adam's final loss
    lucky = np.ones(400)
    lucky[5] = 0.0
    assert ev.speedup(adam, lucky, window=1).steps == 6       # unsmoothed: fooled
    assert not ev.speedup(adam, lucky).reached                 # default 10% window: not


def test_divergence_detection():
    falling = np.linspace(2.0, 0.5, 200)
    assert not ev.is_diverged(falling)
    assert ev.is_diverged(np.r_[falling[:50], np.inf, falling[51:]])
    assert ev.is_diverged(np.r_[falling[:50], np.nan])
    rising = 2.0 * np.exp(np.linspace(0, 3, 200))    # ends ~20x the initial loss
    assert ev.is_diverged(rising)
    # a one-step spike above 3x is noise, not divergence (the curve is smoothed)
    spike = falling.copy()
    spike[100] = 7.0
    assert not ev.is_diverged(spike)


def test_select_lr_excludes_diverged():
    scores = {1e-3: [(0.9, False), (0.8, False)], 1e-2: [(0.3, False), (0.5, False)],
              1e-1: [(0.01, False), (0.0, True)]}    # lowest, but one run diverged
    assert ev.select_lr(scores) == (1e-2, True)
    assert ev.select_lr({1e-1: [(1.0, True)], 1.0: [(float("nan"), True)]}) == (1e-1, False)


def test_win_tie_and_divergence_rules():
    row = lambda f: {"final_train_loss": f}
    assert ev.beats(row(0.5), row(0.6)) == "win"
    assert ev.beats(row(0.6), row(0.5)) == "loss"
    assert ev.beats(row(0.5), row(0.501)) == "tie"                 # within 0.5%
    assert ev.beats(row(float("nan")), row(9.0)) == "loss"         # diverged never wins
    assert ev.beats(row(9.0), row(float("nan"))) == "win"


def test_summary_counts_train_and_test_wins_separately():
    """The GMN can win on train loss and lose on test loss (it overfits): both are reported."""
    rows = [{"task": "t", "optimizer": o, "final_train_loss": f, "test_loss": tl, "speedup_vs_adam": float("nan"),
             "diverged_seeds": 0} for o, f, tl in (("gmn", 0.1, 0.9), ("adam", 0.2, 0.3), ("adam_default", 0.5, 0.8))]
    s = ev.summarize(rows, ["gmn", "adam", "adam_default"])
    assert s["wins"]["gmn_vs_adam"]["wins"] == 1 and s["test_wins"]["gmn_vs_adam"]["wins"] == 0
    assert s["wins"]["gmn_vs_adam_default"]["wins"] == 1 and s["test_wins"]["gmn_vs_adam_default"]["wins"] == 0


def test_table_rows_speedup_and_diverged_runs_get_no_credit():
    task = QuadraticTask()
    steps = np.arange(100)
    curve = lambda rate: np.maximum(100.0 - rate * steps, 1.0)
    run = lambda opt, c, div=False: ev.RunResult(task.name, opt, None, 0, 100, c, div, 100,
                                                 final_test={"mse": 1.0})
    blown = np.r_[curve(8)[:40], np.full(60, np.nan)]               # fast, then diverged
    rows = ev.table_rows([task], ["gmn", "mlp", "adam"],
                          [run("adam", curve(2)), run("gmn", curve(4)), run("mlp", blown, True)], {}, {})
    by = {r["optimizer"]: r for r in rows}
    sm = lambda c: ev.speedup(curve(2), c)
    assert by["gmn"]["speedup_vs_adam"] == pytest.approx(sm(curve(4)).value) and by["gmn"]["speedup_vs_adam"] > 1
    assert by["mlp"]["speedup_str"] == "diverged" and by["mlp"]["speedup_vs_adam"] == 0.0
    assert math.isnan(by["mlp"]["final_train_loss"]) and by["mlp"]["diverged_seeds"] == 1


# ------------------------------------------------------------------ a constructed task
class QuadraticTask:
    """Linear regression with a known answer: a stand-in with the Task interface."""

    name, family, split, dataset, batch_size = "quadratic", "regression", "heldout", "synthetic", 32

    def init(self, seed=0):
        torch.manual_seed(seed)
        return nn.Linear(8, 1)

    def num_params(self):
        return 9

    def example_inputs(self):
        return (torch.zeros(2, 8),)

    def batches(self, split="train", seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 10_000))
        w = torch.arange(8.0).unsqueeze(1) / 8
        while True:
            x = torch.randn(self.batch_size, 8, generator=g)
            yield x.to(device), (x @ w + 0.5).to(device)

    def loss(self, model_or_output, batch):
        x, y = batch
        out = model_or_output(x) if isinstance(model_or_output, nn.Module) else model_or_output
        return F.mse_loss(out, y)

    @torch.no_grad()
    def metric(self, model, batch):
        return {"mse": self.loss(model, batch).item()}


def test_run_training_same_init_and_stops_on_divergence():
    task = QuadraticTask()
    adam = ev.optimizer_factory("adam", task, lr=1e-2)
    a = ev.run_training(task, adam, 60, seed=3)
    b = ev.run_training(task, adam, 60, seed=3)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)      # same init, same batches
    assert not a.diverged and a.final_test["mse"] < a.train_loss[0]
    blown = ev.run_training(task, ev.optimizer_factory("sgd", task, lr=50.0), 60, seed=3)
    assert blown.diverged and blown.stopped_at < 60
    assert np.isnan(blown.train_loss[blown.stopped_at:]).all()
    assert math.isnan(blown.final_train_loss)


def test_lr_tuning_picks_the_best_grid_value():
    # SGD+momentum on this regression: 1e-4 barely moves, 10 blows up, 3e-2 is the best of the grid
    grid = (1e-4, 3e-2, 10.0)
    res = ev.evaluate([QuadraticTask()], ["sgd"], steps=80, seeds=1, lr_grids={"sgd": grid},
                      threads=1, progress=False)
    tuning = res.tuning["quadratic"]["sgd"]
    assert tuning["chosen"] == 3e-2 and not tuning["all_diverged"]
    assert tuning["score"][repr(10.0)] is None                        # diverged: excluded
    assert tuning["score"][repr(3e-2)] < tuning["score"][repr(1e-4)]
    assert res.rows[0]["lr"] == 3e-2


# ------------------------------------------------------------------ end to end
def test_missing_pretrained_weights_is_a_clear_error(monkeypatch, tmp_path):
    import l2o.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "pretrained_path", lambda kind: tmp_path / f"{kind}.safetensors")
    with pytest.raises(ev.MissingWeightsError, match="--allow-untrained"):
        ev.resolve_weights("gmn", None, allow_untrained=False)
    weights, label = ev.resolve_weights("gmn", None, allow_untrained=True)
    assert weights is None and "UNTRAINED" in label
    with pytest.raises(FileNotFoundError):
        ev.resolve_weights("mlp", tmp_path / "nope.safetensors", allow_untrained=True)


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_end_to_end_writes_everything(tmp_path, monkeypatch):
    import l2o.checkpoint as ckpt
    # Evaluate untrained metanetworks whether or not pretrained weights are shipped.
    monkeypatch.setattr(ckpt, "pretrained_path", lambda kind: tmp_path / f"absent-{kind}.safetensors")
    out = tmp_path / "eval"
    stale = out / "tb" / "old_task" / "adam" / "events.out.tfevents.stale"     # an earlier run into --out
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    argv = ["regression_teacher", "mlp_synthetic", "--steps", "25", "--seeds", "1", "--allow-untrained",
            "--lr-grid", "adam=1e-3,1e-2", "--lr-grid", "adamw=1e-2", "--lr-grid", "sgd=0.1",
            "--workers", "1", "--threads", "1", "--test-every", "10", "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ev.main(argv) == 0
    for name in ("results.md", "results.csv", "results.json", "curves.png", "speedup.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "tb").rglob("events.out.tfevents.*"))
    assert not stale.exists() and not (out / "tb" / "old_task").exists(), "stale TensorBoard events kept"
    assert (out / "notes.txt").read_text() == "mine"

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(ev.CSV_COLUMNS) <= set(rows[0])
    assert {(r["task"], r["optimizer"]) for r in rows} == {
        (t, o) for t in ("regression_teacher", "mlp_synthetic") for o in ev.OPTIMIZERS}
    for r in rows:
        assert float(r["final_train_loss"]) > 0
        if r["optimizer"] != "adam":
            assert float(r["speedup_vs_adam"]) > 0
    metrics = {r["task"]: r["test_metric_name"] for r in rows}
    assert metrics == {"regression_teacher": "mse", "mlp_synthetic": "accuracy"}

    md = (out / "results.md").read_text()
    assert "UNTRAINED" in md and "tuning rule" in md and "| regression_teacher | gmn |" in md
    data = json.loads((out / "results.json").read_text())
    assert data["summary"]["wins"]["gmn_vs_adam"]["of"] == 2
    assert data["config"]["lr_grids"]["adam"] == [1e-3, 1e-2]
    assert data["config"]["lr_grids"]["adam_default"] == [1e-3]    # untuned: what most users run
    assert data["summary"]["test_wins"]["gmn_vs_adam"]["of"] == 2


def test_cli_reports_user_errors_but_not_bugs(monkeypatch, capsys):
    assert ev.main(["no_such_task", "--no-progress"]) == 2
    assert "unknown task" in capsys.readouterr().err

    def buggy(*args, **kwargs):
        raise KeyError("internal bug")

    monkeypatch.setattr(cli, "evaluate", buggy)
    with pytest.raises(KeyError, match="internal bug"):
        ev.main(["regression_teacher", "--no-progress"])


def test_old_module_path_and_command_still_work():
    """``l2o.evaluate`` is the documented command and import path: it re-exports
    the package's public names (the same objects) and runs its CLI."""
    import subprocess
    import sys

    from l2o import evaluate as old

    for name in old.__all__:
        assert getattr(old, name) is getattr(ev, name), name
    assert set(old.__all__) == set(ev.__all__)
    for module in ("l2o.evaluate", "l2o.eval"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "--lr-grid" in res.stdout and "--allow-untrained" in res.stdout


def test_compare_counts_wins_against_baseline_rows_of_other_runs(tmp_path, capsys):
    from l2o.eval import compare

    def write(name, rows, steps=400):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"config": {"steps": steps, "seeds": [0, 1]}, "rows": rows}))
        return str(tmp_path / name)

    def row(task, opt, train, test, diverged=0):
        return {"task": task, "optimizer": opt, "final_train_loss": train, "test_loss": test,
                "diverged_seeds": diverged}

    base = write("base", [row("a", "adam", 1.0, 1.0), row("b", "adam", 1.0, 1.0), row("a", "gmn", 0.1, 0.1)])
    cand = write("cand", [row("a", "gmn", 0.5, 2.0), row("b", "gmn", float("nan"), float("nan"), 2),
                          row("c", "gmn", 0.1, 0.1)])
    assert compare.main(["--baseline", base, "--candidate", cand]) == 0
    out = capsys.readouterr().out
    assert "train wins 1/2, test wins 0/2, diverged 1" in out and "no baseline row for: c" in out
    other = write("other", [row("a", "adam", 1.0, 1.0)], steps=100)
    with pytest.raises(SystemExit):
        compare.main(["--baseline", other, "--candidate", cand])
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare.load_rows(tmp_path / "nowhere")
