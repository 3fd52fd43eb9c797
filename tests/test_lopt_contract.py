"""The metanetwork contract of l2o/lopt.py, pinned where the mutation run
(docs/mutation.md) found it unchecked: the constructor's defaults (weight
files saved without a key rebuild with them), its argument checks, which
weights train, the exact keys of ``config()`` (compared by
``load_state_dict``), the relative scale against a plain reference and the
step-size controller's bounds."""
import math

import pytest
import torch
from torch import nn

from l2o.graph import build_graph
from l2o.lopt import LearnedOptimizer

BASE = {"out_scale": 1e-3, "nominal": True, "nominal_lr": 1e-3, "max_log_step": 3.0}


def test_defaults_are_the_ones_files_without_the_keys_rebuild_with():
    """config() leaves out the options of unused features (and the controller's
    leak / momentum at their defaults), so a file or optimizer state saved
    before an option existed rebuilds with its default: changing a default
    silently changes those."""
    assert LearnedOptimizer().config() == BASE
    assert LearnedOptimizer(relative=True).config() == {**BASE, "relative": True, "scale_floor": 1e-2}
    assert LearnedOptimizer(adapt=True).config() == {
        **BASE, "adapt": True, "adapt_rate": 0.1, "adapt_bound": 3.0, "adapt_learned": False}


def test_options_of_a_disabled_controller_are_not_recorded():
    assert LearnedOptimizer(adapt_beta=0.999, adapt_decay=0.5).config() == BASE
    assert LearnedOptimizer(adapt=True, adapt_beta=0.999).config()["adapt_beta"] == 0.999


def test_a_state_dict_saved_before_the_controller_options_existed_still_loads():
    """optim_state.load_state_dict compares the saved config with config():
    an extra default key would refuse every older state dict."""
    import l2o
    model = nn.Linear(3, 2)
    opt = l2o.GMNOptimizer(model, weights=l2o.GMNLOpt(adapt=True), impl="forward")
    sd = opt.state_dict()
    sd["lopt"]["config"] = {k: v for k, v in sd["lopt"]["config"].items() if k not in ("adapt_decay", "adapt_beta")}
    l2o.GMNOptimizer(model, weights=l2o.GMNLOpt(adapt=True), impl="forward").load_state_dict(sd)


@pytest.mark.parametrize("rate, bound", [(0.0, 3.0), (-0.1, 3.0), (0.1, 0.0), (0.1, -1.0)])
def test_controller_rate_and_bound_must_be_positive(rate, bound):
    with pytest.raises(ValueError, match="adapt_rate and adapt_bound must be > 0"):
        LearnedOptimizer(adapt=True, adapt_rate=rate, adapt_bound=bound)


def test_small_positive_controller_rate_and_bound_are_accepted():
    lopt = LearnedOptimizer(adapt=True, adapt_rate=0.01, adapt_bound=0.5)
    assert (lopt.adapt_rate, lopt.adapt_bound) == (0.01, 0.5)
    assert float(lopt.log_adapt_rate.exp()) == pytest.approx(0.01)


def test_only_the_learned_scalars_train():
    """The controller's rate trains only with ``adapt_learned``; the nominal
    weight only with a nominal term (meta-training optimizes the parameters
    that require grad)."""
    fixed = LearnedOptimizer(adapt=True)
    assert not fixed.log_adapt_rate.requires_grad and fixed.log_nominal.requires_grad
    learned = LearnedOptimizer(adapt=True, adapt_learned=True)
    assert learned.log_adapt_rate.requires_grad and learned.config()["adapt_learned"] is True
    no_nominal = LearnedOptimizer(nominal=False)
    assert not no_nominal.log_nominal.requires_grad and no_nominal.nominal_weight() == 0.0
    assert [n for n, p in no_nominal.named_parameters() if p.requires_grad] == []


def _reference_scale(params, floor, log_lr=None):
    out = []
    for k, p in enumerate(params):
        s = math.sqrt(float((p * p).mean()) + floor ** 2) if p.numel() else 0.0
        if log_lr is not None:
            s *= math.exp(float(log_lr[k]))
        out.append(torch.full((p.numel(),), s))
    return torch.cat(out)


def test_relative_scale_is_each_tensors_rms_with_the_floor():
    """Includes a one-entry tensor (its RMS is its magnitude) and a trailing
    zero-size one (no entries: it must not shift the others)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning):   # torch: "Initializing zero-element tensors is a no-op"
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1), nn.Linear(1, 0))
    graph = build_graph(model)
    params = [p.detach() for p in model.parameters()]
    assert 1 in graph.numels and graph.numels[-1] == 0
    flat = graph.gather(params)
    ordered = [params[i] for i in graph.flat_order]
    lopt = LearnedOptimizer(relative=True, scale_floor=0.05)
    torch.testing.assert_close(lopt.update_scale(graph, flat, None), _reference_scale(ordered, 0.05))
    log_lr = torch.linspace(-1.0, 1.0, graph.num_tensors)
    torch.testing.assert_close(lopt.update_scale(graph, flat, log_lr), _reference_scale(ordered, 0.05, log_lr))


def test_controller_multiplier_stays_within_its_bound():
    """ell <- clip(ell + rate cos, +-bound): at the bound, agreeing evidence
    keeps it there, and a tensor without gradient keeps its value."""
    lopt = LearnedOptimizer(adapt=True, adapt_rate=0.5, adapt_bound=1.0).requires_grad_(False)
    sums = torch.tensor([[4.0, -4.0, 0.0, 2.0],    # <g, m>: cos +1, -1, 0 (no gradient), +1
                         [4.0, 4.0, 0.0, 1.0],     # <g, g>
                         [4.0, 4.0, 4.0, 4.0]])    # <m, m>
    state = {"log_lr": torch.tensor([1.0, -1.0, 0.2, -0.25])}
    torch.testing.assert_close(lopt.advance_log_lr(state, sums), torch.tensor([1.0, -1.0, 0.2, 0.25]))
    torch.testing.assert_close(lopt.advance_log_lr({}, sums * 9), torch.tensor([0.5, -0.5, 0.0, 0.5]))
