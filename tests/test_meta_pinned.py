"""Meta-training checked against hand-built references, not only "it runs"
(issue 17). Each test names the bug class it catches; each was checked to fail
with that one-line bug put back by hand (in a scratch copy)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meta_train  # noqa: E402
from l2o.checkpoint import load_lopt, make_lopt, save_lopt  # noqa: E402
from l2o.meta import antithetic as A  # noqa: E402
from l2o.meta import config as C  # noqa: E402
from l2o.meta import pes  # noqa: E402
from l2o.meta import state as S  # noqa: E402
from l2o.meta.inner import advance, new_run, start_run, unroll  # noqa: E402
from l2o.meta.tasks_pool import TaskPool, suite_specs  # noqa: E402

# One synthetic task, one run of 100 inner steps (no task is redrawn in these tests).
ONE = ["--preset", "tiny", "--lopt", "mlp", "--suite", "regression_teacher", "--unroll", "3",
       "--inner-steps", "100", "--meta-batch", "1", "--eval-every", "0", "--no-progress", "--threads", "1"]


def train(out, *extra):
    return meta_train.main([*ONE, "--out", str(out), *extra])


@pytest.fixture
def frozen(monkeypatch):
    """The outer learning rate is 0 (config validation forbids lr=0, so the
    schedule is patched): the metanetwork stays at its initialisation."""
    monkeypatch.setattr(meta_train, "outer_lr", lambda *args, **kwargs: 0.0)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- learning
def inner_quality(lopt, cfg, seeds=(11, 12, 13), steps=40):
    """Mean over the first ``steps`` inner steps of loss / initial loss, on fresh runs."""
    pool = TaskPool("mlp", "cpu")
    total = 0.0
    for seed in seeds:
        run = new_run(pool, "task:regression_teacher", seed, lopt, 0, 0, 1000)
        total += float(unroll(lopt, run, pool.get(run.spec), steps, cfg, "cpu", meta=False).meta_loss)
    return total / len(seeds)


def test_meta_training_beats_its_own_initialisation(tmp_path, monkeypatch):
    # Catches: an outer optimizer that never steps. The meta-loss history alone
    # cannot show it (it falls anyway as the inner runs train), so the learned
    # weights are compared with the initial ones on fresh inner runs.
    args = ("--outer-steps", "12", "--inner-steps", "1000", "--lr", "3e-2", "--warmup", "0")
    train(tmp_path / "learning", *args)
    with monkeypatch.context() as m:
        m.setattr(meta_train, "outer_lr", lambda *a, **k: 0.0)
        train(tmp_path / "frozen", *args)
    cfg = C.from_checkpoint(json.loads((S.checkpoint_dir(tmp_path / "learning") / S.JSON_FILE).read_text())["config"])
    torch.manual_seed(cfg.seed)
    init = make_lopt("mlp", **cfg.lopt_config)
    learned, still = load_lopt(tmp_path / "learning" / "lopt.safetensors"), load_lopt(tmp_path / "frozen" / "lopt.safetensors")
    assert same(still.state_dict(), init.state_dict()), "lr 0 must leave the initialisation as it was"
    q_init, q_learned, q_still = inner_quality(init, cfg), inner_quality(learned, cfg), inner_quality(still, cfg)
    assert q_still == q_init
    assert q_learned < 0.9 * q_init, f"meta-trained {q_learned:.4f} vs its initialisation {q_init:.4f}"


# --------------------------------------------------------- carried state
@pytest.fixture
def absolute_batches(monkeypatch):
    """Inner step ``s`` reads batch ``s`` of one stream per run, wherever the
    truncations fall. (The library's streams restart at each truncation, seeded
    by the run's step, so an unroll of 2K steps and two of K read different
    batches by design; with this source the two must agree exactly.)"""
    from l2o.meta import inner

    def stream(entry, run, device, split="train"):
        salt = 0 if split == "train" else 0x7E57
        batches = entry.task.batches(split, seed=((run.data_seed ^ salt) * 1_000_003) % (2**63), device=device)
        for _ in range(run.step):
            next(batches)
        return batches

    monkeypatch.setattr(inner, "batch_stream", stream)


def reference_run(cfg, lopt, steps):
    """The run of slot 0 unrolled ``steps`` inner steps in one piece, by hand."""
    pool = TaskPool(cfg.lopt, "cpu")
    run = start_run(pool, suite_specs(cfg.suite), lopt, cfg.seed, 0, 0, cfg.inner_steps)
    return pool, run, unroll(lopt, run, pool.get(run.spec), steps, cfg, "cpu", meta=False)


def assert_carried(run_tensors, result):
    f = result.final
    torch.testing.assert_close(run_tensors["params"], f["params"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(run_tensors["grad"], f["grad"], rtol=1e-4, atol=1e-7)
    for name, value in f["lopt_state"].items():
        torch.testing.assert_close(run_tensors[f"lopt_state.{name}"], value, rtol=1e-5, atol=1e-9)


def test_two_truncations_equal_one_unroll_of_both(absolute_batches):
    # Catches (in l2o.meta.inner): params, gradient or optimizer state not carried by advance().
    cfg = C.resolve("tiny", None, {"lopt": "mlp", "suite": "regression_teacher", "inner_steps": 100})
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    pool, run, once = reference_run(cfg, lopt, 6)
    first = unroll(lopt, run, pool.get(run.spec), 3, cfg, "cpu", meta=False)
    second = unroll(lopt, advance(run, first), pool.get(run.spec), 3, cfg, "cpu", meta=False)
    for key in ("params", "grad"):
        assert torch.equal(second.final[key], once.final[key]), key
    for name in once.final["lopt_state"]:
        assert torch.equal(second.final["lopt_state"][name], once.final["lopt_state"][name]), name
    assert second.final["last_loss"] == once.final["last_loss"]


@pytest.mark.parametrize("how", ["straight", "resumed"])
@pytest.mark.parametrize("extra", [("--estimator", "tbptt"), ("--estimator", "tbptt", "--batch-runs"),
                                   ("--estimator", "es"), ("--estimator", "pes")],
                         ids=["tbptt", "batched", "es", "pes"])
def test_meta_train_carries_inner_state_across_truncations(tmp_path, frozen, absolute_batches, how, extra):
    # Catches (in meta_train.py and the checkpoint): inner params or learned-optimizer
    # state dropped between outer steps, straight or across a resume. The run of a
    # frozen meta-trainer after 2 outer steps of K = 3 must be the hand-made run
    # unrolled 6 steps in one piece.
    out = tmp_path / "out"
    if how == "straight":
        train(out, "--outer-steps", "2", *extra)
    else:
        train(out, "--outer-steps", "2", "--stop-after", "1", *extra)
        assert S.load(out)["counters"]["outer_step"] == 1
        meta_train.main(["--out", str(out), "--resume", "--no-progress"])
    ckpt = S.load(out)
    assert ckpt["counters"]["outer_step"] == 2 and ckpt["run_scalars"][0]["step"] == 6
    _, _, once = reference_run(C.from_checkpoint(ckpt["config"]), ckpt["lopt"], 6)
    assert_carried(ckpt["run_tensors"][0], once)


# ------------------------------------------------------------------ PES
def test_pes_accumulates_its_perturbations():
    # Catches: PES using only this truncation's noise (xi not accumulated), in the
    # carried particles or in the gradient. Reference: the estimate written out by hand.
    cfg = C.resolve("tiny", None, {"lopt": "mlp", "suite": "regression_teacher", "inner_steps": 100,
                                   "estimator": "pes", "es_pairs": 2, "unroll": 3})
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    pool = TaskPool("mlp", "cpu")
    run = start_run(pool, suite_specs(cfg.suite), lopt, cfg.seed, 0, 0, cfg.inner_steps)
    weights = {n: p for n, p in lopt.named_parameters() if p.requires_grad}
    noise = [[A.noise(weights, cfg.seed, step, 0, j, "cpu") for j in range(2)] for step in range(2)]

    estimator = pes.PersistentES(cfg, pool, "cpu", global_batch=1)
    results = estimator.estimate(lopt, [run], 0).results
    run = advance(run, results[0])
    for j, pair in enumerate(run.particles):
        assert same(pair["xi"], noise[0][j])
    particles = run.particles
    for p in lopt.parameters():
        p.grad = None
    results = estimator.estimate(lopt, [run], 1).results
    sigma, entry = cfg.es_sigma, pool.get(run.spec)
    expected = {n: torch.zeros_like(p) for n, p in weights.items()}
    for j, pair in enumerate(particles):
        xi = {n: noise[0][j][n] + noise[1][j][n] for n in weights}
        torch.testing.assert_close(results[0].final["particles"][j]["xi"], xi, rtol=0, atol=0)
        loss = {}
        with torch.no_grad():
            for sign, key in ((1.0, "+"), (-1.0, "-")):
                loss[key] = unroll(lopt, run.with_state(pair[key]), entry, cfg.unroll, cfg, "cpu", meta=False,
                                   params_override=A.perturbed(weights, noise[1][j], sign, sigma)).meta_loss
        coef = (loss["+"] - loss["-"]) / (2.0 * sigma * len(particles))
        for n in weights:
            expected[n] += coef * xi[n]
    for n, p in weights.items():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-9)


# ------------------------------------------------ objective and options
def test_second_order_and_log_objective_change_the_meta_gradient(tmp_path):
    # Catches: --second-order or --meta-objective log accepted but silently ignored.
    norms = {}
    for label, extra in (("default", ()), ("second_order", ("--second-order",)),
                         ("log", ("--meta-objective", "log"))):
        train(tmp_path / label, "--outer-steps", "1", *extra)
        cfg = json.loads((S.checkpoint_dir(tmp_path / label) / S.JSON_FILE).read_text())
        norms[label] = cfg["history"]["grad_norm"][0]
        assert cfg["config"]["second_order"] == (label == "second_order")
        assert cfg["config"]["meta_objective"] == ("log" if label == "log" else "norm")
    base = norms["default"]
    assert base > 0
    for label in ("second_order", "log"):
        assert abs(norms[label] - base) > 1e-4 * base, f"{label}: meta-gradient norm {norms[label]} == default {base}"


def test_flags_override_the_config_file(tmp_path):
    # Catches: a config file overriding command-line flags (precedence defaults < preset < file < flags).
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("unroll: 4\nmeta-objective: raw\nes_sigma: 0.02\ninner_steps: 50\n")
    resolved = C.resolve("tiny", C.load_file(cfg_file), {"unroll": 3})
    assert resolved.unroll == 3 and resolved.meta_objective == "raw" and resolved.inner_steps == 50
    assert resolved.meta_batch == C.PRESETS["tiny"]["meta_batch"]
    # end to end (ONE gives --unroll 3 and --inner-steps 100 as flags)
    train(tmp_path / "out", "--config", str(cfg_file), "--outer-steps", "1")
    saved = S.load(tmp_path / "out")
    assert saved["config"]["unroll"] == 3 and saved["config"]["inner_steps"] == 100
    assert saved["config"]["meta_objective"] == "raw" and saved["config"]["es_sigma"] == 0.02
    assert saved["run_scalars"][0]["step"] == 3


# ----------------------------------------------------------- atomic writes
def test_weights_write_interrupted_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    # Catches: checkpoint files written in place rather than to a temp file renamed over the target.
    path = tmp_path / "lopt.safetensors"
    torch.manual_seed(0)
    old, new = make_lopt("mlp"), make_lopt("mlp")
    save_lopt(old, path)

    def crash(src, dst):
        raise OSError("killed between the temp file and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        save_lopt(new, path)
    monkeypatch.undo()
    assert same(load_lopt(path).state_dict(), old.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["lopt.safetensors"], "the temp file was left behind"


def test_checkpoint_interrupted_at_any_rename_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    # Catches: a checkpoint switch that is not atomic (pointer moved before the
    # directory is complete, files written in place). The run is killed at each
    # os.replace of the step-2 checkpoint in turn: the last complete checkpoint
    # (step 1, or step 2 once the pointer moved) must load, and resume exactly.
    base, straight = tmp_path / "base", tmp_path / "straight"
    train(straight, "--outer-steps", "2", "--checkpoint-every", "1")
    train(base, "--outer-steps", "2", "--checkpoint-every", "1", "--stop-after", "1")
    base_state = load_file(S.checkpoint_dir(base) / S.TENSORS_FILE)
    real_replace, calls = os.replace, []

    def counting(src, dst):
        calls.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting)
    shutil.copytree(base, tmp_path / "count")
    meta_train.main(["--out", str(tmp_path / "count"), "--resume", "--no-progress"])
    n_calls = len(calls)
    assert n_calls >= 5
    final = load_file(tmp_path / "straight" / "lopt.safetensors")
    for n in range(1, n_calls + 1):
        out = tmp_path / f"crash{n}"
        shutil.copytree(base, out)
        seen = []

        def crashing(src, dst, n=n, seen=seen):
            seen.append(1)
            if len(seen) == n:
                raise OSError(f"killed at rename {n}")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(OSError, match="killed"):
            meta_train.main(["--out", str(out), "--resume", "--no-progress"])
        monkeypatch.setattr(os, "replace", real_replace)
        ckpt = S.load(out)      # the pointer names a complete, consistent checkpoint
        step = ckpt["counters"]["outer_step"]
        assert step in (1, 2), n
        if step == 1:
            assert same(load_file(S.checkpoint_dir(out) / S.TENSORS_FILE), base_state), n
        load_lopt(out / "lopt.safetensors")   # the user-facing copy is never half-written
        if step == 1:
            meta_train.main(["--out", str(out), "--resume", "--no-progress"])
        assert same(load_file(S.checkpoint_dir(out) / S.LOPT_FILE), final), n
