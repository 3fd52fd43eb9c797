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


def _scrambled(lopt, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lopt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return lopt


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("huge", ["first", "last"])
def test_a_non_finite_update_of_one_entry_is_reported_wherever_it_is(impl, huge):
    """A relative update of a tensor whose RMS overflows is inf: with one such
    single-entry tensor first or last, every other update finite, the step
    still warns, drops that entry and applies the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1))   # single-entry tensors
    huge_param = model[0].weight if huge == "first" else model[2].bias
    with torch.no_grad():
        huge_param.fill_(1e30)
    opt = l2o.MLPOptimizer(model, weights=l2o.MLPLOpt(relative=True), impl=impl)
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
        return a, b, l2o.MLPOptimizer([a, b], weights=_scrambled(l2o.MLPLOpt()), impl=impl)
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
