"""meta_train.py as its users meet it: per-invocation options, what a stopped,
interrupted or resumed run says, checks of the inputs before training starts,
one-line errors for bad input, and the TensorBoard log across a resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meta_train  # noqa: E402
from l2o.meta import config as C  # noqa: E402
from l2o.meta import state as S  # noqa: E402

# Two synthetic tasks (no data files, instant to load) and very short runs.
FAST = ["--preset", "tiny", "--suite", "mlp_synthetic,regression_teacher", "--unroll", "3",
        "--inner-steps", "7", "--meta-batch", "2", "--eval-every", "0", "--no-progress", "--threads", "1",
        "--lopt", "mlp"]


def run(out, *extra):
    return meta_train.main([*FAST, "--out", str(out), *extra])


def resume(out, *extra):
    return meta_train.main(["--out", str(out), "--resume", "--no-progress", *extra])


def stored_config(out) -> dict:
    return json.loads((S.checkpoint_dir(out) / S.JSON_FILE).read_text())["config"]


def cli_error(argv) -> str:
    """The one-line error message the console entry point exits with."""
    with pytest.raises(SystemExit) as exit_:
        meta_train.cli(argv)
    message = str(exit_.value.code)
    assert message.startswith("meta_train.py: error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------- 1. stop_after is for one invocation
def test_stop_after_is_not_stored_and_a_resume_runs_to_the_end(tmp_path, capsys):
    summary = run(tmp_path, "--outer-steps", "5", "--stop-after", "2")
    assert summary["outer_steps"] == 2 and summary["outer_steps_planned"] == 5 and summary["finished"] is False
    assert json.loads((tmp_path / "summary.json").read_text())["finished"] is False
    assert f"stopped at step 2 of 5; continue with --resume --out {tmp_path}" in capsys.readouterr().err
    summary = resume(tmp_path)          # no --stop-after: on to outer_steps, not 2 more steps
    err = capsys.readouterr().err
    assert f"resuming {tmp_path} at step 2 of 5" in err and "stopped at" not in err
    assert summary["outer_steps"] == 5 and summary["finished"] is True
    assert "stop_after" not in stored_config(tmp_path)


def test_a_checkpoint_of_an_older_version_that_stored_per_invocation_keys_drops_them():
    saved = {**C.MetaConfig(unroll=3).to_dict(), "stop_after": 3, "progress": False}
    assert C.from_checkpoint(saved) == C.MetaConfig(unroll=3)
    assert C.resume(saved, {"stop_after": 1}) == C.MetaConfig(unroll=3, stop_after=1)
    assert set(C.stored(C.MetaConfig())) == set(C.KEYS) - {"stop_after", "progress"}


def test_resuming_a_run_already_at_outer_steps_says_there_is_nothing_to_do(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--outer-steps", "2")
    capsys.readouterr()
    monkeypatch.setattr(meta_train, "train", lambda t: pytest.fail("nothing to train"))
    for steps in ("2", "1"):
        summary = resume(tmp_path, "--outer-steps", steps)
        assert (f"nothing to do: {tmp_path} is already at step 2 and outer_steps is {steps}"
                in capsys.readouterr().err)
        assert summary["outer_steps"] == 2


# ---------------------------------------------------------------- 2. YAML floats
def test_yaml_floats_in_exponent_notation_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nes_sigma: 1E-2\nclip: '0.5'\nlopt_config: {out_scale: 1e-3}\n")
    values = C.load_file(path)
    assert values == {"lr": 3e-4, "es_sigma": 1e-2, "clip": 0.5, "lopt_config": {"out_scale": 1e-3}}
    cfg = C.resolve(None, values)
    assert (cfg.lr, cfg.es_sigma, cfg.clip) == (3e-4, 1e-2, 0.5)
    json_path = tmp_path / "c.json"
    json_path.write_text('{"lr": "3e-4"}')
    assert C.load_file(json_path) == {"lr": 3e-4}
    for text in ("lr: abc\n", "lr: nan\n", "lr: '1e400'\n"):   # not a (finite) number: still refused
        path.write_text(text)
        with pytest.raises(C.ConfigError, match="lr must be a number, got '"):
            C.resolve(None, C.load_file(path))


# ---------------------------------------------------------------- 3. TensorBoard across a resume
def test_tensorboard_keeps_every_step_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "--outer-steps", "5", "--stop-after", "2")
    resume(tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("meta/loss")] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- 4. the output directory
def test_a_fresh_run_refuses_a_directory_that_holds_something_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    message = cli_error([*FAST, "--outer-steps", "1", "--out", str(out)])
    assert f"--out {out} is not empty" in message and "summary.json" in message and "--resume" in message
    assert (out / "summary.json").read_text() == '{"mine": 1}'
    leftovers = tmp_path / "crashed"      # what a run killed before its first checkpoint leaves
    (leftovers / "tb").mkdir(parents=True)
    (leftovers / "start.yaml").write_text("seed: 3\n")    # and the run's own config file
    argv = [*FAST, "--out", str(leftovers), "--config", str(leftovers / "start.yaml")]
    cfg, ckpt = meta_train.configure(meta_train.parse_args(argv))
    assert ckpt is None and cfg.out == str(leftovers) and cfg.seed == 3


# ---------------------------------------------------------------- 5. the evaluation task, at startup
@pytest.mark.parametrize("task,message", [("regresion~valid~0", "unknown task 'regresion~valid~0'; did you mean"),
                                          ("mlp_mnist", "eval_task 'mlp_mnist' is a test (heldout) task")])
def test_a_bad_eval_task_is_refused_before_training(tmp_path, monkeypatch, task, message):
    monkeypatch.setattr(meta_train, "train", lambda t: pytest.fail("trained with a bad eval_task"))
    assert message in cli_error([*FAST, "--outer-steps", "1", "--eval-every", "1", "--eval-task", task,
                                 "--out", str(tmp_path)])


# ---------------------------------------------------------------- 6. the task pool and $L2O_DATA
@pytest.fixture
def data_switch(monkeypatch):
    """The "train" suite as mlp_synthetic and regression_teacher, the latter "needing data"
    that is present while ``switch[0]`` is True."""
    import tasks
    from tasks.task import Task

    switch = [True]
    real_available, real_get_suite = Task.available, tasks.get_suite
    monkeypatch.setattr(Task, "available",
                        lambda self: switch[0] if self.name == "regression_teacher" else real_available(self))

    def get_suite(suite="train", include_unavailable=False):
        if suite != "train":
            return real_get_suite(suite, include_unavailable)
        found = [tasks.get_task(n) for n in ("mlp_synthetic", "regression_teacher")]
        return found if include_unavailable else [t for t in found if t.available()]

    monkeypatch.setattr(tasks, "get_suite", get_suite)
    return switch


def test_a_resume_with_another_task_pool_is_refused(tmp_path, data_switch):
    run(tmp_path, "--suite", "train", "--outer-steps", "3", "--stop-after", "1")
    assert S.load(tmp_path)["tasks"] == ["task:mlp_synthetic", "task:regression_teacher"]
    data_switch[0] = False
    message = cli_error(["--out", str(tmp_path), "--resume", "--no-progress"])
    assert "missing here: task:regression_teacher" in message and "$L2O_DATA" in message
    data_switch[0] = True
    assert resume(tmp_path)["outer_steps"] == 3


def test_a_fresh_run_says_which_suite_tasks_it_leaves_out_for_lack_of_data(tmp_path, data_switch, capsys):
    data_switch[0] = False
    run(tmp_path, "--suite", "train", "--outer-steps", "0")
    err = capsys.readouterr().err
    assert "suite 'train' leaves out 1 task(s) whose data is missing" in err and "regression_teacher" in err


# ---------------------------------------------------------------- 7. bad input: one line, no traceback
def test_bad_input_is_a_one_line_error_naming_the_problem(tmp_path, monkeypatch):
    def error(*argv, config=None):
        extra = []
        if config is not None:
            path = tmp_path / config[0]
            path.write_text(config[1])
            extra = ["--config", str(path)]
        return cli_error([*FAST, "--outer-steps", "1", "--out", str(tmp_path / "out"), *extra, *argv])

    assert "lopt_config: unknown argument(s) ['bogus'] of the mlp metanetwork" in error(
        config=("c.yaml", "lopt_config: {hidden: 8, bogus: 1}\n"))
    assert "lopt_config: scale_floor must be > 0" in error(config=("c.yaml", "lopt_config: {scale_floor: 0}\n"))
    assert f"{tmp_path / 'b.yaml'}: not valid YAML: mapping values are not allowed here at line 1" in error(
        config=("b.yaml", "x: : 1\n"))
    assert f"{tmp_path / 'b.json'}: not valid JSON: " in error(config=("b.json", '{"outer_steps": 2,}'))
    assert "device 'gpu' is not a torch device" in error("--device", "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "device 'cuda': " in error("--device", "cuda")
    (tmp_path / "file").write_text("x")
    assert f"--out {tmp_path / 'file'} is a file, not a directory" in cli_error(
        [*FAST, "--out", str(tmp_path / "file")])


def test_a_malformed_json_config_is_a_config_error_naming_the_file(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("outer-steps: 7\n")           # YAML, but not named so: parsed as JSON
    with pytest.raises(C.ConfigError, match=r"c\.txt: not valid JSON: .*\(YAML files must be named"):
        C.load_file(bad)


# ---------------------------------------------------------------- 8. Ctrl-C, resume, the progress bar
def _interrupt_at(monkeypatch, step):
    real = meta_train.outer_update

    def outer_update(*args):
        if args[-1] == step:        # the outer step it is called for
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(meta_train, "outer_update", outer_update)


def test_ctrl_c_says_where_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 3)
    argv = [*FAST, "--outer-steps", "6", "--checkpoint-every", "2", "--out", str(tmp_path)]
    assert meta_train.cli(argv) == 130
    err = capsys.readouterr().err
    assert (f"interrupted at step 3; last checkpoint: step 2; continue with: python meta_train.py --resume "
            f"--out {tmp_path}") in err and "Traceback" not in err
    monkeypatch.undo()
    assert meta_train.cli(["--out", str(tmp_path), "--resume", "--no-progress"]) == 0
    assert f"resuming {tmp_path} at step 2 of 6 (from {tmp_path / 'ckpt-2'})" in capsys.readouterr().err


def test_ctrl_c_before_the_first_checkpoint_leaves_a_directory_a_fresh_run_accepts(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 1)
    argv = [*FAST, "--outer-steps", "4", "--out", str(tmp_path)]
    assert meta_train.cli(argv) == 130
    assert "interrupted at step 1, before the first checkpoint" in capsys.readouterr().err
    meta_train.configure(meta_train.parse_args(argv))     # no "not empty" refusal


def test_progress_is_for_one_invocation_and_can_be_turned_back_on(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("progress: false\n")
    run(tmp_path / "out", "--config", str(path), "--outer-steps", "2", "--stop-after", "1")
    assert "progress" not in stored_config(tmp_path / "out")
    args = meta_train.parse_args(["--out", str(tmp_path / "out"), "--resume"])
    assert meta_train.configure(args)[0].progress is True
    args = meta_train.parse_args(["--out", str(tmp_path / "out"), "--resume", "--no-progress"])
    assert meta_train.configure(args)[0].progress is False
    assert meta_train.parse_args(["--progress"]).progress is True
    assert C.resolve(None, {"progress": False}, {"progress": True}).progress is True


# ---------------------------------------------------------------- corrupt data and checkpoints: one line, at start
def test_a_corrupt_data_file_is_a_one_line_error_before_any_step(tmp_path, monkeypatch):
    """The data of a suite's file-backed task is read at start, not when the
    task is first drawn (which could be hours into the run)."""
    from test_data import make_mnist
    from tasks import data

    from l2o.meta.tasks_pool import check_local_data

    make_mnist(tmp_path / "data")
    images = tmp_path / "data" / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(b"\x07\x07\x07\x07garbage")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "data"))
    data.clear_cache()

    def no_runs(*args, **kwargs):
        raise AssertionError("the data was not checked before the first inner runs started")

    monkeypatch.setattr(meta_train, "first_runs", no_runs)
    with pytest.raises(data.DatasetFormatError, match="bad magic number"):
        check_local_data(["task:regression_teacher", "family:mlp:0", "task:mlp_mnist"])
    data.clear_cache()
    try:
        message = cli_error([*FAST, "--suite", "mlp_synthetic,mlp_mnist", "--outer-steps", "3",
                             "--out", str(tmp_path / "out")])
    finally:
        data.clear_cache()
    assert f"{images} is not an IDX file (bad magic number)" in message
    assert S.checkpoint_dir(tmp_path / "out") is None


@pytest.mark.parametrize("damage, expected", [
    ("json_truncated", "is not readable JSON (truncated or corrupted?)"),
    ("json_version", "unsupported train-state version 999"),
    ("json_foreign", "not a train state l2o wrote (missing or mistyped: counters;"),
    ("tensors_truncated", "is not a readable safetensors file (truncated or corrupted?)"),
    ("weights_of_another_step", "disagree on the outer step"),
])
def test_a_damaged_checkpoint_is_a_one_line_error_on_resume(tmp_path, damage, expected):
    out = tmp_path / "run"
    run(out, "--outer-steps", "2", "--checkpoint-every", "1")
    ckpt = S.checkpoint_dir(out)
    state = ckpt / S.JSON_FILE
    if damage == "json_truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "json_version":
        state.write_text(json.dumps({**json.loads(state.read_text()), "version": 999}))
    elif damage == "json_foreign":
        meta = json.loads(state.read_text())
        del meta["counters"]
        state.write_text(json.dumps(meta))
    elif damage == "tensors_truncated":
        tensors = ckpt / S.TENSORS_FILE
        tensors.write_bytes(tensors.read_bytes()[:7])
    else:   # a kept earlier generation's weights copied in by hand
        other = tmp_path / "other"
        run(other, "--outer-steps", "1")
        (ckpt / S.LOPT_FILE).write_bytes((S.checkpoint_dir(other) / S.LOPT_FILE).read_bytes())
    message = cli_error(["--out", str(out), "--resume", "--outer-steps", "3", "--no-progress"])
    assert expected in message
