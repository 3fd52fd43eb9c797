"""The meta-gradient estimators (``l2o/meta/tbptt.py``, ``pes.py``) and the outer step
(``l2o/meta/outer.py``): the batched TBPTT path on training batches, forced NaN
meta-losses, PES's dropped-pair count, its scaling by the meta-batch size and the
reset of a diverged particle, the gradient clip and the skip decision.

The outer-step tests use a stub estimator (a fixed gradient and fixed results), so
the clip, the counters and the skip are checked against values known exactly."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2o.checkpoint import make_lopt  # noqa: E402
from l2o.meta import config as C  # noqa: E402
from l2o.meta import dist as D  # noqa: E402
from l2o.meta import faults, pes  # noqa: E402
from l2o.meta.estimator import Estimate  # noqa: E402
from l2o.meta.inner import UnrollResult, start_run  # noqa: E402
from l2o.meta.outer import make_estimator, outer_update  # noqa: E402
from l2o.meta.tasks_pool import TaskPool, suite_specs  # noqa: E402
from l2o.meta.tbptt import TruncatedBackprop  # noqa: E402


def tiny(**kw):
    over = {"lopt": "mlp", "suite": "regression_teacher", "inner_steps": 100, "unroll": 2, "meta_data": "train"}
    over.update(kw)
    return C.resolve("tiny", None, over)


def setup(cfg, n_runs=2):
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    pool = TaskPool("mlp", "cpu")
    runs = [start_run(pool, suite_specs(cfg.suite), lopt, cfg.seed, slot, 0, cfg.inner_steps)
            for slot in range(n_runs)]
    return lopt, pool, runs


def grads(lopt):
    return {n: None if p.grad is None else p.grad.clone() for n, p in lopt.named_parameters()}


# ------------------------------------------------------------------ TBPTT
def test_batched_tbptt_on_training_batches_gives_the_unbatched_gradient():
    # Catches: the batched unroll run without meta=True (no gradient on training batches).
    cfg = tiny()
    lopt, pool, runs = setup(cfg)
    est = TruncatedBackprop(cfg, pool, "cpu", 2).estimate(lopt, runs, 0)
    single = grads(lopt)
    assert all(g is not None and g.abs().sum() > 0 for g in single.values())
    lopt.zero_grad(set_to_none=True)
    cfg_b = tiny(batch_runs=True)
    est_b = TruncatedBackprop(cfg_b, pool, "cpu", 2).estimate(lopt, runs, 0)
    batched = grads(lopt)
    for n in single:
        assert batched[n] is not None, n
        torch.testing.assert_close(batched[n], single[n], rtol=1e-4, atol=1e-7)
    assert est_b.loss_sum == pytest.approx(est.loss_sum, rel=1e-5)
    assert not est_b.nonfinite and not any(r.meta_loss.requires_grad for r in est_b.results)


@pytest.mark.parametrize("batch_runs", [False, True])
def test_a_forced_nan_meta_loss_is_reported_and_not_backpropagated(batch_runs):
    # Catches: the forced NaN ignored on the batched path; a NaN meta-loss backpropagated.
    cfg = tiny(batch_runs=batch_runs)
    lopt, pool, runs = setup(cfg)
    with faults.nan_meta_loss(steps=[3]):
        est = TruncatedBackprop(cfg, pool, "cpu", 2).estimate(lopt, runs, 3)
    assert est.nonfinite and math.isnan(est.loss_sum)
    assert all(p.grad is None for p in lopt.parameters())


# ------------------------------------------------------------------ PES
class Wrapped:
    """``pes.unroll`` with the results of chosen calls changed (call 0 is the unperturbed
    unroll, then pair j's ``+`` and ``-`` copies are calls 1 + 2j and 2 + 2j)."""

    def __init__(self, real, change):
        self.real, self.change, self.calls = real, change, 0

    def __call__(self, *a, **kw):
        result = self.real(*a, **kw)
        i, self.calls = self.calls, self.calls + 1
        return self.change(i, result)


def pes_cfg(**kw):
    return tiny(estimator="pes", es_pairs=3, **kw)


def test_pes_counts_each_dropped_pair_and_none_when_all_are_finite(monkeypatch):
    cfg = pes_cfg()
    lopt, pool, runs = setup(cfg, 1)
    est = pes.PersistentES(cfg, pool, "cpu", 1).estimate(lopt, runs, 0)
    assert est.results[0].nonfinite_pairs == 0
    # pairs 0 and 2 get a NaN loss on their + copy: two pairs dropped
    nan = lambda i, r: replace(r, meta_loss=torch.tensor(float("nan"))) if i in (1, 5) else r  # noqa: E731
    monkeypatch.setattr(pes, "unroll", Wrapped(pes.unroll, nan))
    lopt.zero_grad(set_to_none=True)
    est = pes.PersistentES(cfg, pool, "cpu", 1).estimate(lopt, runs, 0)
    assert est.results[0].nonfinite_pairs == 2
    assert all(torch.isfinite(p.grad).all() for p in lopt.parameters() if p.requires_grad)


def test_pes_gradient_is_divided_by_the_meta_batch_size():
    cfg = pes_cfg()
    lopt, pool, runs = setup(cfg, 1)
    pes.PersistentES(cfg, pool, "cpu", 1).estimate(lopt, runs, 0)
    one = grads(lopt)
    lopt.zero_grad(set_to_none=True)
    pes.PersistentES(cfg, pool, "cpu", 4).estimate(lopt, runs, 0)
    four = grads(lopt)
    assert any(g.abs().sum() > 0 for g in one.values() if g is not None)
    for n, g in one.items():
        if g is not None:
            torch.testing.assert_close(four[n], g / 4, rtol=1e-5, atol=1e-9)


def test_a_pes_pair_whose_one_copy_diverges_restarts_from_the_unperturbed_state(monkeypatch):
    cfg = pes_cfg()
    lopt, pool, runs = setup(cfg, 1)
    div = lambda i, r: replace(r, diverged=True) if i == 1 else r  # noqa: E731  pair 0's + copy only
    monkeypatch.setattr(pes, "unroll", Wrapped(pes.unroll, div))
    est = pes.PersistentES(cfg, pool, "cpu", 1).estimate(lopt, runs, 0)
    result = est.results[0]
    particles = result.final["particles"]
    assert len(particles) == 3
    reset = particles[0]
    assert set(reset) == {"+", "-", "xi"}
    for key in ("+", "-"):
        assert set(reset[key]) == {"params", "grad", "buffers", "lopt_state"}
        assert reset[key]["params"] is result.final["params"] and reset[key]["grad"] is result.final["grad"]
    assert all(torch.equal(v, torch.zeros_like(v)) for v in reset["xi"].values())
    for kept in particles[1:]:       # the other pairs go on with their own state and noise
        assert kept["+"]["params"] is not result.final["params"]
        assert any(v.abs().sum() > 0 for v in kept["xi"].values())


# ------------------------------------------------------------------ make_estimator
def test_make_estimator_takes_the_global_batch_it_is_given():
    cfg = tiny()
    pool = TaskPool("mlp", "cpu")
    assert make_estimator(cfg, pool, "cpu", cfg.meta_batch + 3).global_batch == cfg.meta_batch + 3
    assert make_estimator(cfg, pool, "cpu").global_batch == cfg.meta_batch


# ------------------------------------------------------------------ outer step
class Stub:
    """An estimator that adds a fixed gradient and returns fixed results."""

    def __init__(self, grad, loss_sum, nonfinite, results):
        self.grad, self.loss_sum, self.nonfinite, self.results = grad, loss_sum, nonfinite, results

    def estimate(self, lopt, runs, outer_step):
        lopt.weight.grad = torch.tensor(self.grad)
        return Estimate(self.loss_sum, self.results, self.nonfinite)


def res(finished, diverged, steps=2, pairs=0):
    return UnrollResult(torch.tensor(0.0), steps, diverged, finished, {}, pairs)


def step(grad, clip, loss_sum=6.0, nonfinite=False, results=None, global_batch=3):
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    stub = Stub(grad, loss_sum, nonfinite, results if results is not None else [res(False, False)])
    out = outer_update(stub, net, opt, list(net.parameters()), [], D.DistInfo(), global_batch, clip, 0)
    return out, net.weight.detach()


def test_the_outer_step_reports_the_mean_meta_loss_and_its_counters():
    results = [res(True, False, 3, 1), res(True, False, 2, 0), res(True, True, 1, 2), res(False, False, 4, 0)]
    out, _ = step([[3.0, 4.0]], 0.0, loss_sum=6.0, results=results)
    assert out.meta_loss == pytest.approx(2.0)
    assert (out.inner_steps, out.diverged, out.finished, out.dropped_pairs) == (10, 1, 2, 3)


@pytest.mark.parametrize("clip, moved", [(1.0, [-0.6, -0.8]), (0.5, [-0.3, -0.4]), (0.0, [-3.0, -4.0]),
                                         (10.0, [-3.0, -4.0])])
def test_the_outer_gradient_is_clipped_to_its_norm_and_clip_0_is_off(clip, moved):
    out, w = step([[3.0, 4.0]], clip)
    assert out.grad_norm == pytest.approx(5.0) and not out.skipped
    torch.testing.assert_close(w, torch.tensor([moved]), rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_skips_the_step_even_with_finite_meta_losses():
    out, w = step([[float("inf"), 1.0]], 0.0)
    assert math.isfinite(out.meta_loss) and out.skipped
    assert torch.equal(w, torch.zeros(1, 2))


def test_a_run_reported_non_finite_skips_the_step_even_with_a_finite_total_and_gradient():
    out, w = step([[3.0, 4.0]], 1.0, nonfinite=True)
    assert math.isfinite(out.meta_loss) and math.isfinite(out.grad_norm) and out.skipped
    assert torch.equal(w, torch.zeros(1, 2))
