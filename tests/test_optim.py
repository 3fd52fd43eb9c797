"""GMNOptimizer / MLPOptimizer: the torch.optim contract, equivariance, robustness."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from l2o import checkpoint
from l2o.gmn import GMNLOpt


def randomised_gmn(seed=0, scale=0.3):
    """An untrained GMN whose learned part is large enough to matter (the
    shipped init keeps it near zero), so equivariance is tested on real output."""
    torch.manual_seed(seed)
    lopt = GMNLOpt()
    with torch.no_grad():
        for head in (lopt.edge_head, lopt.entry_head):
            head.weight.normal_(0.0, scale)
            head.bias.normal_(0.0, scale)
    return lopt


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        # no bias before BatchNorm: its gradient is pure rounding noise, which
        # Adam-like normalisation amplifies into differences unrelated to symmetry
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def permute_mlp(model, perms):
    """Permute hidden units: perms[k] reorders the outputs of Linear k."""
    out = copy.deepcopy(model)
    lins = [m for m in out if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for k, p in enumerate(perms):
            lins[k].weight.copy_(lins[k].weight[p])
            lins[k].bias.copy_(lins[k].bias[p])
            lins[k + 1].weight.copy_(lins[k + 1].weight[:, p])
    return out


def permute_cnn(model, p0, p1):
    out = copy.deepcopy(model)
    c0, bn, c1, lin = out[0], out[1], out[3], out[7]
    with torch.no_grad():
        c0.weight.copy_(c0.weight[p0])
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(t[p0])
        c1.weight.copy_(c1.weight[:, p0][p1]); c1.bias.copy_(c1.bias[p1])
        lin.weight.copy_(lin.weight[:, p1])
    return out


def train_steps(model, opt, batches, loss_fn):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gmn_updates_are_equivariant(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        model = mlp()
        perms = [torch.randperm(5), torch.randperm(4)]
        permuted = permute_mlp(model, perms)
        batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    else:
        model = cnn()
        perms = [torch.randperm(4), torch.randperm(3)]
        permuted = permute_cnn(model, *perms)
        batches = [(torch.randn(8, 2, 5, 5), torch.randint(0, 2, (8,))) for _ in range(3)]
    x0 = batches[0][0]
    torch.testing.assert_close(model(x0), permuted(x0))  # same function

    lopt = randomised_gmn()
    train_steps(model, l2o.GMNOptimizer(model, weights=copy.deepcopy(lopt)), batches, F.cross_entropy)
    train_steps(permuted, l2o.GMNOptimizer(permuted, weights=copy.deepcopy(lopt)), batches, F.cross_entropy)

    expected = permute_mlp(model, perms) if kind == "mlp" else permute_cnn(model, *perms)
    for (name, a), b in zip(expected.named_parameters(), permuted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gmn_uses_the_graph():
    """The GMN's update of a weight depends on other tensors (its neighbours);
    the per-entry MLP's does not. Guards against a GMN that ignores edges."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    lopt = randomised_gmn()
    graph = l2o.build_graph(model)
    F.cross_entropy(model(x), y).backward()
    params = [p for _, p in model.named_parameters()]
    flat_p = graph.gather([p.detach() for p in params])
    flat_g = graph.gather([p.grad for p in params])
    out1, _ = lopt(graph, flat_p, flat_g, lopt.init_state(flat_p))
    # change only the last layer's gradient: first layer's updates must move
    last = graph.tensor_id == graph.flat_order.index(len(params) - 2)
    flat_g2 = torch.where(last, flat_g * 3.0 + 1.0, flat_g)
    out2, _ = lopt(graph, flat_p, flat_g2, lopt.init_state(flat_p))
    first = graph.tensor_id == graph.flat_order.index(0)
    assert not torch.allclose(out1[first], out2[first])


@pytest.mark.parametrize("make", [
    lambda m: l2o.GMNOptimizer(m, weights=randomised_gmn()),
    lambda m: l2o.MLPOptimizer(m.parameters(), weights=None),
])
def test_state_dict_round_trip_continues_bit_identically(make):
    torch.manual_seed(0)
    model = mlp()
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(6)]
    opt = make(model)
    train_steps(model, opt, batches[:3], F.cross_entropy)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model)
    train_steps(model, opt, batches[3:], F.cross_entropy)

    opt2 = make(saved_model)
    opt2.load_state_dict(saved_state)
    train_steps(saved_model, opt2, batches[3:], F.cross_entropy)
    for a, b in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)
    assert all(opt2.state[p]["step"] == 6 for p in saved_model.parameters())  # per-tensor counters


def test_state_dict_survives_torch_save(tmp_path):
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    train_steps(model, opt, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))], F.cross_entropy)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = l2o.GMNOptimizer(copy.deepcopy(model), weights=None)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for key in ("m", "v"):
        assert torch.equal(opt._flat_state[key], opt2._flat_state[key])


@pytest.mark.parametrize("cls", ["gmn", "mlp"])
def test_nan_gradient_skips_tensor_and_keeps_state_finite(cls, step_path):
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None) if cls == "gmn" else l2o.MLPOptimizer(model, weights=None)
    train_steps(model, opt, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))], F.cross_entropy)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt._flat_state.items()}

    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"2\.weight"):
        opt.step()
    after = list(model.parameters())
    assert torch.equal(after[2], before[2])             # poisoned tensor untouched
    assert not torch.equal(after[0], before[0])         # others still trained
    for p in after:
        assert torch.isfinite(p).all()
    for k in ("m", "v"):
        assert torch.isfinite(opt._flat_state[k]).all()
    # the skipped tensor's statistics did not move
    sel = opt.graph.tensor_id == opt.graph.flat_order.index(2)
    assert torch.equal(opt._flat_state["v"][sel], state_before["v"][sel])
    assert torch.equal(opt._flat_state["m"][:, sel], state_before["m"][:, sel])


def test_frozen_and_unused_parameters_are_untouched():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.spare = nn.Linear(3, 3)   # never called: grad stays None

        def forward(self, x):
            return self.body(x)

    model = WithSpare()
    model.body[0].weight.requires_grad_(False)
    frozen = model.body[0].weight.detach().clone()
    spare = [p.detach().clone() for p in model.spare.parameters()]
    trained = model.body[2].weight.detach().clone()
    opt = l2o.GMNOptimizer(model, weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for ordinary unused/frozen params
        train_steps(model, opt, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))] * 2, F.cross_entropy)
    assert torch.equal(model.body[0].weight, frozen)
    for a, b in zip(model.spare.parameters(), spare):
        assert torch.equal(a, b)
    assert not torch.equal(model.body[2].weight, trained)


def test_lr_scheduler_scales_the_step():
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    deltas = {}
    for lr in (1.0, 0.5, 0.0):
        model = mlp()
        start = [p.detach().clone() for p in model.parameters()]
        opt = l2o.GMNOptimizer(model, weights=None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step, lr=lr: lr)
        train_steps(model, opt, batches, F.cross_entropy)
        sched.step()
        deltas[lr] = [p.detach() - s for p, s in zip(model.parameters(), start)]
    for a, b, z in zip(deltas[1.0], deltas[0.5], deltas[0.0]):
        torch.testing.assert_close(b, 0.5 * a)
        assert torch.count_nonzero(z) == 0


@pytest.mark.slow
def test_both_optimizers_train_digits_from_fresh_init():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    for make in (lambda m: l2o.GMNOptimizer(m, weights=None), lambda m: l2o.MLPOptimizer(m, weights=None)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = make(model)
        initial = F.cross_entropy(model(x), y).item()
        g = torch.Generator().manual_seed(0)
        for _ in range(150):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        assert F.cross_entropy(model(x), y).item() < 0.5 * initial


def test_closure_and_float64():
    model = mlp().double()
    opt = l2o.GMNOptimizer(model, weights=None)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_changed_model_gives_clear_error():
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    model[0].weight.data = torch.randn(7, 6)
    with pytest.raises(RuntimeError, match="shapes changed"):
        opt.step()
    with pytest.raises(ValueError, match="only optimize parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1


def test_bad_weights_files(tmp_path):
    model = mlp()
    with pytest.raises(FileNotFoundError, match="not found"):
        l2o.GMNOptimizer(model, weights=tmp_path / "missing.safetensors")

    good = tmp_path / "gmn.safetensors"
    checkpoint.save_lopt(GMNLOpt(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        l2o.GMNOptimizer(model, weights=truncated)

    mlp_file = tmp_path / "mlp.safetensors"
    checkpoint.save_lopt(l2o.MLPLOpt(), mlp_file)
    with pytest.raises(ValueError, match="expected 'gmn'"):
        l2o.GMNOptimizer(model, weights=mlp_file)

    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not l2o"):
        l2o.GMNOptimizer(model, weights=foreign)

    # weights from a wider GMN under a config that claims the default width
    from safetensors.torch import save as st_save
    import json
    wide = GMNLOpt(node_dim=16)
    meta = {"l2o_format": "1", "l2o_kind": "gmn", "l2o_config": json.dumps(GMNLOpt().config())}
    mismatched = tmp_path / "mismatched.safetensors"
    mismatched.write_bytes(st_save({k: v.contiguous() for k, v in wide.state_dict().items()}, metadata=meta))
    with pytest.raises(ValueError, match="wrong_shape"):
        l2o.GMNOptimizer(model, weights=mismatched)

    with pytest.raises(TypeError, match="weights must be"):
        l2o.GMNOptimizer(model, weights=3)
    with pytest.raises(TypeError, match="nn.Module"):
        l2o.GMNOptimizer(model.parameters(), weights=None)


def test_saved_weights_reload_to_identical_optimizer(tmp_path):
    lopt = randomised_gmn(seed=3)
    checkpoint.save_lopt(lopt, tmp_path / "w.safetensors", extra={"note": "test"})
    loaded = checkpoint.load_lopt(tmp_path / "w.safetensors")
    for (k, a), b in zip(lopt.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert checkpoint.lopt_extra(tmp_path / "w.safetensors") == {"note": "test"}


def test_missing_pretrained_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="no pretrained GMN weights"):
        l2o.GMNOptimizer(mlp())


def test_wrapped_models_are_unwrapped():
    model = mlp()
    wrapped = nn.DataParallel(model)  # CPU: a plain wrapper, fx cannot trace through it usefully
    opt = l2o.GMNOptimizer(wrapped, weights=None)
    assert not opt.graph.unstructured
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    before = model[0].weight.detach().clone()
    train_steps(wrapped, opt, [(x, y)], F.cross_entropy)
    assert not torch.equal(model[0].weight, before)


def test_bf16_model_state_round_trip_keeps_float32_statistics():
    model = mlp().to(torch.bfloat16)
    opt = l2o.GMNOptimizer(model, weights=None)
    x, y = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    train_steps(model, opt, [(x, y)] * 2, F.cross_entropy)
    opt2 = l2o.GMNOptimizer(copy.deepcopy(model), weights=None)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("m", "v"):
        assert opt2._flat_state[key].dtype == torch.float32
        assert torch.equal(opt._flat_state[key], opt2._flat_state[key])


def test_adding_a_layer_after_construction_is_an_error():
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    model.append(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="parameters changed"):
        opt.step()


def test_callers_metanetwork_is_not_modified():
    lopt = GMNLOpt().train()
    l2o.GMNOptimizer(mlp(), weights=lopt)
    assert lopt.training and all(p.requires_grad for p in lopt.parameters() if p is not lopt.log_nominal)


def test_sparse_gradients_are_rejected_clearly():
    model = nn.Sequential(nn.Embedding(5, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    opt = l2o.MLPOptimizer(model, weights=None)
    model(torch.randint(0, 5, (3, 2))).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_step_inside_autocast_matches_float32_step():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    results = []
    for use_autocast in (False, True):
        model = mlp()
        opt = l2o.GMNOptimizer(model, weights=randomised_gmn())
        F.cross_entropy(model(x), y).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradient_whose_square_overflows_skips_its_tensor(step_path):
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    train_steps(model, opt, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))], F.cross_entropy)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    model[0].weight.grad[0, 0] = 3e38  # finite, but its square would make v and the feature RMS inf
    with pytest.warns(RuntimeWarning, match=r"overflows float32\) in 0\.weight"):
        opt.step()
    after = list(model.parameters())
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[2], before[2])  # the rest still trained
    for v in opt._flat_state.values():
        assert torch.isfinite(v).all()


def test_non_finite_updates_are_dropped(step_path):
    model = mlp()
    lopt = l2o.GMNLOpt()
    with torch.no_grad():
        lopt.log_nominal.fill_(100.0)  # exp(100) overflows float32: every update is inf or NaN
    opt = l2o.GMNOptimizer(model, weights=lopt)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    with pytest.warns(RuntimeWarning, match="non-finite updates"):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for v in opt._flat_state.values():
        assert torch.isfinite(v).all()
    assert opt._flat_state["v"].abs().sum() > 0  # statistics of finite gradients still advance (documented)


def test_state_dict_with_wrongly_shaped_momenta_is_rejected():
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    train_steps(model, opt, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))], F.cross_entropy)
    sd = opt.state_dict()
    sd["state"][0]["m"] = sd["state"][0]["m"].movedim(0, -1)  # the old [*shape, num_momenta] layout
    with pytest.raises(ValueError, match=r"'0\.weight' has m \(5, 6, 4\)"):
        l2o.GMNOptimizer(copy.deepcopy(model), weights=None).load_state_dict(sd)


def test_deepcopy_and_pickle_give_an_optimizer_that_continues_identically(step_path, tmp_path):
    model = mlp()
    opt = l2o.GMNOptimizer(model, weights=None)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    train_steps(model, opt, batches[:1], F.cross_entropy)
    model2, opt2 = copy.deepcopy((model, opt))
    torch.save((model, opt), tmp_path / "pair.pt")
    model3, opt3 = torch.load(tmp_path / "pair.pt", weights_only=False)
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        train_steps(m, o, batches[1:], F.cross_entropy)
    for a, b, c in zip(model.parameters(), model2.parameters(), model3.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert opt2._flat_state["m"].data_ptr() != opt._flat_state["m"].data_ptr()


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))  # a 0-d parameter

    def forward(self, x):
        return self.lin(x) / self.temperature


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_scalar_parameter_is_optimized(cls):
    torch.manual_seed(0)
    model = _Tempered()
    opt = cls(model, weights=None)
    before = model.temperature.detach().clone()
    train_steps(model, opt, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))], F.cross_entropy)
    assert opt.state[model.temperature]["m"].shape == (4,)
    assert not torch.equal(model.temperature, before)
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = cls(model2, weights=None)
    opt2.load_state_dict(sd)
    for key in ("step", "m", "v"):
        assert torch.equal(opt2.state[model2.temperature][key], opt.state[model.temperature][key])
    batch = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    train_steps(model, opt, batch, F.cross_entropy)
    train_steps(model2, opt2, batch, F.cross_entropy)
    assert torch.equal(model.temperature, model2.temperature) and torch.equal(model.lin.weight, model2.lin.weight)


def test_learned_optimizer_without_a_chunked_step_takes_the_forward(use_step_path):
    use_step_path("chunked")

    class ForwardOnly(l2o.MLPLOpt):  # a user's learned optimizer: it may change the math, so no l2o/fast step
        pass

    model = mlp()
    opt = l2o.MLPOptimizer(model, weights=ForwardOnly())
    assert opt.backend.name == "forward"
    with pytest.raises(ValueError, match="no chunked implementation"):
        l2o.MLPOptimizer(model, weights=ForwardOnly(), impl="chunked")
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))], F.cross_entropy)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
