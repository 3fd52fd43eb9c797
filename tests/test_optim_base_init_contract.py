"""The constructor of the learned optimizers' torch.optim base
(``LearnedOptimizerBase.__init__`` in l2o/optim_base.py), pinned where the
mutation run (docs/mutation.md) left it unchecked: the recorded defaults
(torch.optim's group keys), the errors for parameters it cannot step, the
metanetwork it steps with (float32, eval mode, frozen), the fresh state and
the model it remembers."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from l2o.layout import tensor_layout
from l2o.optim_base import LearnedOptimizerBase


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _step(model, opt, seed=1):
    opt.zero_grad()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    opt.step()


def _lopt(**kw):
    torch.manual_seed(3)
    lopt = l2o.MLPLOpt(**kw)
    with torch.no_grad():      # weights away from the identity-like init, so steps differ visibly
        for p in lopt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lopt


def test_the_defaults_are_recorded_in_every_group_as_torch_optim_does():
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=_lopt())
    assert opt.defaults == {"lr": 1.0, "weight_decay": 0.0, "betas": (0.9, 0.999), "differentiable": False}
    (group,) = opt.param_groups
    assert set(group) == {"params", "lr", "weight_decay", "betas", "differentiable"}
    assert group["params"] == list(model.parameters())
    opt = l2o.MLPOptimizer(model, weights=_lopt(), lr=0.5, weight_decay=0.01, betas=[0.8, 0.95])
    assert opt.defaults == {"lr": 0.5, "weight_decay": 0.01, "betas": (0.8, 0.95), "differentiable": False}
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    saved = opt.state_dict()["param_groups"][0]
    assert saved["differentiable"] is False and saved["lr"] == 0.5


def test_the_groups_defaults_fill_what_a_group_leaves_out():
    model = _model()
    groups = [{"params": list(model[0].parameters()), "lr": 0.25}, {"params": list(model[2].parameters())}]
    opt = l2o.MLPOptimizer(groups, weights=_lopt(), lr=0.5, weight_decay=0.1, model=model)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["params"] for g in opt.param_groups] == [list(model[0].parameters()), list(model[2].parameters())]


def test_a_copy_keeps_the_defaults_and_steps_as_the_original():
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=_lopt(), lr=0.5)
    _step(model, opt)
    twin_model, twin = copy.deepcopy((model, opt))
    again = pickle.loads(pickle.dumps(opt))
    for o in (twin, again):
        assert o.defaults == opt.defaults and o.param_groups[0]["differentiable"] is False
    _step(model, opt, seed=2)
    _step(twin_model, twin, seed=2)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_invalid_hyperparameters_are_refused_at_construction():
    model = _model()
    with pytest.raises(ValueError, match=r"^invalid learning-rate multiplier: -1.0$"):
        l2o.MLPOptimizer(model, weights=_lopt(), lr=-1.0)
    with pytest.raises(ValueError, match=r"^invalid weight_decay value: -0.1$"):
        l2o.MLPOptimizer(model, weights=_lopt(), weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"^invalid betas: \(0.9, 1.0\)"):
        l2o.MLPOptimizer(model, weights=_lopt(), betas=(0.9, 1.0))


def test_parameters_that_the_layout_does_not_cover_are_refused():
    params = list(_model().parameters())
    layout = tensor_layout([p.shape for p in params])
    with pytest.raises(ValueError) as err:
        LearnedOptimizerBase(params[:3], layout, _lopt())
    assert str(err.value) == "layout covers 4 tensors, got 3 parameters"


def test_parameters_on_several_devices_are_refused_naming_them():
    a, b, c = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, device="meta")), nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError) as err:
        l2o.MLPOptimizer([a, b, c], weights=_lopt())
    assert str(err.value) == ("MLPOptimizer needs all parameters on one device, got ['cpu', 'meta'] "
                              "(model-parallel / device_map='auto' models are not supported)")


def test_complex_parameters_are_refused_naming_the_optimizer():
    a, z = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError) as err:
        l2o.MLPOptimizer([a, z], weights=_lopt())
    assert str(err.value) == "MLPOptimizer does not support complex parameters"


def test_the_metanetwork_is_used_in_float32_eval_mode_and_never_trained():
    lopt = _lopt().double().train()
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=lopt)
    assert all(p.dtype == torch.float32 for p in opt.lopt.parameters())
    assert not opt.lopt.training
    assert not any(p.requires_grad for p in opt.lopt.parameters())
    ref_model = _model()
    ref = l2o.MLPOptimizer(ref_model, weights=_lopt())
    _step(model, opt)
    _step(ref_model, ref)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_fresh_optimizer_has_zero_statistics_and_step_counters_for_every_tensor():
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=_lopt())
    for p in model.parameters():
        s = opt.state[p]
        assert s["step"].dtype == torch.float32 and s["step"].device.type == "cpu" and float(s["step"]) == 0.0
        assert s["v"].shape == p.shape and torch.count_nonzero(s["v"]) == 0 and s["v"].dtype == torch.float32
        assert s["m"].shape[1:] == p.shape and torch.count_nonzero(s["m"]) == 0
        assert "log_lr" not in s
    _step(model, opt)
    assert all(float(opt.state[p]["step"]) == 1.0 for p in model.parameters())


def test_a_controller_optimizer_starts_every_multiplier_at_one():
    lopt = _lopt(adapt=True)
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=lopt)
    for p in model.parameters():
        assert opt.state[p]["log_lr"].dtype == torch.float32 and float(opt.state[p]["log_lr"]) == 0.0
    assert opt.state_dict()["state"][0]["log_lr"].shape == ()


def test_tensors_step_in_the_layouts_flat_order_whatever_the_models_order():
    """A GMN's layout puts edge-held tensors first: each tensor's state must
    still be its own (the state of a tensor is found by identity)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    opt = l2o.GMNOptimizer(model, weights=l2o.GMNLOpt(), example_inputs=(torch.randn(2, 4),))
    assert opt.graph.flat_order != list(range(len(opt.graph.flat_order)))
    for p in model.parameters():
        assert opt.state[p]["v"].shape == p.shape
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    frozen = model[1].weight
    frozen.requires_grad_(False)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (p is frozen)


def test_the_base_class_alone_has_the_user_classes_defaults():
    """``LearnedOptimizerBase(params, graph, lopt)`` (how a subclass or a
    caller with its own layout builds one) defaults as the user classes do:
    lr 1, no weight decay, Adam's betas, the backend "auto" picks."""
    model, twin = _model(), _model()
    params = list(model.parameters())
    opt = LearnedOptimizerBase(params, tensor_layout([p.shape for p in params]), _lopt())
    ref = l2o.MLPOptimizer(list(twin.parameters()), weights=_lopt())
    assert opt.defaults == ref.defaults == {"lr": 1.0, "weight_decay": 0.0, "betas": (0.9, 0.999),
                                            "differentiable": False}
    assert opt.impl == ref.impl == "auto" and opt.backend.name == ref.backend.name
    _step(model, opt)
    _step(twin, ref)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("adapt", [False, True])
def test_an_optimizer_built_on_another_device_keeps_its_metanetwork_and_state_there(adapt):
    """The "meta" device stands in for a GPU: the metanetwork, the statistics and
    the controller's multipliers go to the parameters' device; the step
    counters stay on the CPU, as torch.optim's non-capturable "step"."""
    model = _model().to("meta")
    opt = l2o.MLPOptimizer(model, weights=_lopt(adapt=adapt))
    assert {p.device.type for p in opt.lopt.parameters()} == {"meta"}
    assert opt.graph.device.type == "meta"
    for p in model.parameters():
        s = opt.state[p]
        assert s["step"].device.type == "cpu"
        assert s["m"].device.type == s["v"].device.type == "meta"
        assert ("log_lr" in s) == adapt and (not adapt or s["log_lr"].device.type == "meta")
