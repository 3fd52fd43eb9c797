"""The torch.optim contract, after PyTorch's generic optimizer tests
(``TestOptimRenewed`` in pytorch/test/test_optim.py), for both learned
optimizers, plus parameter groups, weight decay and per-tensor step counters.

Exemptions from TestOptimRenewed, each for a stated reason:

* zero gradients are *not* a no-op (``test_step_is_noop_for_zero_grads``):
  the metanetwork reads the parameters, the momenta of earlier steps and the
  time, so a tensor with a zero gradient is stepped (its counter advances,
  its momenta decay, it may move). ``test_zero_gradient_is_a_step`` pins this.
  ``grad=None`` *is* a no-op, as in torch.
* foreach / fused / capturable / differentiable / maximize flags: these
  options do not exist. The step has two implementations, picked by model
  size and device, not by a flag: the reference (flat) step and the chunked
  step (torch ops, or the fused C kernels where they build). Every test here
  runs on each of the three (the ``every_step_path`` fixture).
* CUDA-only tests (CUDA graphs, state_dict with CUDA params, peak memory):
  the suite runs on CPU; on a GPU the optimizers take the reference step,
  which is tested here on CPU.
* complex parameters: rejected with a TypeError (the features are real).
* parameters on several devices (``test_mixed_device_dtype``'s devices; its
  dtypes are ``test_mixed_dtypes`` here): rejected with a ValueError, the
  flat statistics and the graph live on one device.
* sparse gradients: rejected with a RuntimeError (tested in test_optim.py).
"""
import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import l2o
from l2o.fast import native
from l2o.gmn import GMNLOpt
from l2o.mlp_lopt import MLPLOpt


def randomised(kind, seed=0, scale=0.3):
    """A metanetwork whose learned part matters (the fresh init keeps it near zero)."""
    torch.manual_seed(seed)
    lopt = GMNLOpt() if kind == "gmn" else MLPLOpt()
    with torch.no_grad():
        for head in ((lopt.edge_head, lopt.entry_head) if kind == "gmn" else (lopt.out,)):
            head.weight.normal_(0.0, scale)
            head.bias.normal_(0.0, scale)
    return lopt


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def make_opt(kind, params, model=None, lopt=None, **kw):
    weights = copy.deepcopy(lopt) if lopt is not None else randomised(kind)
    cls = l2o.GMNOptimizer if kind == "gmn" else l2o.MLPOptimizer
    if model is None:
        return cls(params, weights=weights, **kw)
    return cls(params, weights=weights, model=model, **kw)


BATCHES = [(torch.randn(8, 6, generator=torch.Generator().manual_seed(i)),
            torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(100 + i))) for i in range(6)]


def train(model, opt, batches=BATCHES, sched=None):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(model_a, model_b):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


KINDS = ["gmn", "mlp"]


@pytest.fixture(autouse=True, params=["reference", "chunked-torch", "chunked-native"])
def every_step_path(request, use_step_path, monkeypatch):
    """Every test runs on each no-grad step: the reference (flat) step, which
    these small models take by default and GPUs take always, and the chunked
    step that CPU models above ~8k parameters take, with torch ops and with the
    fused C kernels. Each applies lr / weight_decay / counters on its own."""
    path = request.param
    if path != "reference":
        monkeypatch.setenv("L2O_NATIVE", "1" if path == "chunked-native" else "0")
        if path == "chunked-native" and native.load(8, 8, 16) is None:
            pytest.skip(native.status())
    use_step_path("reference" if path == "reference" else "chunked")
    return path


# ------------------------------------------------------------ construction
@pytest.mark.parametrize("kind", KINDS)
def test_short_form_equals_the_param_list_form(kind):
    """Opt(model) == Opt(model.parameters(), model=model) == Opt(named_parameters(), model=model)."""
    runs = []
    for form in ("module", "params", "named"):
        model = make_model()
        params = {"module": model, "params": model.parameters(), "named": model.named_parameters()}[form]
        opt = make_opt(kind, params, model=None if form == "module" else model)
        train(model, opt)
        runs.append(model)
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])


def test_gmn_needs_the_model_and_mlp_a_non_empty_list():
    model = make_model()
    with pytest.raises(TypeError, match="needs the model"):
        l2o.GMNOptimizer(model.parameters(), weights=None)
    with pytest.raises(ValueError, match="two different models"):
        l2o.GMNOptimizer(model, weights=None, model=make_model())
    with pytest.raises(ValueError, match="empty parameter list"):
        l2o.MLPOptimizer([], weights=None)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        l2o.MLPOptimizer(model[0].weight, weights=None)
    with pytest.raises(ValueError, match="only optimize parameters of the model"):
        l2o.GMNOptimizer([nn.Parameter(torch.zeros(3))], weights=None, model=model)
    # MLPOptimizer(params) without model=: its layout is the tensors given, nothing can be added later
    opt = l2o.MLPOptimizer(model[0].parameters(), weights=None)
    with pytest.raises(ValueError, match="pass model= to add"):
        opt.add_param_group({"params": [model[2].weight]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(weight_decay=-0.1), dict(betas=(1.0, 0.999)),
                                 dict(lr=torch.tensor([0.1, 0.2]))])
def test_invalid_hyperparameters_are_rejected(kind, bad):
    model = make_model()
    with pytest.raises(ValueError):
        make_opt(kind, model.parameters(), model=model, **bad)
    opt = make_opt(kind, [model[0].weight], model=model)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model[2].weight], **bad})
    assert len(opt.param_groups) == 1


def test_complex_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        l2o.MLPOptimizer([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], weights=None)


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_can_be_printed(kind):
    model = make_model()
    opt = make_opt(kind, [{"params": [model[0].weight]}, {"params": [model[0].bias], "lr": 0.5}], model=model)
    text = repr(opt)
    assert text.startswith(type(opt).__name__)
    assert "Parameter Group 1" in text and "lr: 0.5" in text and "weight_decay: 0.0" in text


# ------------------------------------------------------- groups, lr and wd
@pytest.mark.parametrize("kind", KINDS)
def test_update_scales_with_each_groups_lr(kind):
    """Same gradients, same state: a group's displacement is its lr times the
    lr=1 displacement; a group with lr=0 does not move (bit for bit)."""
    deltas = {}
    for lrs in ((1.0, 1.0), (0.25, 0.0)):
        model = make_model()
        start = snapshot(model)
        first = list(model[0].parameters())
        rest = [p for m in (model[2], model[4]) for p in m.parameters()]
        opt = make_opt(kind, [{"params": first, "lr": lrs[0]}, {"params": rest, "lr": lrs[1]}], model=model)
        train(model, opt, BATCHES[:1])
        deltas[lrs] = [p.detach() - s for p, s in zip(model.parameters(), start)]
    full, scaled = deltas[(1.0, 1.0)], deltas[(0.25, 0.0)]
    for a, b in zip(full[:2], scaled[:2]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, 0.25 * a)
    for z in scaled[2:]:
        assert torch.count_nonzero(z) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_decoupled_weight_decay(kind):
    """p <- p - lr*wd*p + lr*u(p_before): the decay is the difference to the
    run without it, exactly lr*wd*p; it also shrinks weights whose gradient is zero."""
    results = {}
    for wd in (0.0, 0.1):
        model = make_model()
        start = snapshot(model)
        decay = [model[0].weight, model[2].weight]
        no_decay = [p for n, p in model.named_parameters() if p is not decay[0] and p is not decay[1]]
        opt = make_opt(kind, [{"params": decay, "weight_decay": wd}, {"params": no_decay}], model=model, lr=0.5)
        train(model, opt, BATCHES[:1])
        results[wd] = snapshot(model)
    for k, (a, b, s) in enumerate(zip(results[0.0], results[0.1], start)):
        expected = a - 0.5 * 0.1 * s if k in (0, 2) else a
        torch.testing.assert_close(b, expected, rtol=0, atol=1e-7)

    # zero gradient, lr=1: weight decay shrinks the weights (learned part off: nominal only, a=0 at step 1)
    model = make_model()
    w0 = model[0].weight.detach().clone()
    opt = make_opt(kind, [model[0].weight], model=model, lopt=GMNLOpt() if kind == "gmn" else MLPLOpt(),
                   weight_decay=0.01)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()
    assert model[0].weight.abs().sum() < w0.abs().sum()
    torch.testing.assert_close(model[0].weight, 0.99 * w0, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_outside_every_group_never_change(kind):
    model = make_model()
    start = snapshot(model)
    opt = make_opt(kind, [model[2].weight], model=model, weight_decay=0.1)
    train(model, opt)  # every parameter has a gradient
    after = list(model.parameters())
    for k, (a, s) in enumerate(zip(after, start)):
        assert torch.equal(a, s) == (k != 2)
    assert list(opt.state) == [model[2].weight]
    assert set(opt.state_dict()["state"]) == {0}


@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group_gives_fresh_state_and_own_counter(kind):
    """Progressive unfreezing: the added tensor starts at step 0 with zero
    statistics; its first step is bias-corrected as a first step, so it moves
    exactly as the same tensor does on its first step in a fresh optimizer
    whose other tensors are at the same clock."""
    model = make_model()
    opt = make_opt(kind, [p for m in (model[2], model[4]) for p in m.parameters()], model=model)
    train(model, opt, BATCHES[:3])
    assert opt.state[model[2].weight]["step"] == 3
    assert model[0].weight not in opt.state
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.5})
    st = opt.state[model[0].weight]
    assert st["step"] == 0 and not st["m"].any() and not st["v"].any()
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    before = model[0].weight.detach().clone()
    train(model, opt, BATCHES[3:4])
    assert opt.state[model[0].weight]["step"] == 1 and opt.state[model[2].weight]["step"] == 4
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [model[0].weight]})
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1, 2, 3], [4, 5]]
    assert float(sd["state"][4]["step"]) == 1 and float(sd["state"][0]["step"]) == 4


def test_late_tensor_gets_its_own_bias_correction():
    """With the metanetwork's learned part off the update is the nominal Adam
    term: a tensor added at step 3 takes the first Adam step (magnitude
    ~ w_nom per entry, not sqrt(1/(1-0.999^4))-mis-scaled)."""
    model = make_model()
    opt = l2o.GMNOptimizer([model[2].weight], weights=GMNLOpt(), model=model)
    train(model, opt, BATCHES[:3])
    opt.add_param_group({"params": [model[0].weight]})
    before = model[0].weight.detach().clone()
    train(model, opt, BATCHES[3:4])
    step = (model[0].weight - before).abs()
    w_nom = opt.lopt.nominal_weight()
    nonzero = model[0].weight.grad.abs() > 1e-6
    # Adam's first step is lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|)
    torch.testing.assert_close(step[nonzero], torch.full_like(step[nonzero], w_nom), rtol=2e-2, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_unfrozen_tensor_counts_from_its_first_step(kind):
    model = make_model()
    model[0].weight.requires_grad_(False)
    opt = make_opt(kind, model, model=None)
    frozen = model[0].weight.detach().clone()
    train(model, opt, BATCHES[:2])
    assert torch.equal(model[0].weight, frozen) and opt.state[model[0].weight]["step"] == 0
    model[0].weight.requires_grad_(True)
    train(model, opt, BATCHES[2:4])
    assert opt.state[model[0].weight]["step"] == 2 and opt.state[model[0].bias]["step"] == 4
    assert not torch.equal(model[0].weight, frozen)


# ------------------------------------------------------------ state dicts
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_deterministic(kind):
    """Step, save, load into a fresh optimizer on a copy of the model: both
    continue identically (TestOptimRenewed.test_state_dict_deterministic), with
    groups of different lr / weight decay and a late-added group."""
    model = make_model()
    groups = [{"params": [model[2].weight, model[4].weight], "weight_decay": 0.05},
              {"params": [model[2].bias, model[4].bias], "lr": 0.5}]
    opt = make_opt(kind, groups, model=model)
    train(model, opt, BATCHES[:2])
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.7})
    train(model, opt, BATCHES[2:3])
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    groups2 = [{"params": [model2[2].weight, model2[4].weight]}, {"params": [model2[2].bias, model2[4].bias]},
               {"params": list(model2[0].parameters())}]
    opt2 = make_opt(kind, groups2, model=model2, lopt=randomised(kind, seed=5))  # other weights: loaded too
    opt2.load_state_dict(sd)
    assert [g["lr"] for g in opt2.param_groups] == [1.0, 0.5, 0.7]
    assert opt2.param_groups[0]["weight_decay"] == 0.05
    train(model, opt, BATCHES[3:])
    train(model2, opt2, BATCHES[3:])
    assert_same(model, model2)
    for (k, a), b in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].values()):
        for name in ("step", "m", "v"):
            assert torch.equal(a[name], b[name]), (k, name)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_loads_with_weights_only(kind, tmp_path):
    model = make_model()
    opt = make_opt(kind, model.parameters(), model=model)
    train(model, opt, BATCHES[:2])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = make_opt(kind, model2.parameters(), model=model2)
    opt2.load_state_dict(loaded)
    train(model, opt, BATCHES[2:])
    train(model2, opt2, BATCHES[2:])
    assert_same(model, model2)


@pytest.mark.parametrize("kind", KINDS)
def test_load_nontensor_step(kind):
    """A state dict whose counters are Python numbers loads (torch's test_load_nontensor_step)."""
    model = make_model()
    opt = make_opt(kind, model.parameters(), model=model)
    train(model, opt, BATCHES[:2])
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = float(entry["step"])
    model2 = copy.deepcopy(model)
    opt2 = make_opt(kind, model2.parameters(), model=model2)
    opt2.load_state_dict(sd)
    assert all(isinstance(s["step"], torch.Tensor) and s["step"] == 2 for s in opt2.state.values())
    train(model, opt, BATCHES[2:])
    train(model2, opt2, BATCHES[2:])
    assert_same(model, model2)


def test_state_dict_of_the_single_counter_format_loads():
    """State dicts from before per-tensor counters (one 'step' in the group) still load."""
    model = make_model()
    opt = make_opt("gmn", model, model=None)
    train(model, opt, BATCHES[:2])
    sd = opt.state_dict()
    for entry in sd["state"].values():
        del entry["step"]
    sd["param_groups"][0]["step"] = 2
    for g in sd["param_groups"]:
        del g["weight_decay"], g["betas"]
    model2 = copy.deepcopy(model)
    opt2 = make_opt("gmn", model2, model=None)
    opt2.load_state_dict(sd)
    assert "step" not in opt2.param_groups[0]
    train(model, opt, BATCHES[2:])
    train(model2, opt2, BATCHES[2:])
    assert_same(model, model2)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_and_load_state_dict_hooks(kind):
    model = make_model()
    opt = make_opt(kind, model.parameters(), model=model)
    train(model, opt, BATCHES[:1])
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o, sd):
        calls.append("post")
        assert "lopt" in sd and all("step" in s for s in sd["state"].values())  # sees the finished dict
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["extra"] == 1

    model2 = copy.deepcopy(model)
    opt2 = make_opt(kind, model2.parameters(), model=model2)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd.pop("extra")
        sd["param_groups"] = [dict(g, lr=0.5) for g in sd["param_groups"]]  # a hook may rewrite it
        return sd

    def load_post(o):
        calls.append("load_post")
        assert o.state[model2[0].weight]["step"] == 1  # sees the loaded state

    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(load_post)
    opt2.load_state_dict(sd)
    assert calls[-2:] == ["load_pre", "load_post"]
    assert opt2.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_step_pre_and_post_hooks(kind):
    model = make_model()
    opt = make_opt(kind, model.parameters(), model=model)
    seen = []

    def pre(o, args, kwargs):
        seen.append(("pre", model[0].weight.detach().clone()))

    def post(o, args, kwargs):
        seen.append(("post", model[0].weight.detach().clone()))

    h1, h2 = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global_pre", None)))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global_post", None)))
    try:
        train(model, opt, BATCHES[:1])
    finally:
        g1.remove(), g2.remove()
    assert [s[0] for s in seen] == ["global_pre", "pre", "post", "global_post"]
    assert not torch.equal(seen[1][1], seen[2][1])  # the post hook sees the stepped parameters
    h1.remove(), h2.remove()
    train(model, opt, BATCHES[1:2])
    assert len(seen) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_copies_all_public_attrs_and_continues(kind):
    model = make_model()
    opt = make_opt(kind, [{"params": [model[0].weight], "lr": 0.3}, {"params": [model[2].weight]}], model=model)
    train(model, opt, BATCHES[:2])
    model2, opt2 = copy.deepcopy((model, opt))
    for name in ("defaults", "param_groups"):
        a, b = getattr(opt, name), getattr(opt2, name)
        assert repr(a) == repr(b)
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    for p, p2 in zip((model[0].weight, model[2].weight), (model2[0].weight, model2[2].weight)):
        for key in ("step", "m", "v"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    train(model, opt, BATCHES[2:])
    train(model2, opt2, BATCHES[2:])
    assert_same(model, model2)


# ------------------------------------------------------- parameter kinds
@pytest.mark.parametrize("kind", KINDS)
def test_zero_size_parameters(kind):
    model = make_model()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, 4)))
    opt = make_opt(kind, model, model=None)
    before = snapshot(model)
    train(model, opt, BATCHES[:1])  # model.empty gets no gradient
    assert opt.state[model.empty]["step"] == 0
    x, y = BATCHES[1]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.empty.grad = torch.zeros(0, 4)
    opt.step()
    assert model.empty.shape == (0, 4)
    assert not torch.equal(model[0].weight, before[0])
    assert opt.state[model.empty]["step"] == 1 and opt.state[model[0].weight]["step"] == 2
    model2 = copy.deepcopy(model)
    opt2 = make_opt(kind, model2, model=None)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[model2.empty]["step"] == 1 and opt2.state[model2[0].weight]["step"] == 2
    assert opt2.state[model2.empty]["m"].shape == opt.state[model.empty]["m"].shape
    train(model, opt, BATCHES[2:])
    train(model2, opt2, BATCHES[2:])
    assert_same(model, model2)


@pytest.mark.parametrize("kind", KINDS)
def test_step_without_gradients_is_a_noop(kind):
    """grad=None everywhere (zero_grad(set_to_none=True) then step): nothing changes."""
    model = make_model()
    opt = make_opt(kind, model, model=None, weight_decay=0.1)
    train(model, opt, BATCHES[:1])
    before = snapshot(model)
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    for k, entry in opt.state_dict()["state"].items():
        for name, t in entry.items():
            assert torch.equal(t, state[k][name])


@pytest.mark.parametrize("kind", KINDS)
def test_zero_gradient_is_a_step(kind):
    """The stated exemption from torch's test_step_is_noop_for_zero_grads:
    a zero (not None) gradient steps the tensor: its counter advances and its
    momenta decay."""
    model = make_model()
    opt = make_opt(kind, model, model=None)
    train(model, opt, BATCHES[:1])
    m_before = opt.state[model[0].weight]["m"].clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[model[0].weight]["step"] == 2
    torch.testing.assert_close(opt.state[model[0].weight]["m"][1], 0.9 * m_before[1])


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters_and_grad_none(kind):
    model = make_model()
    model[0].weight.requires_grad_(False)
    opt = make_opt(kind, model, model=None, weight_decay=0.1)
    frozen = model[0].weight.detach().clone()
    x, y = BATCHES[0]
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad = None   # a tensor the loss did not reach this step
    bias = model[2].bias.detach().clone()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a stray gradient on a frozen tensor
    opt.step()
    assert torch.equal(model[0].weight, frozen) and torch.equal(model[2].bias, bias)
    assert opt.state[model[0].weight]["step"] == 0 and opt.state[model[2].bias]["step"] == 0
    assert opt.state[model[4].bias]["step"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_parameters(kind):
    """A transposed (non-contiguous) parameter steps exactly as its contiguous copy."""
    results = []
    for contiguous in (True, False):
        torch.manual_seed(0)
        w = torch.randn(5, 6)
        p = nn.Parameter(w.clone() if contiguous else w.t().contiguous().t())
        assert p.is_contiguous() == contiguous
        b = nn.Parameter(torch.zeros(5))
        opt = make_opt("mlp", [p, b]) if kind == "mlp" else None
        if kind == "gmn":
            lin = nn.Linear(6, 5)
            lin.weight, lin.bias = p, b
            opt = make_opt("gmn", lin, model=None)
        for x, _ in BATCHES[:3]:
            opt.zero_grad()
            # elementwise, so the loss and gradient do not depend on the layout
            ((p - x[:5]).square().sum() + (b * x[5, :5]).sum()).backward()
            opt.step()
        results.append((p.detach().clone(), b.detach().clone(), opt.state[p]["m"].clone()))
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_dtypes(kind):
    """float32, float64 and bfloat16 parameters in one model: dtypes kept,
    float32 statistics, every tensor stepped."""
    model = make_model()
    model[2].double()
    model[4].to(torch.bfloat16)

    class Mixed(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            h = torch.relu(self.body[0](x)).double()
            h = torch.tanh(self.body[2](h)).to(torch.bfloat16)
            return self.body[4](h).float()

    net = Mixed(model)
    dtypes = [p.dtype for p in net.parameters()]
    opt = make_opt(kind, net, model=None)
    before = snapshot(net)
    train(net, opt, BATCHES[:2])
    assert [p.dtype for p in net.parameters()] == dtypes
    assert all(not torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert all(s["m"].dtype == torch.float32 and s["v"].dtype == torch.float32 for s in opt.state.values())
    net2 = copy.deepcopy(net)
    opt2 = make_opt(kind, net2, model=None)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(net, opt, BATCHES[2:4])
    train(net2, opt2, BATCHES[2:4])
    assert_same(net, net2)


# -------------------------------------------------------------- schedulers
def _scheduler_args(opt):
    """Arguments of every scheduler in torch.optim.lr_scheduler, plus
    swa_utils.SWALR: the required ones only (defaults for the rest, e.g.
    OneCycleLR's and CyclicLR's cycle_momentum=True), except where a default
    would keep the lr constant over these six steps."""
    return {
        "SWALR": lambda: swa_utils.SWALR(opt, swa_lr=0.5, anneal_epochs=3),
        "LambdaLR": lambda: lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s),
        "MultiplicativeLR": lambda: lr_scheduler.MultiplicativeLR(opt, lambda s: 0.9),
        "StepLR": lambda: lr_scheduler.StepLR(opt, step_size=2),
        "MultiStepLR": lambda: lr_scheduler.MultiStepLR(opt, milestones=[1, 3]),
        "ConstantLR": lambda: lr_scheduler.ConstantLR(opt),
        "LinearLR": lambda: lr_scheduler.LinearLR(opt),
        "ExponentialLR": lambda: lr_scheduler.ExponentialLR(opt, gamma=0.8),
        "SequentialLR": lambda: lr_scheduler.SequentialLR(
            opt, [lr_scheduler.LinearLR(opt, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.8)], milestones=[2]),
        "CosineAnnealingLR": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        "ChainedScheduler": lambda: lr_scheduler.ChainedScheduler(
            [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, 0.8)]),
        "ReduceLROnPlateau": lambda: lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        "CyclicLR": lambda: lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=2),
        "OneCycleLR": lambda: lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10),
        "CosineAnnealingWarmRestarts": lambda: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
        "PolynomialLR": lambda: lr_scheduler.PolynomialLR(opt),
    }


def _all_schedulers():
    """Every public scheduler class of torch.optim.lr_scheduler (found, not
    listed: one added to torch is tested here) and swa_utils.SWALR."""
    found = sorted(name for name, obj in vars(lr_scheduler).items()
                   if inspect.isclass(obj) and (issubclass(obj, lr_scheduler.LRScheduler)
                                                or obj is lr_scheduler.ReduceLROnPlateau)
                   and obj not in (lr_scheduler.LRScheduler, lr_scheduler._LRScheduler)
                   and not name.startswith("_"))
    return found + ["SWALR"]


def test_every_torch_scheduler_is_covered():
    """A scheduler added to torch shows up here until it is in the list below."""
    model = make_model()
    names = _all_schedulers()
    assert {"ReduceLROnPlateau", "OneCycleLR", "SequentialLR", "ChainedScheduler", "CyclicLR"} <= set(names)
    assert set(names) <= set(_scheduler_args(l2o.MLPOptimizer(model, weights=None)))


@pytest.mark.parametrize("name", _all_schedulers())
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_scheduler_runs_and_sets_the_multiplier(name, lr_kind, kind):
    """Each scheduler runs with its defaults (OneCycleLR and CyclicLR cycle
    ``betas``), with float and tensor ``lr``, on two groups (a third tensor
    pair in none); each step a group moves by the lr the scheduler set times
    the step the same optimizer takes at lr 1 (a deep copy stepped alongside)."""
    model = make_model()
    lr = 1.0 if lr_kind == "float" else torch.tensor(1.0)
    opt = make_opt(kind, [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": lr}],
                   model=model, lr=lr)
    sched = _scheduler_args(opt)[name]()
    seen = set()
    for x, y in BATCHES:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ref_model, ref = copy.deepcopy((model, opt))
        for p, q in zip(ref_model.parameters(), model.parameters()):
            p.grad = q.grad.clone()  # deepcopy does not copy .grad
        for g in ref.param_groups:
            g["lr"] = 1.0
        type(ref).step(ref)  # the scheduler's step wrapper on the instance would step the original
        lrs = [float(g["lr"]) for g in opt.param_groups]
        seen.add(tuple(lrs))
        start = snapshot(model)
        opt.step()
        for k, (p, s, r) in enumerate(zip(model.parameters(), start, ref_model.parameters())):
            if k < 4:
                torch.testing.assert_close(p - s, lrs[k // 2] * (r - s), rtol=1e-5, atol=2e-7)
            else:
                assert torch.equal(p, s)  # in no group
        if name == "ReduceLROnPlateau":
            sched.step(1.0)  # a loss that never improves: the lr drops each step
        else:
            sched.step()
    if lr_kind == "tensor":
        assert isinstance(opt.param_groups[1]["lr"], torch.Tensor)
    assert len(seen) > 1  # the scheduler did change the multiplier


def test_one_cycle_cycles_betas_as_a_no_op():
    """OneCycleLR(cycle_momentum=True) writes betas; the step does not read them."""
    results = []
    for cycle in (True, False):
        model = make_model()
        opt = l2o.GMNOptimizer(model, weights=randomised("gmn"))
        sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=len(BATCHES), cycle_momentum=cycle)
        betas = []
        for x, y in BATCHES:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            betas.append(opt.param_groups[0]["betas"][0])
        results.append(snapshot(model))
        if cycle:
            assert len(set(betas)) > 2
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tensor_lr_equals_float_lr():
    runs = []
    for lr in (0.5, torch.tensor(0.5)):
        model = make_model()
        opt = l2o.GMNOptimizer(model, weights=randomised("gmn"), lr=lr)
        train(model, opt, BATCHES[:3])
        runs.append(model)
    assert_same(*runs)


# ------------------------------------------------------------ the README
def test_readme_parameter_group_snippet_runs():
    """The README's "Parameter groups, schedulers and frameworks" snippet as
    written (its ``...`` is where training happens): the head, in no group,
    stays put until it is added, then moves from fresh state."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Parameter groups, schedulers and frameworks"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    before_add, after_add = code.split("...\n")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU())
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.body(x))

    model = Net()
    scope = {"l2o": l2o, "model": model}
    exec(before_add, scope)
    opt = scope["opt"]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    head, body = snapshot(model.head), snapshot(model.body)
    train(model, opt, BATCHES[:2])
    assert all(torch.equal(a, b) for a, b in zip(model.head.parameters(), head))
    assert all(not torch.equal(a, b) for a, b in zip(model.body.parameters(), body))
    exec(after_add, scope)
    assert opt.state[model.head.weight]["step"] == 0 and opt.state[model.body[0].weight]["step"] == 2
    train(model, opt, BATCHES[2:3])
    assert all(not torch.equal(a, b) for a, b in zip(model.head.parameters(), head))
    assert opt.state[model.head.weight]["step"] == 1


# ------------------------------------------------------------- odds and ends
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_never_modified(kind):
    """torch's test_grads_are_never_inplaced_into: the step reads .grad only."""
    model = make_model()
    opt = make_opt(kind, model, model=None, weight_decay=0.1)
    for x, y in BATCHES[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_named_and_unnamed_state_dicts_load_into_each_other(kind):
    """torch's test_can_load_from_to_named_state_dict: an optimizer built from
    named_parameters() saves param_names; either form loads the other's."""
    runs = []
    for save_named, load_named in ((True, False), (False, True), (True, True)):
        model = make_model()
        opt = make_opt(kind, model.named_parameters() if save_named else model.parameters(), model=model)
        train(model, opt, BATCHES[:2])
        sd = opt.state_dict()
        assert ("param_names" in sd["param_groups"][0]) == save_named
        model2 = copy.deepcopy(model)
        opt2 = make_opt(kind, model2.named_parameters() if load_named else model2.parameters(), model=model2)
        opt2.load_state_dict(sd)
        train(model, opt, BATCHES[2:])
        train(model2, opt2, BATCHES[2:])
        assert_same(model, model2)
        runs.append(model)
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("kind", KINDS)
def test_default_dtype_float64(kind):
    """torch's test_set_default_dtype_works_with_foreach: under
    torch.set_default_dtype(torch.float64) a float64 model trains, with
    float32 statistics and metanetwork, exactly as the same float64 model
    does under the float32 default; the closure runs under the caller's
    default, which the step leaves as it found it."""
    runs = []
    for default in (torch.float32, torch.float64):
        lopt, model = randomised(kind), make_model(dtype=torch.float64)  # the same start for both
        torch.set_default_dtype(default)
        try:
            opt = make_opt(kind, model, model=None, lopt=lopt, weight_decay=0.1)
            seen = []

            def closure():
                seen.append(torch.get_default_dtype())
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            for x, y in BATCHES[:3]:
                x = x.double()
                opt.step(closure)
                assert torch.get_default_dtype() == default
            assert seen == [default] * 3
        finally:
            torch.set_default_dtype(torch.float32)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert all(s["m"].dtype == torch.float32 and s["v"].dtype == torch.float32 for s in opt.state.values())
        assert all(p.dtype == torch.float32 for p in opt.lopt.parameters())
        runs.append(model)
    assert_same(*runs)
    # a metanetwork created under the float64 default (weights=None) is made float32
    torch.set_default_dtype(torch.float64)
    try:
        opt = (l2o.GMNOptimizer if kind == "gmn" else l2o.MLPOptimizer)(model, weights=None)
        train(model, opt, BATCHES[:1])
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(p.dtype == torch.float32 for p in opt.lopt.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_warnings_point_at_the_callers_step(kind):
    """A skipped (non-finite) gradient warns at the line that called opt.step()."""
    model = make_model()
    opt = make_opt(kind, model, model=None)
    x, y = BATCHES[0]
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient") as record:
        opt.step()
    assert record[0].filename == __file__
