"""meta_train.py end to end, on tiny settings (each test a few seconds on CPU)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meta_train  # noqa: E402
from l2o.meta import config as C  # noqa: E402
from l2o.meta import state as S  # noqa: E402


def state_file(out, name="train_state.json"):
    """A file of the last complete checkpoint in ``out``."""
    return S.checkpoint_dir(out) / name

# Two synthetic tasks (no data files, instant to load) and very short runs.
FAST = ["--preset", "tiny", "--suite", "mlp_synthetic,regression_teacher", "--unroll", "3",
        "--inner-steps", "7", "--meta-batch", "2", "--eval-every", "0", "--no-progress", "--threads", "1"]


def run(out, *extra):
    return meta_train.main([*FAST, "--out", str(out), *extra])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        meta_train.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Precedence: defaults < --preset < --config < flags" in out
    for flag in ("--lopt", "--suite", "--outer-steps", "--unroll", "--inner-steps", "--meta-batch",
                 "--estimator", "--device", "--seed", "--out", "--resume", "--config", "--preset"):
        assert flag in out


@pytest.mark.parametrize("kind", ["gmn", "mlp"])
def test_tiny_run_writes_loadable_weights(tmp_path, kind):
    import l2o
    import tasks

    summary = run(tmp_path, "--lopt", kind, "--outer-steps", "3", "--eval-every", "3", "--eval-steps", "5",
                  "--eval-task", "regression_teacher")
    assert summary["outer_steps"] == 3 and summary["skipped"] == 0
    assert all(v is not None and torch.isfinite(torch.tensor(v)) for v in
               (summary["meta_loss_first"], summary["meta_loss_last"]))
    assert summary["last_eval"]["lopt_final"] > 0
    for name in ("lopt.safetensors", "summary.json"):
        assert (tmp_path / name).is_file()
    for name in ("lopt.safetensors", "train_state.json", "train_state.safetensors"):
        assert state_file(tmp_path, name).is_file()
    assert any((tmp_path / "tb").iterdir()), "no TensorBoard events"
    task = tasks.get_task("mlp_synthetic")
    model = task.init(0)
    cls = l2o.GMNOptimizer if kind == "gmn" else l2o.MLPOptimizer
    opt = cls(model if kind == "gmn" else model.parameters(), weights=tmp_path / "lopt.safetensors")
    batch = next(task.batches("train", seed=0))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    task.loss(model, batch).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_meta_loss_decreases_on_one_task(tmp_path):
    # One task, one run, a high outer lr: the meta-loss must go down (the
    # learned optimizer learns to take better steps than Adam at lr 1e-3).
    run(tmp_path, "--lopt", "mlp", "--suite", "regression_teacher", "--outer-steps", "12",
        "--inner-steps", "1000", "--meta-batch", "1", "--lr", "3e-2", "--warmup", "0")
    hist = json.loads(state_file(tmp_path, "train_state.json").read_text())["history"]["meta_loss"]
    assert min(hist[-3:]) < hist[0]


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_resume_is_exact(tmp_path, estimator):
    args = ("--lopt", "mlp", "--outer-steps", "6", "--checkpoint-every", "2", "--estimator", estimator)
    run(tmp_path / "straight", *args)
    run(tmp_path / "split", *args, "--stop-after", "3")           # "killed" after 3 steps
    meta_train.main(["--out", str(tmp_path / "split"), "--resume", "--no-progress"])
    a = load_file(tmp_path / "straight" / "lopt.safetensors")
    b = load_file(tmp_path / "split" / "lopt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(state_file(tmp_path / "straight", "train_state.safetensors"))
    sb = load_file(state_file(tmp_path / "split", "train_state.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ja = json.loads(state_file(tmp_path / "straight", "train_state.json").read_text())
    jb = json.loads(state_file(tmp_path / "split", "train_state.json").read_text())
    assert ja["history"]["meta_loss"] == jb["history"]["meta_loss"]
    assert ja["runs"] == jb["runs"]


def test_crash_mid_checkpoint_keeps_previous_checkpoint(tmp_path, monkeypatch):
    # Kill the run while it writes the second file of the step-4 checkpoint:
    # the step-2 checkpoint must survive intact and resume exactly.
    args = ("--lopt", "mlp", "--outer-steps", "6", "--checkpoint-every", "2")
    run(tmp_path / "straight", *args)
    real_save_lopt, calls = S.save_lopt, []

    def crashing_save_lopt(lopt, path, extra=None):
        if extra["counters"]["outer_step"] == 4:
            raise SystemExit("killed mid-checkpoint")
        calls.append(path)
        return real_save_lopt(lopt, path, extra)

    monkeypatch.setattr(S, "save_lopt", crashing_save_lopt)
    with pytest.raises(SystemExit, match="killed"):
        run(tmp_path / "split", *args)
    monkeypatch.setattr(S, "save_lopt", real_save_lopt)
    assert calls, "the step-2 checkpoint was not written"
    assert S.checkpoint_dir(tmp_path / "split").name == "ckpt-2"
    assert S.load(tmp_path / "split")["counters"]["outer_step"] == 2
    meta_train.main(["--out", str(tmp_path / "split"), "--resume", "--no-progress"])
    a = load_file(tmp_path / "straight" / "lopt.safetensors")
    b = load_file(tmp_path / "split" / "lopt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "split").glob("ckpt.tmp-*")), "the half-written checkpoint was not cleaned up"
    assert [p.name for p in (tmp_path / "split").glob("ckpt-*")] == ["ckpt-6"]


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_nonfinite_meta_loss_is_skipped(tmp_path, estimator):
    # The fault is injected through the test hook, never through the config.
    from l2o.meta import faults

    with faults.nan_meta_loss(steps=[1]):
        summary = run(tmp_path / "out", "--lopt", "mlp", "--outer-steps", "3", "--estimator", estimator)
    assert not faults.forced_nan(1), "the hook outlived its block"
    assert summary["skipped"] == 1
    ckpt = S.load(tmp_path / "out")
    hist = ckpt["history"]
    assert hist["meta_loss"][1] is None and hist["meta_loss"][0] is not None and hist["meta_loss"][2] is not None
    assert "inject_nan_steps" not in ckpt["config"]


def test_console_entry_point_exits_zero(tmp_path):
    # [project.scripts] calls the function and passes its return value to sys.exit.
    import tomllib

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["l2o-meta-train"]
    module, func = entry.split(":")
    assert module == "meta_train"
    assert getattr(meta_train, func)([*FAST, "--lopt", "mlp", "--outer-steps", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        getattr(meta_train, func)([*FAST, "--lopt", "mlp", "--outer-steps", "1", "--out", str(tmp_path)])


def test_es_drops_nonfinite_pairs(tmp_path, monkeypatch):
    # One perturbed unroll with a NaN loss must not poison the ES estimate: the
    # pair is dropped and counted, the step is not skipped, the weights stay finite.
    from l2o.meta import es

    real_unroll, calls = es.unroll, []

    def nan_on_first_perturbation(*args, params_override=None, **kwargs):
        res = real_unroll(*args, params_override=params_override, **kwargs)
        if params_override is not None:
            calls.append(1)
            if len(calls) % 4 == 1:      # first of 2 runs x (1 pair x 2 signs) per step
                res.meta_loss = torch.tensor(float("nan"))
        return res

    monkeypatch.setattr(es, "unroll", nan_on_first_perturbation)
    summary = run(tmp_path, "--lopt", "mlp", "--outer-steps", "2", "--estimator", "es", "--es-pairs", "1")
    assert summary["skipped"] == 0
    counters = json.loads(state_file(tmp_path).read_text())["counters"]
    assert counters["nonfinite_pairs"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "lopt.safetensors").values())


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown config key"):
        C.resolve("tiny", {"unrol": 3})
    with pytest.raises(C.ConfigError, match="unroll"):
        C.resolve("tiny", None, {"unroll": 0})
    run(tmp_path, "--lopt", "mlp", "--outer-steps", "1")
    with pytest.raises(C.ConfigError, match="already holds a checkpoint"):
        run(tmp_path, "--lopt", "mlp", "--outer-steps", "1")
    with pytest.raises(C.ConfigError, match="cannot change"):
        meta_train.main(["--out", str(tmp_path), "--resume", "--unroll", "4"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_processes_gloo(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", str(ROOT / "meta_train.py"), *FAST, "--lopt", "gmn",
           "--outer-steps", "2", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["outer_steps"] == 2
    assert summary["replicas_identical"] is True
    assert len(json.loads(state_file(tmp_path, "train_state.json").read_text())["runs"]) == 2


def test_diverged_runs_are_reset(tmp_path):
    # With a threshold below any achievable loss every run "diverges" on its first step.
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"diverge_factor": 1e-3, "lopt": "mlp"}))
    summary = run(tmp_path / "out", "--config", str(cfg), "--outer-steps", "2")
    assert summary["resets"] == 4 and summary["skipped"] == 0
    runs = json.loads(state_file(tmp_path / "out", "train_state.json").read_text())["runs"]
    assert [r["index"] for r in runs] == [2, 2] and all(r["step"] == 0 for r in runs)


def test_second_order_and_log_objective(tmp_path):
    summary = run(tmp_path, "--lopt", "mlp", "--outer-steps", "2", "--second-order", "--meta-objective", "log")
    assert summary["skipped"] == 0 and summary["meta_loss_last"] is not None


def test_second_order_through_attention(tmp_path):
    # the fused SDPA kernels' backward cannot be differentiated again: the unroll must use the math one
    summary = run(tmp_path, "--suite", "transformer_sort", "--outer-steps", "2", "--second-order",
                  "--meta-data", "valid")
    assert summary["skipped"] == 0 and summary["meta_loss_last"] is not None


def test_frozen_parameters_keep_their_initial_values(tmp_path):
    from l2o.checkpoint import load_lopt

    torch.manual_seed(0)
    init = meta_train.make_lopt("gmn")   # what the run starts from (seed 0)
    run(tmp_path, "--outer-steps", "4", "--config", str(_freeze_file(tmp_path, ["log_nominal", "edge_head"])))
    trained = load_lopt(tmp_path / "lopt.safetensors")
    assert trained.log_nominal.item() == init.log_nominal.item()
    torch.testing.assert_close(trained.edge_head.weight, init.edge_head.weight, rtol=0, atol=0)
    moved = [n for (n, a), b in zip(trained.named_parameters(), init.parameters())
             if not torch.equal(a, b)]
    assert moved and not any(n == "log_nominal" or n.startswith("edge_head.") for n in moved)
    with pytest.raises(C.ConfigError, match="names no parameter"):
        run(tmp_path / "bad", "--config", str(_freeze_file(tmp_path, ["no_such_weight"])))


def test_zero_outer_steps_writes_the_initialisation(tmp_path):
    """outer_steps 0: the run's initial metanetwork (what step 0 of the same config starts
    from), with its checkpoint and summary, e.g. to evaluate or ship an untrained baseline."""
    from l2o.checkpoint import load_lopt

    torch.manual_seed(0)
    init = meta_train.make_lopt("gmn")
    summary = run(tmp_path, "--outer-steps", "0")
    assert summary["outer_steps"] == 0 and summary["inner_steps"] == 0 and summary["meta_loss_first"] is None
    written = load_lopt(tmp_path / "lopt.safetensors")
    for (name, a), b in zip(written.named_parameters(), init.parameters()):
        assert torch.equal(a, b), name
    assert state_file(tmp_path).is_file()


def _freeze_file(tmp_path, names):
    path = tmp_path / f"freeze_{len(names)}.json"
    path.write_text(json.dumps({"freeze": names}))
    return path


# ------------------------------------------------------------ the config
BAD_VALUE = {"choice": "nope", "pos_int": 0, "nonneg_int": -1, "int": "3", "pos_float": 0.0,
             "nonneg_float": -1.0, "bool": "yes", "str": 3, "nonempty": "", "mapping": [1], "names": "a"}


def test_config_defaults_live_in_one_place_and_every_key_is_checked():
    import dataclasses

    assert C.resolve() == C.MetaConfig()
    assert C.MetaConfig(**C.MetaConfig().to_dict()) == C.MetaConfig()      # what checkpoints store round-trips
    assert C.resolve("tiny").unroll == C.PRESETS["tiny"]["unroll"]
    for f in dataclasses.fields(C.MetaConfig):
        with pytest.raises(C.ConfigError, match=rf"\b{f.name}\b"):     # the message names the key
            C.resolve(None, None, {f.name: BAD_VALUE[f.metadata["check"]]})
    assert isinstance(C.resolve(None, {"lr": 1}).lr, float)


def test_retired_inject_nan_steps_is_not_configuration(tmp_path):
    with pytest.raises(C.ConfigError, match="inject_nan_steps"):
        C.resolve("tiny", {"inject_nan_steps": [1]})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("inject_nan_steps: [1]\nlopt: mlp\n")
    with pytest.raises(C.ConfigError, match="inject_nan_steps"):
        run(tmp_path / "out", "--config", str(cfg), "--outer-steps", "1")


def _age_checkpoint(out, **extra):
    """Rewrite the checkpoint's stored config as older versions wrote it: no freeze,
    init_from or batch_runs (added later), and the retired inject_nan_steps key."""
    path = state_file(out)
    meta = json.loads(path.read_text())
    for key in ("freeze", "init_from", "batch_runs"):
        del meta["config"][key]
    meta["config"]["inject_nan_steps"] = []
    meta["config"].update(extra)
    path.write_text(json.dumps(meta))


def test_checkpoints_of_older_versions_resume_exactly(tmp_path):
    args = ("--lopt", "mlp", "--outer-steps", "4", "--checkpoint-every", "2")
    run(tmp_path / "straight", *args)
    run(tmp_path / "old", *args, "--stop-after", "2")
    _age_checkpoint(tmp_path / "old")
    meta_train.main(["--out", str(tmp_path / "old"), "--resume", "--no-progress"])
    a = load_file(tmp_path / "straight" / "lopt.safetensors")
    b = load_file(tmp_path / "old" / "lopt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads(state_file(tmp_path / "old").read_text())["config"]
    assert "inject_nan_steps" not in saved and saved["freeze"] == [] and saved["batch_runs"] is False
    # A checkpoint of a test run that did use the retired key: ignored, with a warning.
    run(tmp_path / "nan", "--lopt", "mlp", "--outer-steps", "2", "--stop-after", "1")
    _age_checkpoint(tmp_path / "nan", inject_nan_steps=[1])
    with pytest.warns(UserWarning, match="inject_nan_steps"):
        summary = meta_train.main(["--out", str(tmp_path / "nan"), "--resume", "--no-progress"])
    assert summary["skipped"] == 0


# ------------------------------------------------------------ gradient estimators
def test_estimators_follow_the_protocol():
    from l2o.checkpoint import make_lopt
    from l2o.meta.estimator import Estimate, GradientEstimator
    from l2o.meta.inner import start_run
    from l2o.meta.outer import ESTIMATORS, make_estimator
    from l2o.meta.tasks_pool import TaskPool, suite_specs

    assert set(ESTIMATORS) == set(C.CHOICES["estimator"])
    for name, cls in ESTIMATORS.items():
        assert cls.name == name
        cfg = C.resolve("tiny", None, {"lopt": "mlp", "suite": "regression_teacher", "estimator": name,
                                       "unroll": 3, "inner_steps": 50, "es_pairs": 1})
        torch.manual_seed(0)
        lopt = make_lopt("mlp")
        pool = TaskPool("mlp", "cpu")
        estimator = make_estimator(cfg, pool, "cpu")
        assert isinstance(estimator, GradientEstimator) and estimator.global_batch == cfg.meta_batch
        runs = [start_run(pool, suite_specs(cfg.suite), lopt, cfg.seed, s, 0, cfg.inner_steps) for s in (0, 1)]
        before = [r.params.clone() for r in runs]
        est = estimator.estimate(lopt, runs, 0)
        assert isinstance(est, Estimate) and not est.nonfinite
        assert [r.steps for r in est.results] == [3, 3]
        assert est.loss_sum == pytest.approx(sum(float(r.meta_loss) for r in est.results))
        assert all(torch.equal(r.params, p) for r, p in zip(runs, before)), f"{name} modified its runs"
        grads = [p.grad for p in lopt.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(bool(g.abs().sum() > 0) for g in grads), name


def test_meta_train_runs_any_object_of_the_protocol(tmp_path, monkeypatch):
    # meta_train.py knows estimators only through the protocol: one that unrolls
    # but estimates a zero gradient leaves the metanetwork at its initialisation
    # while the inner runs move on.
    from l2o.checkpoint import load_lopt, make_lopt
    from l2o.meta import outer
    from l2o.meta.estimator import Estimate, EstimatorSetup
    from l2o.meta.inner import unroll

    class ZeroGradient(EstimatorSetup):
        name = "tbptt"
        calls: list[int] = []

        def estimate(self, lopt, runs, outer_step):
            ZeroGradient.calls.append(outer_step)
            results = [unroll(lopt, r, self.pool.get(r.spec), self.cfg.unroll, self.cfg, self.device, meta=False)
                       for r in runs]
            for p in lopt.parameters():
                p.grad = torch.zeros_like(p)
            return Estimate(sum(float(r.meta_loss) for r in results), results, False)

    monkeypatch.setitem(outer.ESTIMATORS, "tbptt", ZeroGradient)
    torch.manual_seed(0)
    init = make_lopt("mlp")
    summary = run(tmp_path, "--lopt", "mlp", "--outer-steps", "2", "--inner-steps", "50")
    assert ZeroGradient.calls == [0, 1] and summary["skipped"] == 0
    trained = load_lopt(tmp_path / "lopt.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), init.parameters()))
    assert [r["step"] for r in json.loads(state_file(tmp_path).read_text())["runs"]] == [6, 6]


def test_outer_optimizer_state_with_non_tensor_entries_survives_the_train_state_split():
    """The outer optimizer's state is stored as tensors (safetensors) plus the
    rest (JSON); an optimizer that keeps a plain number in its state (LBFGS's
    ``n_iter``, a user's counter) must get it back, not lose or blank it."""
    def fresh():
        p = torch.nn.Parameter(torch.ones(3))
        return p, torch.optim.Adam([p], lr=0.1)
    p, opt = fresh()
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    opt.state[p]["n_iter"] = 7
    tensors, scalars = S._optimizer_split(opt)
    q, restored = fresh()
    restored.load_state_dict(S._optimizer_join(tensors, json.loads(json.dumps(scalars))))
    assert restored.state[q]["n_iter"] == 7
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state[q][key], opt.state[p][key]), key


def test_resuming_on_another_number_of_processes_warns_that_it_is_not_exact(tmp_path):
    run(tmp_path, "--lopt", "mlp", "--outer-steps", "3", "--checkpoint-every", "1", "--stop-after", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta_train.main(["--out", str(tmp_path), "--resume", "--no-progress", "--stop-after", "1"])
    assert not [w for w in caught if "process(es)" in str(w.message)]
    path = state_file(tmp_path)
    meta = json.loads(path.read_text())
    assert meta["world_size"] == 1 and meta["counters"]["outer_step"] == 2
    meta["world_size"] = 2
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) on 1: the runs continue, but not bit-exactly"):
        summary = meta_train.main(["--out", str(tmp_path), "--resume", "--no-progress"])
    assert summary["outer_steps"] == 3
