"""The optimizer's documented behaviour (l2o/optim_step.py's docstring, l2o.optim's
semantics), pinned where the mutation run (docs/mutation.md) found it unchecked:
the warnings' text and where they point, non-finite updates dropped on each step
path, the overflow check in float32, the clock, lr = 0 groups, weight decay,
and that copies of an optimizer carry no step workspace."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from lopt_helpers import seeded_weights


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _backward(model):
    F.cross_entropy(model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1))),
                    torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()


def test_skip_warning_names_the_optimizer_and_every_skipped_tensor(step_path):
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=None)
    _backward(model)
    model[0].weight.grad[0, 0] = float("nan")
    model[2].weight.grad[1, 1] = float("inf")
    with pytest.warns(RuntimeWarning) as record:
        opt.step()
    assert [str(w.message) for w in record] == [
        "GMNOptimizer: non-finite gradient (or one whose square overflows float32) in 0.weight, 2.weight; "
        "skipped the update of these tensors this step"]


def _exploding_optimizer(model):
    lopt = l2o.GMNLOpt()
    with torch.no_grad():
        lopt.log_nominal.fill_(100.0)  # exp(100) overflows float32: every update is inf or NaN
    return l2o.GMNOptimizer(model, weights=lopt)


def test_non_finite_update_warning_names_the_optimizer(step_path):
    model = _model()
    opt = _exploding_optimizer(model)
    _backward(model)
    with pytest.warns(RuntimeWarning) as record:
        opt.step()
    assert [str(w.message) for w in record] == [
        "GMNOptimizer: the learned optimizer produced non-finite updates; those entries were not changed"]


def test_warnings_point_at_the_callers_step_for_non_finite_updates(step_path):
    """Like test_optim_conformance's test for skipped gradients. (Deselected in
    mutation runs: mutmut's trampolines add stack frames.)"""
    model = _model()
    opt = _exploding_optimizer(model)
    _backward(model)
    with pytest.warns(RuntimeWarning, match="non-finite updates") as record:
        opt.step()
    assert record[0].filename == __file__


def test_copies_carry_no_step_workspace():
    """The flat step keeps persistent workspaces on the optimizer; a deepcopy
    (or pickle) leaves them out: the copy has the attributes of an optimizer
    that never stepped."""
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=None, impl="forward")
    never_stepped = set(opt.__dict__)
    _backward(model)
    opt.step()
    assert set(opt.__dict__) != never_stepped            # the workspace exists ...
    assert set(copy.deepcopy(opt).__dict__) == never_stepped   # ... and is not copied


def test_a_one_entry_gradient_whose_square_overflows_is_skipped_on_the_forward_path():
    """As the chunked path does (tests/test_optim.py's overflow test): the
    quick check sums squares, where a norm of one entry would never square it."""
    w = nn.Parameter(torch.tensor([1.0]))
    opt = l2o.MLPOptimizer([w], weights=None, impl="forward")
    w.grad = torch.tensor([3e19])      # finite; its square, 9e38, overflows float32
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert float(opt.state[w]["step"]) == 0.0 and float(opt.state[w]["v"]) == 0.0


IMPLS = ["forward", "chunked", "fused"]   # the flat step, the chunked one with torch ops, with the C kernels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_updates_leave_their_entries_unchanged(impl, poison):
    model = _model()
    lopt = l2o.GMNLOpt()
    with torch.no_grad():
        if poison == "nan":
            lopt.entry_head.weight.fill_(float("nan"))   # direction and log-step NaN, of every entry
            lopt.edge_head.weight.fill_(float("nan"))
        else:
            lopt.log_nominal.fill_(100.0)                 # nominal weight exp(100) = inf
    opt = l2o.GMNOptimizer(model, weights=lopt, impl=impl)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    with pytest.warns(RuntimeWarning, match="non-finite updates"):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mlp", "gmn"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("huge", ["first", "last"])
def test_a_non_finite_update_of_one_entry_is_reported_wherever_it_is(impl, huge, kind):
    """A relative update of a tensor whose RMS overflows is inf: with one such
    single-entry tensor first or last, every other update finite, the step
    still warns, drops that entry and applies the rest (also where the fused
    read-out applies the update itself, the inf scale folded into its lr)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1))   # single-entry tensors
    huge_param = model[0].weight if huge == "first" else model[2].bias
    with torch.no_grad():
        huge_param.fill_(1e30)
    if kind == "mlp":
        opt = l2o.MLPOptimizer(model, weights=l2o.MLPLOpt(relative=True), impl=impl)
    else:
        opt = l2o.GMNOptimizer(model, weights=l2o.GMNLOpt(relative=True), impl=impl)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(RuntimeWarning, match="non-finite updates"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) if p is huge_param else not torch.equal(p, b)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_a_half_precision_gradient_whose_float32_square_fits_is_stepped(impl):
    """The overflow check is on the float32 square: a float16 gradient of
    6e4 entries (its float16 norm overflows, its float32 square does not) is
    a gradient like any other."""
    w = nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = l2o.MLPOptimizer([w], weights=None, impl=impl)
    w.grad = torch.full((4,), 6e4, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert float(opt.state[w]["step"]) == 1.0 and bool((w < 1).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_the_clock_is_the_largest_counter_among_the_tensors_stepped(impl):
    """l2o.optim: the metanetwork's clock is the largest counter among the
    tensors stepped, not among all: a tensor first stepped after another
    took five steps gets the update it would get at the very first step (the
    graph-free MLP: no message passing between the tensors)."""
    def pair():
        torch.manual_seed(0)
        a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
        return a, b, l2o.MLPOptimizer([a, b], weights=seeded_weights(l2o.MLPLOpt()), impl=impl)
    a, b, opt = pair()
    for _ in range(5):
        a.grad, b.grad = torch.randn(3), None
        opt.step()
    b.grad = torch.tensor([0.5, -2.0])
    a.grad = None
    opt.step()
    a2, b2, fresh = pair()
    b2.grad = torch.tensor([0.5, -2.0])
    fresh.step()
    assert torch.equal(b, b2)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_frozen_group_does_not_stop_the_groups_after_it(impl):
    model = _model()
    opt = l2o.GMNOptimizer([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}],
                           model=model, weights=None, impl=impl)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    opt.step()
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert changed == [False, False, True, True]


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_decay_of_one_is_decoupled_like_any_other(impl):
    """p <- p (1 - lr wd) + lr u, here with wd = 1 and lr = 0.5: u from a
    twin stepped without decay."""
    model, twin, lopt = _model(), _model(), l2o.GMNLOpt()
    opt = l2o.GMNOptimizer(model, weights=lopt, impl=impl, lr=0.5, weight_decay=1.0)
    opt_twin = l2o.GMNOptimizer(twin, weights=lopt, impl=impl, lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    _backward(twin)
    opt.step()
    opt_twin.step()
    for p, t, p0 in zip(model.parameters(), twin.parameters(), before):
        torch.testing.assert_close(p, p0 * 0.5 + (t - p0), rtol=0, atol=1e-6)


# --- the rest of l2o/optim_step.py's mutants (docs/mutation.md): every step path, not only the one
# "auto" picks for a small model

def _zero_heads_mlp():
    """A fresh MLP metanetwork with zero output layer: its update is exactly the nominal Adam term."""
    lopt = l2o.MLPLOpt()
    with torch.no_grad():
        lopt.out.weight.zero_()
        lopt.out.bias.zero_()
    return lopt


@pytest.mark.parametrize("impl", IMPLS)
def test_a_finite_update_whose_sum_overflows_is_applied_without_warning(impl):
    """"Non-finite updates" means non-finite entries: sixteen updates of -6e37
    (nominal weight exp(87), same-sign gradients) are finite though their sum
    overflows float32; they are applied, with no warning."""
    w = nn.Parameter(torch.zeros(16))
    lopt = _zero_heads_mlp()
    with torch.no_grad():
        lopt.log_nominal.fill_(87.0)
    opt = l2o.MLPOptimizer([w], weights=lopt, impl=impl)
    w.grad = torch.ones(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert bool(torch.isfinite(w).all()) and bool((w < -1e37).all())
    assert not bool(torch.isfinite(w.detach().sum()))


@pytest.mark.parametrize("impl", IMPLS)
def test_each_groups_lr_and_weight_decay_apply_on_every_path(impl):
    """p <- p (1 - lr wd) + lr u on each path (a fused kernel, torch ops, the
    flat step): with u from a twin at lr = 1 and no decay, a group at
    lr = 0.25, wd = 0.1 and one at lr = 0.5, wd = 0 move by exactly that."""
    lopt = seeded_weights(l2o.GMNLOpt())
    model, twin = _model(), _model()
    opt = l2o.GMNOptimizer([{"params": model[0].parameters(), "lr": 0.25, "weight_decay": 0.1},
                            {"params": model[2].parameters(), "lr": 0.5}], model=model, weights=lopt, impl=impl)
    opt_twin = l2o.GMNOptimizer(twin, weights=lopt, impl=impl)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    _backward(twin)
    opt.step()
    opt_twin.step()
    for k, (p, t, p0) in enumerate(zip(model.parameters(), twin.parameters(), before)):
        lr, wd = (0.25, 0.1) if k < 2 else (0.5, 0.0)
        assert not torch.equal(t, p0)
        torch.testing.assert_close(p, p0 * (1 - lr * wd) + lr * (t - p0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_tensor_first_stepped_beside_older_ones_takes_a_first_adam_step(impl):
    """Per-tensor counters (l2o.optim): stepped together with a tensor at its
    fourth step, a tensor at its first takes Adam's first step, lr sign(g) per
    entry (the nominal term alone), not one bias-corrected as a fourth."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = l2o.MLPOptimizer([a, b], weights=_zero_heads_mlp(), impl=impl)
    for _ in range(3):
        a.grad, b.grad = torch.randn(3), None
        opt.step()
    a.grad, b.grad = torch.randn(3), torch.tensor([0.5, -2.0, 1.0, -0.1])
    before = b.detach().clone()
    opt.step()
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [4.0, 1.0]
    torch.testing.assert_close(b - before, -1e-3 * b.grad.sign(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_parameters_step_like_contiguous_ones_on_every_path(impl):
    """A transposed (non-contiguous) parameter is updated in place, with the
    same values as a contiguous copy of it (the chunked step updates a copy
    and writes it back)."""
    lopt = seeded_weights(l2o.MLPLOpt())
    torch.manual_seed(0)
    base, g = torch.randn(5, 4), torch.randn(4, 5)
    start = base.t().clone()
    w = nn.Parameter(base.t())                       # non-contiguous: a view of base
    c = nn.Parameter(start.clone())
    assert not w.is_contiguous()
    opt_w = l2o.MLPOptimizer([w], weights=lopt, impl=impl)
    opt_c = l2o.MLPOptimizer([c], weights=lopt, impl=impl)
    for _ in range(2):
        w.grad, c.grad = g.clone(), g.clone()
        opt_w.step()
        opt_c.step()
    assert not torch.equal(c, start)
    assert torch.equal(w, c) and torch.equal(base.t(), w)   # in place: base sees it


@pytest.mark.parametrize("impl", IMPLS)
def test_the_controllers_multiplier_accumulates_from_step_to_step(impl):
    """The step-size controller's log multiplier is state: each step adds
    rate * cos(g, m) to the last one. A constant gradient (cos = 1 once there
    is momentum, 0 at the first step) with rate 0.1 gives 0, 0.1, 0.2, 0.3."""
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    opt = l2o.MLPOptimizer([a, b], weights=l2o.MLPLOpt(adapt=True, adapt_rate=0.1), impl=impl)
    for expected in (0.0, 0.1, 0.2, 0.3):
        a.grad, b.grad = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -1.0, 2.0])
        opt.step()
        assert [float(opt.state[p]["log_lr"]) for p in (a, b)] == pytest.approx([expected] * 2, abs=1e-5)


def _stale_tensor_run(impl, stale_count=None):
    """The GMN steps all four tensors three times, then the other three twice
    more (0.weight's gradient None); the state is saved, 0.weight's counter
    optionally overwritten, loaded into a fresh optimizer on a copy, and that
    takes one more step without 0.weight: the other tensors' displacements."""
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=seeded_weights(l2o.GMNLOpt()), impl=impl)
    for i in range(5):
        opt.zero_grad()
        _backward(model)
        if i >= 3:
            model[0].weight.grad = None
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert [float(s["step"]) for s in sd["state"].values()] == [3.0, 5.0, 5.0, 5.0]
    if stale_count is not None:
        sd["state"][0]["step"] = torch.tensor(stale_count)
    twin = copy.deepcopy(model)
    opt2 = l2o.GMNOptimizer(twin, weights=l2o.GMNLOpt(), impl=impl)
    opt2.load_state_dict(sd)
    before = [p.detach().clone() for p in twin.parameters()]
    opt2.zero_grad()
    _backward(twin)
    twin[0].weight.grad = None
    opt2.step()
    return [p.detach() - b for p, b in zip(twin.parameters(), before)]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_skipped_tensors_statistics_reach_the_others_bias_corrected_by_its_own_count(impl):
    """l2o.optim: a tensor's own count sets its Adam bias correction. A skipped
    tensor (gradient None) is not updated, but the GMN's message passing still
    reads its statistics: bias-corrected by its own count (3), not the clock (5),
    even when the tensors stepped all agree on the clock. (Before the fix, its
    count was used only when the stepped tensors' counters differed.)"""
    own = _stale_tensor_run(impl)
    as_clock = _stale_tensor_run(impl, stale_count=5.0)
    assert torch.count_nonzero(own[0]) == 0 and torch.count_nonzero(as_clock[0]) == 0
    assert not torch.equal(torch.cat([d.flatten() for d in own[1:]]), torch.cat([d.flatten() for d in as_clock[1:]]))
    if impl != "forward":   # both step paths read it the same way
        for a, b in zip(own, _stale_tensor_run("forward")):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gmn", "mlp"])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_fused_read_out_that_applies_its_update_moves_the_parameters_as_the_sink_would(kind, relative, monkeypatch):
    """The fused read-out (the GMN's last pass, the per-parameter MLP's
    kernel) writes each run's update into the parameters itself
    (``UpdateApplier.direct``): the same parameters as handing the update to
    the sink, with per-group lr and weight decay, the step-size controller's
    multiplier and (relative) each tensor's scale folded into its lr, to
    float rounding (two steps: later ones amplify it through the metanetwork)."""
    from l2o.optim_step import UpdateApplier
    lopt = l2o.GMNLOpt if kind == "gmn" else l2o.MLPLOpt
    weights = seeded_weights(lopt(relative=relative, adapt=True), 0)
    optimizer = l2o.GMNOptimizer if kind == "gmn" else l2o.MLPOptimizer

    def run(direct: bool) -> list[torch.Tensor]:
        model = _model()
        opt = optimizer([{"params": model[0].parameters(), "lr": 0.05, "weight_decay": 0.1},
                         {"params": model[2].parameters(), "lr": 0.2}], model=model,
                        weights=copy.deepcopy(weights), impl="fused")
        if opt.backend.kernels is None:
            pytest.skip("fused kernels unavailable")
        taken = []
        original = UpdateApplier.direct

        def spy(self, k, s, e):
            target = original(self, k, s, e) if direct else None
            taken.append(target is not None)
            return target
        monkeypatch.setattr(UpdateApplier, "direct", spy)
        for _ in range(2):   # the second with the controller's multiplier off 1
            opt.zero_grad()
            _backward(model)
            opt.step()
        assert taken and all(taken) == direct
        return [p.detach().clone() for p in model.parameters()]
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
