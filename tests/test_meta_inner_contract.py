"""One inner training run (``l2o/meta/inner.py``): a fresh run's state, which batches
an unroll draws, the carried state against a hand-unrolled reference, divergence
handling, counters, and the run's checkpoint form. End-to-end carrying across outer
steps and resumes is in ``tests/test_meta_pinned.py``.

Most tests use a fake task whose loss is a plain function of the parameters
(``sum(p^2)``) and a scripted optimizer, so the loss along an unroll is known
exactly; the hand-unrolled reference uses a real task and the MLP metanetwork."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2o.checkpoint import make_lopt  # noqa: E402
from l2o.layout import tensor_layout  # noqa: E402
from l2o.meta import inner  # noqa: E402
from l2o.meta.config import MetaConfig  # noqa: E402
from l2o.meta.inner import (InnerRun, advance, batch_stream, loss_and_grad, new_run, start_run,  # noqa: E402
                            state_from_tensors, state_tensors, unroll, unroll_batch)
from l2o.meta.tasks_pool import TaskEntry, TaskPool, draw_spec  # noqa: E402

SPEC = "task:regression_teacher"


def stream_seed(init_seed: int, step: int, split: str = "train") -> int:
    """The seed of the batch stream of a run's unroll starting at ``step`` (pinned:
    a checkpoint resumes exactly only if its runs draw the batches they drew before)."""
    salt = 0 if split == "train" else 0x7E57
    return (((init_seed ^ 0x5EED) ^ salt) * 1_000_003 + step) % (2**63)


# ------------------------------------------------------------------ a fake task
class FakeTask:
    """Batches are ``(split, seed, i)``: the i-th batch of the stream of that seed."""

    def __init__(self):
        self.streams = []

    def batches(self, split="train", seed=0, device="cpu"):
        self.streams.append((split, seed))

        def gen():
            i = 0
            while True:
                yield (split, seed, i)
                i += 1
        return gen()


def fake_entry(n: int = 2):
    """Loss ``sum(p^2)`` whatever the batch; each call counts itself into the buffer
    ``calls`` (in place, as BatchNorm updates its running statistics) and is recorded."""
    task = FakeTask()
    seen = []

    def loss_fn(params, buffers, batch):
        seen.append(batch)
        buffers["calls"].add_(1.0)
        return (params["w"] ** 2).sum()

    graph = tensor_layout([torch.Size([n])], ["w"])
    return TaskEntry(task, torch.nn.Module(), graph, loss_fn), seen


def fake_run(params, step=0, length=10, init_seed=7):
    params = torch.as_tensor(params, dtype=torch.float32)
    loss = float((params ** 2).sum())
    return InnerRun(slot=1, index=2, spec="fake", init_seed=init_seed, length=length, step=step,
                    init_loss=loss, last_loss=loss, params=params, grad=2 * params,
                    buffers={"calls": torch.zeros(())}, lopt_state={"step": torch.zeros(())})


class Scripted:
    """An optimizer that moves the parameters *to* the given points, one per step,
    and counts its steps in its state."""

    def __init__(self, *points):
        self.points = [torch.as_tensor(p, dtype=torch.float32) for p in points]

    def __call__(self, graph, flat, grad, state):
        target = self.points[int(state["step"])]
        return target - flat, {"step": state["step"] + 1}


def cfg(**kw):
    return MetaConfig(**kw)


# ------------------------------------------------------------------ a fresh run
def test_a_fresh_run_starts_at_the_tasks_init_with_the_gradient_of_its_first_batch():
    pool = TaskPool("mlp", "cpu")
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    run = new_run(pool, SPEC, 5, lopt, slot=2, index=3, length=7)
    assert (run.slot, run.index, run.spec, run.init_seed, run.length, run.step) == (2, 3, SPEC, 5, 7, 0)
    assert run.particles == []
    entry = pool.get(SPEC)
    model = entry.task.init(5)
    torch.testing.assert_close(run.params, entry.graph.gather([p.detach() for p in model.parameters()]),
                               rtol=0, atol=0)
    expected_state = lopt.init_state(run.params)
    assert run.lopt_state.keys() == expected_state.keys()
    for k in expected_state:
        assert torch.equal(run.lopt_state[k], expected_state[k]), k
    batch = next(entry.task.batches("train", seed=stream_seed(5, 0)))
    loss = entry.task.loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(run.grad, entry.graph.gather(list(grads)), rtol=1e-5, atol=1e-7)
    assert run.init_loss == run.last_loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert not run.params.requires_grad and not run.grad.requires_grad


def test_a_fresh_run_carries_the_models_buffers_after_its_first_forward():
    pool = TaskPool("mlp", "cpu")
    lopt = make_lopt("mlp")
    run = new_run(pool, "task:cnn_digits_bn", 4, lopt, slot=0, index=0, length=5)
    task = pool.get(run.spec).task
    model = task.init(4)
    before = {k: b.clone() for k, b in model.named_buffers()}
    model(next(task.batches("train", seed=stream_seed(4, 0)))[0])   # the first gradient's forward, train mode
    buffers = dict(model.named_buffers())
    assert run.buffers.keys() == buffers.keys() and buffers
    for k, b in buffers.items():
        assert torch.allclose(run.buffers[k], b, rtol=1e-5, atol=1e-7), k
    # the model's own buffers are not the run's
    assert not torch.equal(before["1.running_mean"], buffers["1.running_mean"])


def test_a_started_run_trains_the_task_drawn_for_its_slot_and_index():
    pool = TaskPool("mlp", "cpu")
    lopt = make_lopt("mlp")
    specs = [SPEC, "task:mlp_digits"]
    for slot, index in ((0, 0), (1, 0), (0, 1), (1, 3)):
        spec, init_seed = draw_spec(specs, 11, slot, index)
        run = start_run(pool, specs, lopt, 11, slot, index, 9)
        assert (run.spec, run.init_seed, run.slot, run.index, run.length) == (spec, init_seed, slot, index, 9)
        ref = new_run(pool, spec, init_seed, lopt, slot, index, 9)
        assert torch.equal(run.params, ref.params) and torch.equal(run.grad, ref.grad)


# ------------------------------------------------------------------ batches
def test_batch_streams_are_seeded_by_the_runs_data_seed_and_step():
    entry, _ = fake_entry()
    run = fake_run([1.0, 1.0], step=4, init_seed=9)
    assert run.data_seed == 9 ^ 0x5EED
    assert next(batch_stream(entry, run, "cpu")) == ("train", stream_seed(9, 4), 0)
    assert next(batch_stream(entry, run, "cpu", split="test")) == ("test", stream_seed(9, 4, "test"), 0)
    # another step, another seed: another stream
    assert next(batch_stream(entry, fake_run([1.0, 1.0], step=5, init_seed=9), "cpu"))[1] != stream_seed(9, 4)


def test_an_unroll_reads_the_batches_after_the_one_of_the_carried_gradient():
    entry, seen = fake_entry()
    run = fake_run([1.0, 1.0], step=3, init_seed=2)
    unroll(Scripted([0.9, 0.9], [0.8, 0.8], [0.7, 0.7]), run, entry, 3, cfg(), "cpu", meta=False)
    seed = stream_seed(2, 3)
    assert seen == [("train", seed, 1), ("train", seed, 2), ("train", seed, 3)]


def test_held_out_meta_loss_reads_a_separate_test_stream_and_its_statistics_are_thrown_away():
    entry, seen = fake_entry()
    run = fake_run([1.0, 1.0], step=3, init_seed=2)
    result = unroll(Scripted([0.5, 0.5], [0.25, 0.25]), run, entry, 2, cfg(meta_data="valid"), "cpu", meta=False)
    train, test = stream_seed(2, 3), stream_seed(2, 3, "test")
    assert seen == [("train", train, 1), ("test", test, 0), ("train", train, 2), ("test", test, 1)]
    # the buffers the run carries saw the training batches only; the run's own are untouched
    assert float(result.final["buffers"]["calls"]) == 2.0
    assert float(run.buffers["calls"]) == 0.0


# ------------------------------------------------------------------ the unroll
def test_an_unroll_measures_each_new_point_and_carries_the_last_one():
    entry, _ = fake_entry()
    run = fake_run([1.0, 1.0])                          # loss 2
    points = ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5])      # losses 1, 1, 0.5
    result = unroll(Scripted(*points), run, entry, 3, cfg(), "cpu", meta=False)
    assert result.steps == 3 and not result.diverged and not result.finished
    assert float(result.meta_loss) == pytest.approx((1 / 2 + 1 / 2 + 0.5 / 2) / 3)
    assert torch.equal(result.final["params"], torch.tensor([0.5, 0.5]))
    assert torch.equal(result.final["grad"], torch.tensor([1.0, 1.0]))      # d sum(p^2) = 2p
    assert float(result.final["lopt_state"]["step"]) == 3.0
    assert result.final["last_loss"] == 0.5 and result.final["steps"] == 3
    assert float(result.final["buffers"]["calls"]) == 3.0
    # the run itself is not modified
    assert torch.equal(run.params, torch.tensor([1.0, 1.0])) and float(run.buffers["calls"]) == 0.0


@pytest.mark.parametrize("objective, floor", [("norm", 0.0), ("log", 0.0), ("log", 0.5), ("raw", 0.0)])
def test_the_meta_loss_is_the_mean_of_the_chosen_objective_over_the_steps(objective, floor):
    entry, _ = fake_entry()
    run = fake_run([0.5, 0.5])                           # initial loss 0.5 (below 1: norm divides by it)
    result = unroll(Scripted([0.5, 0.0], [0.25, 0.0]), run, entry, 2,
                    cfg(meta_objective=objective, meta_log_floor=floor), "cpu", meta=False)
    term = {"norm": lambda L: L / 0.5, "log": lambda L: math.log(L + floor * 0.5), "raw": lambda L: L}[objective]
    assert float(result.meta_loss) == pytest.approx((term(0.25) + term(0.0625)) / 2, rel=1e-6)


def test_an_unroll_stops_at_the_end_of_the_run():
    entry, _ = fake_entry()
    run = fake_run([1.0, 1.0], step=8, length=10)
    result = unroll(Scripted([0.0, 1.0], [0.0, 0.5], [0.0, 0.25]), run, entry, 3, cfg(), "cpu", meta=False)
    assert result.steps == 2 and result.finished and not result.diverged
    assert torch.equal(result.final["params"], torch.tensor([0.0, 0.5]))
    nxt = advance(run, result)
    assert nxt.step == 10
    # one step short of the end is not finished
    result = unroll(Scripted([0.0, 1.0]), fake_run([1.0, 1.0], step=8, length=10), entry, 1, cfg(), "cpu",
                    meta=False)
    assert result.steps == 1 and not result.finished


def test_an_unroll_of_a_run_at_its_end_takes_no_step():
    entry, seen = fake_entry()
    run = fake_run([1.0, 1.0], step=10, length=10)
    run.last_loss = 0.75
    result = unroll(Scripted(), run, entry, 3, cfg(), "cpu", meta=False)
    assert result.steps == 0 and result.finished and not result.diverged
    assert float(result.meta_loss) == 0.0 and seen == []
    assert result.final["last_loss"] == 0.75
    assert torch.equal(result.final["params"], run.params)


def test_advance_carries_the_state_and_counters_and_keeps_the_runs_identity():
    entry, _ = fake_entry()
    run = fake_run([1.0, 1.0], step=2, length=10, init_seed=3)
    run.particles = ["kept"]
    result = unroll(Scripted([1.0, 0.0], [0.5, 0.0]), run, entry, 2, cfg(), "cpu", meta=False)
    nxt = advance(run, result)
    assert (nxt.slot, nxt.index, nxt.spec, nxt.init_seed, nxt.length) == (1, 2, "fake", 3, 10)
    assert nxt.step == 4 and nxt.init_loss == 2.0 and nxt.last_loss == 0.25
    assert torch.equal(nxt.params, torch.tensor([0.5, 0.0])) and torch.equal(nxt.grad, torch.tensor([1.0, 0.0]))
    assert float(nxt.lopt_state["step"]) == 2.0 and float(nxt.buffers["calls"]) == 2.0
    assert nxt.particles == ["kept"]
    result.final["particles"] = ["new"]
    assert advance(run, result).particles == ["new"]


# ------------------------------------------------------------------ divergence
def test_a_finite_loss_above_the_limit_ends_the_unroll_and_its_term_is_kept():
    entry, _ = fake_entry()
    run = fake_run([2.0, 0.0])                                  # initial loss 4, limit 16
    result = unroll(Scripted([3.0, 0.0], [5.0, 0.0], [0.0, 0.0]), run, entry, 3, cfg(diverge_factor=4.0),
                    "cpu", meta=False)                          # losses 9, 25, 0
    assert result.diverged and result.steps == 2
    assert float(result.meta_loss) == pytest.approx((9.0 / 4 + 25.0 / 4) / 2)
    assert result.final["last_loss"] == 25.0
    assert not result.finished


def test_a_loss_exactly_at_the_limit_is_not_divergence():
    entry, _ = fake_entry()
    run = fake_run([2.0, 0.0])                                  # initial loss 4, limit 16
    result = unroll(Scripted([4.0, 0.0], [1.0, 0.0]), run, entry, 2, cfg(diverge_factor=4.0), "cpu", meta=False)
    assert not result.diverged and result.steps == 2
    assert float(result.meta_loss) == pytest.approx((16.0 / 4 + 1.0 / 4) / 2)


def test_a_non_finite_loss_ends_the_unroll_and_its_term_is_dropped():
    entry, _ = fake_entry()
    run = fake_run([1.0, 0.0])
    result = unroll(Scripted([0.5, 0.0], [float("inf"), 0.0], [0.0, 0.0]), run, entry, 3, cfg(), "cpu", meta=False)
    assert result.diverged and result.steps == 2
    assert float(result.meta_loss) == pytest.approx(0.25)
    assert math.isinf(result.final["last_loss"])
    # non-finite at the first step: no term at all, a zero meta-loss
    result = unroll(Scripted([float("nan"), 0.0], [0.0, 0.0], [0.0, 0.0]), run, entry, 3, cfg(), "cpu", meta=False)
    assert result.diverged and result.steps == 1 and float(result.meta_loss) == 0.0


# ------------------------------------------------------------------ meta-gradient
def _mlp_run(init_seed):
    """A fresh MLP metanetwork (seed 0) and a 50-step run of SPEC in slot 0, with its task entry."""
    pool = TaskPool("mlp", "cpu")
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    return lopt, new_run(pool, SPEC, init_seed, lopt, 0, 0, 50), pool.get(SPEC)


def test_the_meta_loss_is_differentiable_only_in_meta_mode():
    lopt, run, entry = _mlp_run(init_seed=3)
    result = unroll(lopt, run, entry, 2, cfg(), "cpu", meta=True)
    assert result.meta_loss.requires_grad
    assert not any(t.requires_grad for t in (result.final["params"], result.final["grad"],
                                              *result.final["lopt_state"].values()))
    result.meta_loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lopt.parameters())
    assert not unroll(lopt, run, entry, 2, cfg(), "cpu", meta=False).meta_loss.requires_grad


def test_loss_and_grad_detaches_the_gradient_unless_second_order():
    entry, _ = fake_entry()
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    flat = w * 1.0
    buffers = {"calls": torch.zeros(())}
    loss, grad = loss_and_grad(entry, flat, buffers, None, meta=True)
    assert loss.requires_grad and not grad.requires_grad and torch.equal(grad, torch.tensor([2.0, 4.0]))
    loss, grad = loss_and_grad(entry, flat, buffers, None, meta=True, second_order=True)
    assert grad.requires_grad
    (g2,) = torch.autograd.grad(grad.sum(), w)
    assert torch.equal(g2, torch.tensor([2.0, 2.0]))
    loss, grad = loss_and_grad(entry, flat, buffers, None, meta=False)
    assert not loss.requires_grad and not grad.requires_grad and float(loss) == 5.0


def test_perturbed_weights_are_used_instead_of_the_metanetworks_own():
    lopt, run, entry = _mlp_run(init_seed=3)
    override = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in lopt.named_parameters()}
    other = make_lopt("mlp")
    other.load_state_dict({**lopt.state_dict(), **override})
    with torch.no_grad():
        got = unroll(lopt, run, entry, 3, cfg(), "cpu", meta=False, params_override=override)
        want = unroll(other, run, entry, 3, cfg(), "cpu", meta=False)
        own = unroll(lopt, run, entry, 3, cfg(), "cpu", meta=False)
    torch.testing.assert_close(got.final["params"], want.final["params"], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(got.final["params"], own.final["params"])


# ------------------------------------------------------------------ hand-unrolled reference
def test_an_unroll_of_the_metanetwork_equals_the_steps_written_out_by_hand():
    lopt, run, entry = _mlp_run(init_seed=6)
    first = unroll(lopt, run, entry, 2, cfg(), "cpu", meta=False)
    run2 = advance(run, first)
    result = unroll(lopt, run2, entry, 3, cfg(), "cpu", meta=False)
    model = entry.task.init(6)
    names = [n for n, _ in model.named_parameters()]
    flat, grad, state = run2.params, run2.grad, run2.lopt_state
    batches = entry.task.batches("train", seed=stream_seed(6, 2))
    next(batches)
    terms = []
    with torch.no_grad():
        for _ in range(3):
            update, state = lopt(entry.graph, flat, grad, state)
            flat = flat + update
            with torch.enable_grad():
                leaf = flat.clone().requires_grad_(True)
                params = dict(zip(names, entry.graph.scatter(leaf)))
                loss = entry.task.loss(torch.func.functional_call(model, params, (batch := next(batches))[0]), batch)
                (grad,) = torch.autograd.grad(loss, leaf)
            terms.append(float(loss) / run.init_loss)
    torch.testing.assert_close(result.final["params"], flat, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.final["grad"], grad, rtol=1e-5, atol=1e-8)
    for k in state:
        torch.testing.assert_close(result.final["lopt_state"][k], state[k], rtol=1e-6, atol=1e-9)
    assert float(result.meta_loss) == pytest.approx(sum(terms) / 3, rel=1e-5)
    assert result.final["last_loss"] == pytest.approx(terms[-1] * run.init_loss, rel=1e-5)
    assert run2.step == 2 and run2.init_loss == run.init_loss


# ------------------------------------------------------------------ checkpoint form
def particle(value):
    return {"params": torch.full((2,), value), "grad": torch.full((2,), -value),
            "buffers": {"bn.mean": torch.full((1,), value)}, "lopt_state": {"m": torch.full((2, 2), value)}}


def test_a_run_round_trips_through_its_tensors_and_scalars():
    run = fake_run([1.0, 2.0], step=3, length=10, init_seed=5)
    run.buffers = {"bn.mean": torch.tensor([0.5])}
    run.lopt_state = {"m": torch.ones(2, 2), "step": torch.tensor(3.0)}
    run.particles = [{"+": particle(1.0), "-": particle(2.0), "xi": {"a.b": torch.ones(3)}},
                     {"+": particle(3.0), "-": particle(4.0), "xi": {"a.b": torch.zeros(3)}}]
    tensors = run.tensors()
    assert set(tensors) == {"params", "grad", "buffer.bn.mean", "lopt_state.m", "lopt_state.step",
                            *(f"pes.{j}.{s}.{k}" for j in (0, 1) for s in "+-"
                              for k in ("params", "grad", "buffer.bn.mean", "lopt_state.m")),
                            "pes.0.xi.a.b", "pes.1.xi.a.b"}
    assert run.scalars() == {"slot": 1, "index": 2, "spec": "fake", "init_seed": 5, "length": 10, "step": 3,
                             "init_loss": 5.0, "last_loss": 5.0}
    back = InnerRun.restore(run.scalars(), tensors, "cpu")
    assert back.scalars() == run.scalars()
    assert torch.equal(back.params, run.params) and torch.equal(back.grad, run.grad)
    assert back.buffers.keys() == {"bn.mean"} and back.lopt_state.keys() == {"m", "step"}
    assert len(back.particles) == 2
    for got, want in zip(back.particles, run.particles):
        for sign in "+-":
            assert got[sign].keys() == want[sign].keys()
            assert torch.equal(got[sign]["params"], want[sign]["params"])
            assert torch.equal(got[sign]["grad"], want[sign]["grad"])
            assert torch.equal(got[sign]["buffers"]["bn.mean"], want[sign]["buffers"]["bn.mean"])
            assert torch.equal(got[sign]["lopt_state"]["m"], want[sign]["lopt_state"]["m"])
        assert got["xi"].keys() == {"a.b"} and torch.equal(got["xi"]["a.b"], want["xi"]["a.b"])


def test_checkpoint_tensors_are_detached_contiguous_copies():
    w = torch.ones(2, 3, requires_grad=True)
    run = fake_run([1.0, 1.0])
    run.params = (w * 2).t()[0]             # a non-contiguous view in the graph
    run.lopt_state = {"m": (w * 3).t()}
    tensors = run.tensors()
    assert not any(t.requires_grad for t in tensors.values())
    assert all(t.is_contiguous() for t in tensors.values())


def test_state_tensors_name_buffers_and_optimizer_state_apart():
    st = {"params": torch.zeros(1), "grad": torch.ones(1), "buffers": {"x": torch.full((1,), 2.0)},
          "lopt_state": {"x": torch.full((1,), 3.0)}}
    flat = state_tensors(st)
    assert set(flat) == {"params", "grad", "buffer.x", "lopt_state.x"}
    back = state_from_tensors(flat, "cpu")
    assert float(back["buffers"]["x"]) == 2.0 and float(back["lopt_state"]["x"]) == 3.0
    assert float(back["params"]) == 0.0 and float(back["grad"]) == 1.0


def test_with_state_keeps_the_runs_task_and_counters():
    run = fake_run([1.0, 2.0], step=4, length=9, init_seed=8)
    run.last_loss = 0.5
    st = particle(7.0)
    other = run.with_state(st)
    assert other.scalars() == run.scalars()
    assert other.params is st["params"] and other.grad is st["grad"]
    assert other.buffers is st["buffers"] and other.lopt_state is st["lopt_state"]
    assert run.with_state(run.state()).state() == run.state()


# ------------------------------------------------------------------ batched runs
def test_batched_unroll_of_a_fresh_controller_run_starts_its_multipliers_at_zero():
    pool = TaskPool("mlp", "cpu")
    torch.manual_seed(0)
    lopt = make_lopt("mlp", adapt=True)
    runs = [new_run(pool, SPEC, 3 + i, lopt, i, 0, 50) for i in range(2)]
    for r in runs:
        r.lopt_state.pop("log_lr", None)
    with torch.no_grad():
        batched = unroll_batch(lopt, runs, pool, 2, cfg(), "cpu", meta=False)
        single = [unroll(lopt, r, pool.get(r.spec), 2, cfg(), "cpu", meta=False) for r in runs]
    for a, b in zip(batched, single):
        torch.testing.assert_close(a.final["params"], b.final["params"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.final["lopt_state"]["log_lr"], b.final["lopt_state"]["log_lr"])


def test_a_batched_meta_unroll_is_differentiable_and_an_empty_batch_gives_no_result():
    pool = TaskPool("mlp", "cpu")
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    runs = [new_run(pool, SPEC, 3, lopt, 0, 0, 50)]
    (result,) = unroll_batch(lopt, runs, pool, 2, cfg(), "cpu", meta=True)
    assert result.meta_loss.requires_grad and result.steps == 2
    assert unroll_batch(lopt, [], pool, 2, cfg(), "cpu", meta=True) == []


# ------------------------------------------------------------------ outer schedule
def test_the_outer_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    from l2o.meta.schedule import outer_lr

    lr, frac = 2.0, 0.1
    assert outer_lr(0, lr, 4, 14, frac) == pytest.approx(0.5)          # (step + 1) / warmup
    assert outer_lr(3, lr, 4, 14, frac) == pytest.approx(2.0)
    assert outer_lr(4, lr, 4, 14, frac) == pytest.approx(2.0)          # the cosine starts at lr
    assert outer_lr(9, lr, 4, 14, frac) == pytest.approx(lr * (frac + (1 - frac) * 0.5))   # half way
    assert outer_lr(6, lr, 4, 14, frac) == pytest.approx(lr * (frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * 0.2))))
    assert outer_lr(14, lr, 4, 14, frac) == pytest.approx(lr * frac)
    assert outer_lr(40, lr, 4, 14, frac) == pytest.approx(lr * frac)   # held at the floor after the end
    assert outer_lr(0, lr, 0, 10, frac) == pytest.approx(lr)           # no warmup
    assert outer_lr(0, lr, 1, 10, frac) == pytest.approx(lr)           # a warmup of one step
    assert outer_lr(5, lr, 0, 10, frac) == pytest.approx(lr * (frac + (1 - frac) * 0.5))
    assert outer_lr(4, lr, 4, 4, frac) == pytest.approx(lr)            # no decay phase: lr, then the floor
    assert outer_lr(5, lr, 4, 4, frac) == pytest.approx(lr * frac)


# ------------------------------------------------------------------ antithetic pieces
def test_antithetic_noise_is_a_pure_function_of_the_counters():
    from l2o.meta import antithetic as A

    weights = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    got = A.noise(weights, 1, 2, 3, 4, "cpu")
    gen = torch.Generator().manual_seed(1 * 1_000_003 + 2 * 10_007 + 3 * 101 + 4)
    assert torch.equal(got["a"], torch.randn((2, 3), generator=gen))
    assert torch.equal(got["b"], torch.randn((4,), generator=gen))
    torch.manual_seed(123)                                      # the global RNG plays no part
    assert all(torch.equal(A.noise(weights, 1, 2, 3, 4, "cpu")[n], got[n]) for n in got)
    # the counters' combination wraps modulo 2**63 (a negative seed is a valid config seed)
    gen = torch.Generator().manual_seed((-5 * 1_000_003 + 2 * 10_007 + 3 * 101 + 4) % (2**63))
    assert torch.equal(A.noise(weights, -5, 2, 3, 4, "cpu")["a"], torch.randn((2, 3), generator=gen))


def test_antithetic_perturbation_setup_and_finish():
    from l2o.meta import antithetic as A

    net = torch.nn.Linear(2, 1)
    net.bias.requires_grad_(False)
    weights, grads = A.setup(net)
    assert list(weights) == ["weight"] and weights["weight"] is net.weight
    assert torch.equal(grads["weight"], torch.zeros(1, 2))
    eps = {"weight": torch.tensor([[1.0, -2.0]])}
    moved = A.perturbed({"weight": torch.tensor([[1.0, 1.0]])}, eps, -1.0, 0.5)
    assert torch.equal(moved["weight"], torch.tensor([[0.5, 2.0]]))
    total, nonfinite = A.finish(weights, {"weight": torch.tensor([[1.0, 2.0]])}, [1.0, 2.5])
    assert total == 3.5 and not nonfinite and torch.equal(net.weight.grad, torch.tensor([[1.0, 2.0]]))
    total, nonfinite = A.finish(weights, {"weight": torch.tensor([[1.0, 1.0]])}, [1.0, float("nan")])
    assert nonfinite and torch.equal(net.weight.grad, torch.tensor([[2.0, 3.0]]))    # accumulated
    assert A.finish(weights, {"weight": torch.zeros(1, 2)}, [float("inf")])[1]


def test_a_runs_meta_loss_value_is_nan_only_at_the_steps_a_test_forces():
    from l2o.meta import faults
    from l2o.meta.estimator import meta_loss_value
    from l2o.meta.inner import UnrollResult

    result = UnrollResult(torch.tensor(0.25, requires_grad=True) * 2, 1, False, False, {})
    assert meta_loss_value(result, 3) == 0.5
    with faults.nan_meta_loss(steps=[3]):
        assert math.isnan(meta_loss_value(result, 3)) and meta_loss_value(result, 2) == 0.5
