"""torch.optim's side of the learned optimizers (l2o/optim_base.py), pinned
where the mutation run (docs/mutation.md) found it unchecked: the forms of
``params`` torch.optim takes, the errors (torch.optim's text where torch has
one), a metanetwork's own init_state, add_param_group leaving the other
tensors' state alone, and the controller's multipliers following the model."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from lopt_helpers import seeded_weights


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _step(model, opt):
    opt.zero_grad()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    opt.step()


@pytest.mark.parametrize("form", ["named", "group of one tensor", "named groups"])
def test_every_params_form_of_torch_optim_steps_like_a_list_of_tensors(form):
    """torch.optim takes tensors, (name, tensor) pairs, or group dicts whose
    "params" is one tensor or such a list: without model=, each gives the
    MLPOptimizer the same layout and the same step as the plain list."""
    lopt = seeded_weights(l2o.MLPLOpt())
    model, twin = _model(), _model()
    ref = l2o.MLPOptimizer(list(model.parameters()), weights=copy.deepcopy(lopt))
    if form == "named":
        params = list(twin.named_parameters())
    elif form == "group of one tensor":
        params = [{"params": p} for p in twin.parameters()]
    else:
        params = [{"params": list(twin[0].named_parameters())}, {"params": list(twin[2].named_parameters())}]
    opt = l2o.MLPOptimizer(params, weights=copy.deepcopy(lopt))
    assert [tuple(s) for s in opt.graph.param_shapes] == [tuple(p.shape) for p in model.parameters()]
    _step(model, ref)
    _step(twin, opt)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", ["a tensor", "an empty list"])
def test_a_bad_params_argument_gets_torch_optims_error(bad):
    """The same error, type and text, as torch.optim's own optimizers."""
    params = torch.zeros(3) if bad == "a tensor" else []
    with pytest.raises((TypeError, ValueError)) as torch_err:
        torch.optim.SGD(params, lr=0.1)
    with pytest.raises(torch_err.type) as err:
        l2o.MLPOptimizer(params, weights=l2o.MLPLOpt())
    assert str(err.value) == str(torch_err.value)


def test_the_controllers_multipliers_follow_the_model_to_another_device(step_on_meta_device):
    """As test_optim_pinned's test_optimizer_follows_its_model_to_another_device
    (the "meta" device, no GPU needed), with the step-size controller on: its
    per-tensor multipliers move with the statistics."""
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=l2o.GMNLOpt(adapt=True))
    _step(model, opt)
    step_on_meta_device(model, opt)
    assert opt.graph.device.type == "meta"
    assert all(opt.state[p]["log_lr"].device.type == "meta" for p in model.parameters())


def test_a_model_changed_after_construction_is_refused_with_the_whole_message():
    """A layer added, or a parameter's shape changed, after the optimizer was
    built: the step refuses, naming the optimizer, what changed and what to do."""
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=l2o.MLPLOpt())
    model.append(nn.Linear(3, 3))
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == ("the model's parameters changed since MLPOptimizer was created (a layer was added or "
                              "removed, or a parameter replaced); create a new optimizer for the new model")
    model = _model()
    opt = l2o.GMNOptimizer(model, weights=l2o.GMNLOpt())
    model[0].weight.data = torch.randn(7, 6)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == ("parameter shapes changed since GMNOptimizer was created ((5, 6) -> (7, 6)); "
                              "create a new optimizer for the new model")


def test_sparse_gradients_are_refused_naming_the_optimizer_and_the_fix():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = l2o.MLPOptimizer(emb, weights=l2o.MLPLOpt())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == ("MLPOptimizer does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                              "use dense gradients")


class _WarmSecondMoment(l2o.MLPLOpt):
    """A metanetwork whose fresh statistics are not zero: v starts at p^2 + 1."""

    def init_state(self, flat_params):
        state = super().init_state(flat_params)
        state["v"] = flat_params.detach().float() ** 2 + 1.0
        return state


def test_a_metanetworks_own_init_state_sets_a_fresh_optimizers_statistics():
    """LearnedOptimizer.init_state is the metanetwork's hook for its fresh
    statistics (of the flat parameters): an optimizer built with one that
    overrides it starts from them; the built-in one starts from zeros."""
    model = _model()
    opt = l2o.MLPOptimizer(model, weights=_WarmSecondMoment())
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["v"], p.detach() ** 2 + 1.0)
        assert not opt.state[p]["m"].any()
    plain = l2o.MLPOptimizer(model, weights=l2o.MLPLOpt())
    assert all(not plain.state[p]["v"].any() for p in model.parameters())


@pytest.mark.parametrize("built_from", ["model", "tensors"])
def test_adding_a_foreign_tensor_is_refused_saying_what_can_be_added(built_from):
    """add_param_group takes only tensors of the layout: the error names the
    optimizer and, for one built from tensors, how to allow a model's others;
    the refused group is not kept."""
    model = _model()
    if built_from == "model":
        opt = l2o.MLPOptimizer(model, weights=l2o.MLPLOpt())
        hint = "the model it was built from"
    else:
        opt = l2o.MLPOptimizer(list(model[0].parameters()), weights=l2o.MLPLOpt())
        hint = "the tensors it was built with (pass model= to add a model's parameters later)"
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 3))]})
    assert str(err.value) == (f"MLPOptimizer can only optimize parameters of {hint}: its graph is built once; "
                              "got a tensor of shape (2, 3) that is not one of them")
    assert len(opt.param_groups) == 1


def test_adding_a_group_leaves_the_other_tensors_state_alone():
    """add_param_group gives the added tensors fresh state and changes no
    other tensor's statistics, counter or multiplier."""
    model = _model()
    opt = l2o.GMNOptimizer(list(model[2].parameters()), model=model, weights=l2o.GMNLOpt(adapt=True))
    for _ in range(3):
        _step(model, opt)
    before = {p: {name: t.clone() for name, t in opt.state[p].items()} for p in model[2].parameters()}
    assert all(st["v"].any() and st["log_lr"] != 0 for st in before.values())
    opt.add_param_group({"params": list(model[0].parameters())})
    for p, st in before.items():
        for name, t in st.items():
            assert torch.equal(opt.state[p][name], t), name
    for p in model[0].parameters():
        assert float(opt.state[p]["step"]) == 0.0 and not opt.state[p]["v"].any()
        assert float(opt.state[p]["log_lr"]) == 0.0        # multiplier exp(0) = 1, as a fresh optimizer's


def test_a_tensor_lr_of_several_elements_is_refused_as_torch_optim_does():
    with pytest.raises(ValueError) as torch_err:
        torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError) as err:
        l2o.MLPOptimizer([nn.Parameter(torch.zeros(2))], weights=l2o.MLPLOpt(), lr=torch.tensor([0.1, 0.2]))
    assert str(err.value) == str(torch_err.value) == "Tensor lr must be 1-element"


@pytest.mark.parametrize("kw,message", [
    ({"lr": -0.5}, "invalid learning-rate multiplier: -0.5"),
    ({"weight_decay": -0.1}, "invalid weight_decay value: -0.1"),
    ({"betas": (0.9, 1.0)}, "invalid betas: (0.9, 1.0) (two values in [0, 1); recorded only, see l2o.optim's docstring)"),
])
def test_invalid_hyperparameters_are_refused_with_their_value(kw, message):
    with pytest.raises(ValueError) as err:
        l2o.MLPOptimizer([nn.Parameter(torch.zeros(2))], weights=l2o.MLPLOpt(), **kw)
    assert str(err.value) == message


def test_boundary_hyperparameters_are_accepted():
    """lr = 0 (a frozen group), weight_decay = 0 and betas at 0 are valid."""
    w = nn.Parameter(torch.zeros(2))
    opt = l2o.MLPOptimizer([w], weights=l2o.MLPLOpt(), lr=0.0, weight_decay=0.0, betas=(0.0, 0.0))
    assert opt.param_groups[0]["betas"] == (0.0, 0.0)
