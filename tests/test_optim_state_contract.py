"""The state dict's documented behaviour (l2o/optim_state.py, l2o.optim), pinned
where the mutation run (docs/mutation.md) found it unchecked: the load hooks'
arguments, state dicts without the metanetwork record or without state, and
the error for a state dict saved with another metanetwork."""
import copy
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(model, opt, steps=2):
    for i in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
        opt.step()


def _stepped(lopt=None):
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=lopt if lopt is not None else l2o.GMNLOpt())
    _train(model, opt)
    return model, opt


def test_load_state_dict_hooks_receive_the_optimizer():
    """torch.optim's contract: pre hooks are called as hook(optimizer, state_dict), post hooks as hook(optimizer)."""
    model, opt = _stepped()
    opt2 = l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt())
    seen = []
    opt2.register_load_state_dict_pre_hook(lambda o, sd: seen.append(o))
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(o))
    opt2.load_state_dict(opt.state_dict())
    assert len(seen) == 2 and all(o is opt2 for o in seen)


def test_a_state_dict_without_the_metanetwork_record_loads_the_statistics_only():
    """A state dict without "lopt" (torch.optim's keys only, e.g. written by
    code that saves those) loads: statistics and counters restored, the
    optimizer's own metanetwork kept."""
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["lopt"]
    twin = copy.deepcopy(model)
    mine = l2o.GMNLOpt()
    with torch.no_grad():
        mine.edge_head.weight.add_(1.0)           # unlike the saved weights
    opt2 = l2o.GMNOptimizer(twin, weights=mine)
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), twin.parameters()):
        for name in ("step", "m", "v"):
            assert torch.equal(opt.state[p][name], opt2.state[q][name])
    kept = opt2.lopt.state_dict()
    for name, value in mine.state_dict().items():
        assert torch.equal(kept[name], value)
    assert not torch.equal(kept["edge_head.weight"], opt.lopt.state_dict()["edge_head.weight"])


def test_a_state_dict_without_state_is_refused_with_a_clear_error():
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"]
    with pytest.raises(ValueError, match="lacks learned-optimizer state for 4 tensors"):
        l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt()).load_state_dict(sd)


@pytest.mark.parametrize("other", ["kind", "config"])
def test_a_state_dict_of_another_metanetwork_is_refused_naming_both(other):
    """Saved with a GMN of one config, loaded into an MLP optimizer (another
    kind) or a GMN of another config: a ValueError naming both, and the
    optimizer is left as it was."""
    model, opt = _stepped()
    sd = opt.state_dict()
    twin = copy.deepcopy(model)
    if other == "kind":
        opt2 = l2o.MLPOptimizer(twin, weights=l2o.MLPLOpt())
    else:
        opt2 = l2o.GMNOptimizer(twin, weights=l2o.GMNLOpt(adapt=True))
    before = copy.deepcopy(opt2.state_dict())
    expected = (f"state_dict was saved with a gmn metanetwork of config {sd['lopt']['config']}, "
                f"this optimizer has {opt2.lopt.kind} {opt2.lopt.config()}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        opt2.load_state_dict(sd)
    after = opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][k][name], value)


@pytest.fixture
def float64_default():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("impl", ["forward", "chunked"])
def test_a_state_dict_loads_into_float32_statistics_under_a_float64_default_dtype(impl, float64_default):
    """The statistics and the controller's multipliers are float32 whatever
    the default dtype (as a fresh optimizer's are): loading a state dict under
    set_default_dtype(float64), with a tensor in no group (fresh statistics)
    and the controller on, gives float32 state and continues like the original.
    (Before the fix the fresh parts and log_lr followed the default dtype:
    float64 statistics, and the next step failed on a dtype mismatch.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def make(m):
        return l2o.GMNOptimizer([m[2].weight, m[2].bias], model=m, weights=l2o.GMNLOpt(adapt=True), impl=impl)

    opt = make(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    twin = copy.deepcopy(model)
    opt2 = make(twin)
    opt2.load_state_dict(opt.state_dict())
    for p in (twin[2].weight, twin[2].bias):
        assert {name: t.dtype for name, t in opt2.state[p].items()} == dict.fromkeys(("step", "m", "v", "log_lr"),
                                                                                    torch.float32)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("damage,count", [("entry", 1), ("two entries", 2), ("v", 1), ("m", 1)])
def test_a_state_dict_lacking_some_tensors_statistics_is_refused_counting_them(damage, count):
    """Grouped tensors without saved m and v (entries deleted, or one of the
    two missing) are refused with a ValueError that counts them all, not
    loaded as fresh or failing on a missing key."""
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    if damage == "entry":
        del sd["state"][1]
    elif damage == "two entries":
        del sd["state"][0], sd["state"][3]
    else:
        del sd["state"][2][damage]
    with pytest.raises(ValueError, match=f"lacks learned-optimizer state for {count} tensors"):
        l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt()).load_state_dict(sd)


def test_a_tensor_in_no_group_gets_fresh_statistics_on_load():
    """A tensor of the layout in no group has no saved state: after loading it
    has none in opt.state, and once added with add_param_group it starts at
    step 0 with zero statistics, while the loaded tensors keep theirs."""
    torch.manual_seed(0)
    model = _model()
    opt = l2o.GMNOptimizer([model[2].weight, model[2].bias], model=model, weights=l2o.GMNLOpt())
    _train(model, opt)
    twin = copy.deepcopy(model)
    opt2 = l2o.GMNOptimizer([twin[2].weight, twin[2].bias], model=twin, weights=l2o.GMNLOpt())
    opt2.load_state_dict(opt.state_dict())
    assert twin[0].weight not in opt2.state
    for p, q in ((model[2].weight, twin[2].weight), (model[2].bias, twin[2].bias)):
        for name in ("step", "m", "v"):
            assert torch.equal(opt.state[p][name], opt2.state[q][name])
    opt2.add_param_group({"params": list(twin[0].parameters())})
    for q in twin[0].parameters():
        st = opt2.state[q]
        assert float(st["step"]) == 0.0 and not st["m"].any() and not st["v"].any()
    assert st["m"].shape == (opt2._flat_state["m"].shape[0], *q.shape)


def test_wrongly_shaped_momenta_are_refused_with_the_likely_causes():
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["m"] = sd["state"][0]["m"].movedim(0, -1)   # the old [*shape, num_momenta] layout
    with pytest.raises(ValueError) as err:
        l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt()).load_state_dict(sd)
    assert str(err.value).endswith(
        "(a state_dict of another model, or from l2o before momenta were stored feature-major)")


def test_statistics_saved_in_another_dtype_load_as_float32():
    """A state dict whose m and v were converted to float64 (e.g. by a tool
    casting a whole checkpoint) loads into float32 statistics and continues
    exactly like the original (float32 -> float64 -> float32 is exact)."""
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["m"], entry["v"] = entry["m"].double(), entry["v"].double()
    twin = copy.deepcopy(model)
    opt2 = l2o.GMNOptimizer(twin, weights=l2o.GMNLOpt())
    opt2.load_state_dict(sd)
    assert all(st[name].dtype == torch.float32 for st in opt2.state.values() for name in ("m", "v"))
    _train(model, opt, 1)
    _train(twin, opt2, 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_entries_without_a_step_counter_load_at_step_zero():
    """A state dict whose per-tensor entries carry no "step" (and no group
    counter of the older single-counter format) loads with every counter at 0."""
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        del entry["step"]
    opt2 = l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt())
    opt2.load_state_dict(sd)
    assert [float(st["step"]) for st in opt2.state.values()] == [0.0] * 4


def test_a_controller_optimizer_loading_statistics_without_multipliers_starts_them_neutral():
    """Statistics saved without the step-size controller (no "log_lr"; the
    metanetwork record dropped, as its config differs) load into an optimizer
    with the controller at multiplier exp(0) = 1, as a fresh one starts."""
    model, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["lopt"]
    opt2 = l2o.GMNOptimizer(copy.deepcopy(model), weights=l2o.GMNLOpt(adapt=True))
    opt2.load_state_dict(sd)
    assert [float(st["log_lr"]) for st in opt2.state.values()] == [0.0] * 4
    assert [float(st["step"]) for st in opt2.state.values()] == [2.0] * 4


@pytest.mark.parametrize("returns", ["none", "new dict"])
def test_state_dict_post_hooks_receive_the_optimizer_and_may_replace_the_dict(returns):
    """torch.optim's contract: a state-dict post hook is called as
    hook(optimizer, state_dict); returning None keeps the (possibly edited)
    dict, returning a dict replaces it."""
    model, opt = _stepped()
    seen = []

    def hook(o, sd):
        seen.append(o)
        if returns == "none":
            sd["edited"] = True
            return None
        return {"replaced": True}

    opt.register_state_dict_post_hook(hook)
    sd = opt.state_dict()
    assert seen == [opt]
    if returns == "none":
        assert sd["edited"] is True and set(sd["state"]) == {0, 1, 2, 3}
    else:
        assert sd == {"replaced": True}
