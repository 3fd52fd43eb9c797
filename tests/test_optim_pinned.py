"""The optimizers against plain reference implementations, not only "it runs"
(issue 17). Each test names the bug class it catches; each was checked to fail
with that one-line bug put back by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from l2o.optim import unwrap_model

# The constants the metanetworks were meta-trained with, written out here on
# purpose: a change in l2o.features (or in a fused kernel's copy) must fail a test.
MOMENTUM_BETAS = (0.5, 0.9, 0.99, 0.999)
SECOND_MOMENT_BETA = 0.999
KINDS = ["gmn", "mlp"]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batches(n=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def make_opt(kind, model, weights=None):
    cls = l2o.GMNOptimizer if kind == "gmn" else l2o.MLPOptimizer
    return cls(model, weights=weights) if kind == "gmn" else cls(model.parameters(), weights=weights)


def zero_heads(kind):
    """A fresh metanetwork whose output layers are zero: direction 0 and
    log-magnitude 0, so its update is exactly the nominal Adam term at 1e-3."""
    lopt = l2o.make_lopt(kind)
    heads = [lopt.edge_head, lopt.entry_head] if kind == "gmn" else [lopt.out]
    with torch.no_grad():
        for head in heads:
            head.weight.zero_()
            head.bias.zero_()
    return lopt


def train(model, opt, data, grads=None):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if grads is not None:
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_head_metanetwork_is_exactly_adam(kind, step_path):
    # Catches: Adam's beta1 / beta2 / eps / bias correction changed (features or fused kernels).
    model, ref = make_model(), make_model()
    opt = make_opt(kind, model, weights=zero_heads(kind))
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3)
    start = [p.detach().clone() for p in model.parameters()]
    data = batches()
    train(model, opt, data)
    train(ref, adam, data)
    for p, q, p0 in zip(model.parameters(), ref.parameters(), start):
        torch.testing.assert_close(p - p0, q - p0, rtol=2e-4, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_momenta_and_second_moment_follow_their_betas(kind, step_path):
    # Catches: any momentum beta (not only Adam's) or the second-moment beta changed.
    model = make_model()
    opt = make_opt(kind, model, weights=None)
    grads = []
    train(model, opt, batches(), grads)
    for i, p in enumerate(model.parameters()):
        m = [torch.zeros_like(p) for _ in MOMENTUM_BETAS]
        v = torch.zeros_like(p)
        for step in grads:
            g = step[i]
            m = [b * mj + (1 - b) * g for b, mj in zip(MOMENTUM_BETAS, m)]
            v = SECOND_MOMENT_BETA * v + (1 - SECOND_MOMENT_BETA) * g * g
        state = opt.state[p]
        torch.testing.assert_close(state["m"], torch.stack(m), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(state["v"], v, rtol=1e-5, atol=1e-10)
        assert float(state["step"]) == len(grads)


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_optimizer_is_adam_up_to_a_small_perturbation(kind):
    # README: GMNOptimizer(model, weights=None) "behaves like Adam(lr=1e-3)".
    model, ref = make_model(), make_model()
    opt = make_opt(kind, model, weights=None)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    train(model, opt, batches())
    train(ref, adam, batches())
    ours = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    theirs = torch.cat([p.detach().flatten() for p in ref.parameters()]) - start
    rel = float((ours - theirs).norm() / theirs.norm())
    assert rel < 0.05, f"untrained {kind} differs from Adam(lr=1e-3) by {rel:.3f} (relative)"
    assert rel > 0, "the learned part must perturb the update (else the heads are dead)"


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_a_snapshot(kind, step_path):
    # Catches: state_dict() returning live views into the flat buffers.
    model = make_model()
    opt = make_opt(kind, model, weights=None)
    data = batches()
    train(model, opt, data[:2])
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    train(model, opt, data[2:])
    for k, entry in frozen["state"].items():
        for name, value in entry.items():
            assert torch.equal(sd["state"][k][name], value), f"state[{k}][{name!r}] changed after later steps"
    # ... and writing into the snapshot does not write into the optimizer
    before = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        for value in entry.values():
            value.add_(1.0)
    for name, value in sd["lopt"]["weights"].items():
        value.add_(1.0)
    after = opt.state_dict()
    for k, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][k][name], value)
    for name, value in before["lopt"]["weights"].items():
        assert torch.equal(after["lopt"]["weights"][name], value)


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_state_continues_identically(kind, step_path):
    # load_state_dict is checked by what follows it: the same state, then the same steps.
    model = make_model()
    opt = make_opt(kind, model, weights=None)
    data = batches()
    train(model, opt, data[:3])
    twin = copy.deepcopy(model)
    opt2 = make_opt(kind, twin, weights=zero_heads(kind))    # other weights: they must come from the state
    opt2.load_state_dict(opt.state_dict())
    a, b = opt.state_dict(), opt2.state_dict()
    for k in a["state"]:
        for name in a["state"][k]:
            assert torch.equal(a["state"][k][name], b["state"][k][name])
    train(model, opt, data[3:])
    train(twin, opt2, data[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _wrappers(model, tmp_path):
    yield "DataParallel", nn.DataParallel(model)
    yield "compile", torch.compile(model)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield "DDP", nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


def test_wrappers_are_unwrapped(tmp_path):
    # Catches: DDP / DataParallel / torch.compile wrappers not unwrapped before the graph is built.
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    x, y = batches(1)[0]
    reference, lopt = copy.deepcopy(model), l2o.make_lopt("gmn")
    ref_opt = l2o.GMNOptimizer(reference, weights=lopt)
    train(reference, ref_opt, [(x, y)])
    for label, wrapped in _wrappers(model, tmp_path):
        assert unwrap_model(wrapped) is model, label
        if label != "compile":    # compile(DDP(model)): both layers
            assert unwrap_model(torch.compile(wrapped)) is model, label
        opt = l2o.GMNOptimizer(wrapped, weights=lopt)
        assert opt.graph.param_names == names, label
        assert opt.graph.fractions()["fallback"] == 0 and opt.graph.edge_components() == 1, label
        start = copy.deepcopy(model.state_dict())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q), label
        model.load_state_dict(start)


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_follows_its_model_to_another_device(kind, step_on_meta_device):
    # Catches: the optimizer not moving its graph, statistics and metanetwork when
    # the model moves after construction. No GPU here: the model goes to the
    # "meta" device, with tensors swapped in place so the parameters stay the
    # same objects (as model.cuda() keeps them). Meta tensors have no values, so
    # the step cannot finish (it reads the gradients to skip non-finite ones);
    # by then the optimizer must have followed the parameters.
    model = make_model()
    opt = make_opt(kind, model, weights=None)
    train(model, opt, batches(1))
    step_on_meta_device(model, opt)
    assert next(model.parameters()) is opt.param_groups[0]["params"][0]
    assert opt.graph.device.type == "meta"
    assert all(t.device.type == "meta" for t in opt._flat_state.values())
    assert all(w.device.type == "meta" for w in opt.lopt.parameters())
    assert all(opt.state[p]["m"].device.type == "meta" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_follows_its_model_to_the_gpu(kind):
    model, ref = make_model(), make_model()
    opt, ref_opt = make_opt(kind, model, weights=None), make_opt(kind, ref, weights=None)
    data = batches()
    train(model, opt, data[:2])
    train(ref, ref_opt, data[:2])
    model.cuda()
    train(model, opt, [(x.cuda(), y.cuda()) for x, y in data[2:]])
    train(ref, ref_opt, data[2:])
    assert opt.graph.device.type == "cuda"
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-6)
