"""User-facing behaviour of the evaluation CLI: precise errors for missing or
corrupt data and bad arguments, an honest list of written files, figures that
say what they show, and an unambiguous comparison printout."""
from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from l2o import eval as ev
from l2o import plots
from l2o.eval import cli, compare, protocol, report
from tasks import data
from test_data import fresh_cache, make_cifar, make_mnist, write_idx  # noqa: F401 (fresh_cache: autouse, no $L2O_DATA)
from test_evaluate import QuadraticTask


@pytest.fixture(scope="module")
def adam_results():
    """A finished (tiny, in-process) evaluation without learned optimizers: no speedup figure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ev.evaluate([QuadraticTask()], ["adam_default"], steps=20, seeds=1, threads=1, progress=False)


# ------------------------------------------------------------------ 1. missing data: the loader's reason
def test_missing_data_error_says_why(tmp_path, monkeypatch, capsys):
    assert cli.main(["mlp_mnist", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mlp_mnist" in err and "no data directory" in err and "L2O_DATA" in err

    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    assert cli.main(["mlp_mnist", "--no-progress"]) == 2
    assert f"data directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err

    make_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(ev.EvaluationInputError, match="missing t10k-labels-idx1-ubyte.*MNIST/raw"):
        protocol.resolve_suite(["mlp_mnist"])


# ------------------------------------------------------------------ 2. files written this run, no stale figures
def test_reused_out_dir_keeps_no_stale_figure_and_lists_only_what_was_written(tmp_path, monkeypatch, capsys,
                                                                                adam_results):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "speedup.png").write_bytes(b"from an earlier evaluation with gmn")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(cli, "evaluate", lambda *args, **kwargs: adam_results)
    assert cli.main(["regression_teacher", "--optimizers", "adam_default", "--out", str(out), "--no-progress"]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {out}/") and "curves.png" in wrote and "speedup.png" not in wrote
    assert not (out / "speedup.png").exists(), "stale speedup.png kept beside results it does not belong to"
    assert (out / "curves.png").stat().st_size > 0 and (out / "notes.txt").read_text() == "mine"
    assert report.write_figures(adam_results, adam_results.curves(), out) == ["curves.png"]


# ------------------------------------------------------------------ 3./4. bad arguments: one usage line
@pytest.mark.parametrize("args, fragment", [
    (["--tune-seeds", "0"], "argument --tune-seeds: expected an integer >= 1"),
    (["--seeds", "0"], "argument --seeds: expected an integer >= 1"),
    (["--optimizers", ""], "--optimizers: no optimizer given"),
    (["--optimizers", " , "], "--optimizers: no optimizer given"),
    (["--lr-grid", "adam=abc"], "argument --lr-grid: expected comma-separated numbers, got 'abc'"),
    (["--lr-grid", "adam=-1"], "argument --lr-grid: adam: learning rates must be positive numbers, got -1"),
    (["--lr-grid", "nadam=1e-3"], "argument --lr-grid: expected NAME=v1,v2"),
    (["--workers", "0"], "argument --workers: expected an integer >= 1"),
    (["--threads", "-2"], "argument --threads: expected an integer >= 1"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
])
def test_bad_arguments_are_usage_errors(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["regression_teacher", "--no-progress", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_evaluate_refuses_runs_that_would_mislead():
    task = QuadraticTask()
    with pytest.raises(ev.EvaluationInputError, match="no evaluation seeds"):
        ev.evaluate([task], ["adam_default"], seeds=0, progress=False)
    with pytest.raises(ev.EvaluationInputError, match="no tuning seeds.*adam"):
        ev.evaluate([task], ["adam"], tune_seeds=0, progress=False)
    with pytest.raises(ev.EvaluationInputError, match="no optimizers"):
        ev.evaluate([task], [], progress=False)
    with pytest.raises(ev.EvaluationInputError, match="learning-rate grid for adam"):
        ev.evaluate([task], ["adam"], lr_grids={"adam": [-1.0]}, progress=False)
    with pytest.raises(ev.EvaluationInputError, match="workers must be an integer >= 1"):
        ev.evaluate([task], ["adam_default"], workers=0, progress=False)


def test_unusable_device_is_a_one_line_error(capsys):
    assert cli.main(["regression_teacher", "--device", "gpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: device 'gpu' is not a torch device (expected cpu, cuda, cuda:N or mps)")
    if not torch.cuda.is_available():
        assert cli.main(["regression_teacher", "--device", "cuda", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: device 'cuda': ") and "--device cpu" in err and err.count("\n") == 1
    else:
        with pytest.raises(ev.EvaluationInputError, match="CUDA device"):
            protocol.check_device(f"cuda:{torch.cuda.device_count()}")


# ------------------------------------------------------------------ 5. corrupt data through the CLI
def test_corrupt_or_inconsistent_data_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(3, dtype=np.uint8))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    argv = ["mlp_mnist", "--optimizers", "adam_default", "--steps", "2", "--seeds", "1", "--workers", "1",
            "--threads", "1", "--no-progress", "--out", str(tmp_path / "eval")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(labels) in err and "3 labels" in err

    data.clear_cache()
    labels.write_bytes(b"\x07\x07\x07\x07")
    assert cli.main(argv) == 2
    assert f"error: {labels} is not an IDX file (bad magic number)" in capsys.readouterr().err

    data.clear_cache()
    make_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py/test_batch"
    batch.write_bytes(batch.read_bytes()[:50])
    assert cli.main(["cnn_cifar10", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {batch}: not a readable CIFAR-10 python batch") and err.count("\n") == 1


def test_worker_data_errors_reach_the_cli_unwrapped(tmp_path, monkeypatch):
    # In a pool a failed run becomes "run ... failed" (a bug's traceback); a bad
    # data file must keep its own type, which the CLI reports as one line.
    make_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(b"\x01\x01\x01\x01")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))

    class Bar:
        def set_postfix_str(self, *args, **kwargs):
            pass

        def update(self):
            pass

    job = ev.Job("mlp_mnist", "adam_default", 1e-3, 0, "eval")
    with ThreadPoolExecutor(1) as pool, pytest.raises(data.DatasetFormatError, match="t10k-images"):
        ev.run_jobs([job], 2, "cpu", 0, Bar(), pool)


@pytest.mark.parametrize("damage", ["truncated", "other_kind"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_weights_are_a_one_line_error_before_any_run(tmp_path, capsys, damage, workers):
    """Also with worker processes, where a failed run would become "run ... failed"."""
    from l2o.checkpoint import pretrained_path

    if damage == "truncated":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(pretrained_path("gmn").read_bytes()[:100])
        expected = "is not a readable safetensors file (truncated or corrupted?)"
    else:
        weights, expected = pretrained_path("mlp"), "holds a 'mlp' learned optimizer, expected 'gmn'"
    argv = ["regression_teacher_deep_ln", "--optimizers", "gmn", "--steps", "2", "--seeds", "1",
            "--workers", str(workers), "--threads", "1", "--no-progress", "--gmn-weights", str(weights),
            "--out", str(tmp_path / "eval")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err


def test_an_out_path_that_is_a_file_is_refused_before_any_run(tmp_path, capsys, monkeypatch):
    from l2o import demo

    ran = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: ran.append(1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["regression_teacher_deep_ln", "--optimizers", "adam_default", "--out", str(afile)]) == 2
    assert demo.main(["--steps", "2", "--out", str(afile)]) == 2
    errs = capsys.readouterr().err.splitlines()
    assert errs[-2:] == [f"error: --out {afile} is a file, not a directory"] * 2 and not ran
    under = afile / "eval"      # a path under a file
    assert cli.main(["regression_teacher_deep_ln", "--optimizers", "adam_default", "--out", str(under)]) == 2
    assert capsys.readouterr().err == f"error: --out {under}: {afile} is a file, not a directory\n" and not ran


@pytest.mark.parametrize("flag", ["--steps", "--seeds"])
def test_the_demo_refuses_a_count_below_one_as_a_usage_error(flag, capsys):
    from l2o import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main([flag, "0"])
    assert exit_.value.code == 2 and f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. figures and the comparison printout
def test_curves_title_names_the_suite(tmp_path, monkeypatch, adam_results):
    titles = []
    monkeypatch.setattr(plots, "plot_curves", lambda curves, path, title=None, **kw: titles.append(title))
    report.write_figures(adam_results, adam_results.curves(), tmp_path)
    assert titles == ["Training loss, quadratic (20 steps)"]
    assert protocol.suite_label("valid") == "validation suite" and protocol.suite_label("heldout") == "held-out suite"
    assert protocol.suite_label(["a", "b", "c", "d"]) == "4 tasks"


def test_speedup_of_one_is_visible(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_speedup({"t": {"gmn": 1.0, "mlp": 2.0}, "u": {"gmn": float("nan")}}, tmp_path / "s.png")
    ax = figures[0].axes[0]
    marked = np.concatenate([c.get_offsets() for c in ax.collections])
    # a marker at 1.0x (where the bar has no height) and at 2.0x; none for n/a
    assert sorted(marked[:, 1].tolist()) == [1.0, 2.0]


def test_compare_rows_read_as_verdicts_and_accept_diverged_rows(tmp_path, capsys):
    def write(name, rows):
        (tmp_path / name).mkdir()
        # what write_report stores: strict JSON, a diverged run's NaN as null
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"config": {"steps": 10, "seeds": [0]}, "rows": rows}, allow_nan=False))
        return str(tmp_path / name)

    def row(task, opt, train, test, diverged=0):
        return {"task": task, "optimizer": opt, "final_train_loss": train, "test_loss": test,
                "diverged_seeds": diverged}

    base = write("base", [row("a", "adam", 1.0, 1.0), row("b", "adam", 1.0, 1.0)])
    cand = write("cand", [row("a", "gmn", 2.0, 2.0), row("b", "gmn", None, None, 1)])
    assert compare.main(["--baseline", base, "--candidate", cand]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("a ") and "train: worse" in line and "test: worse" in line for line in lines)
    assert any(line.startswith("b ") and "train: worse" in line for line in lines)
    assert not any("train loss" in line for line in lines if line[:2] in ("a ", "b "))
    assert "gmn vs adam per task (better / tie / worse" in lines[0]


def test_compare_missing_or_foreign_directory_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{not json")
    for baseline, fragment in ((tmp_path / "nowhere", "no results.json"), (tmp_path / "junk", "not an evaluation")):
        with pytest.raises(SystemExit) as exit_:
            compare.main(["--baseline", str(baseline), "--candidate", str(tmp_path / "junk")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "error: " in err and fragment in err and "Traceback" not in err
