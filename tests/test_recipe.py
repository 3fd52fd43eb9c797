"""The generalisation recipe's pieces: relative updates, held-out meta-loss, mixed horizons."""
import math

import pytest
import torch
from torch import nn

import l2o
from l2o import features as F_
from l2o.graph import build_graph
from l2o.meta import inner
from l2o.meta.config import MetaConfig
from l2o.meta.tasks_pool import TaskPool, draw_length
from lopt_helpers import seeded_weights


def _setup(relative=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3))
    graph = build_graph(model)
    lopt = seeded_weights(l2o.GMNLOpt(relative=relative, scale_floor=1e-3)).requires_grad_(False)
    flat = graph.gather([p.detach() for p in model.parameters()])
    grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(1))
    return model, graph, lopt, flat, grad


def test_relative_update_is_absolute_update_times_tensor_rms():
    _, graph, lopt, flat, grad = _setup()
    absolute = l2o.GMNLOpt(relative=False)
    absolute.load_state_dict(lopt.state_dict())
    rel, _ = lopt(graph, flat, grad, lopt.init_state(flat))
    abs_, _ = absolute(graph, flat, grad, absolute.init_state(flat))
    for k in range(graph.num_tensors):
        entries = graph.tensor_id == k
        rms = flat[entries].pow(2).mean().add(1e-3 ** 2).sqrt()
        torch.testing.assert_close(rel[entries], abs_[entries] * rms)


def test_relative_update_follows_a_rescaled_tensor():
    """Reparametrising W -> c W (gradient -> g / c) multiplies W's update by c:
    the optimizer finds the tensor's step size from its scale, not from its training."""
    _, graph, lopt, flat, grad = _setup()
    w = graph.tensor_id == 0
    c = 7.0
    flat2, grad2 = flat.clone(), grad.clone()
    flat2[w] *= c
    grad2[w] /= c
    u1, _ = lopt(graph, flat, grad, lopt.init_state(flat))
    u2, _ = lopt(graph, flat2, grad2, lopt.init_state(flat2))
    torch.testing.assert_close(u2[w], u1[w] * c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(u2[~w], u1[~w], rtol=1e-4, atol=1e-7)


def test_relative_config_round_trips_and_old_configs_stay_absolute(tmp_path):
    lopt = l2o.GMNLOpt(relative=True, scale_floor=0.02, nominal_lr=0.03)
    l2o.save_lopt(lopt, tmp_path / "rel.safetensors")
    again = l2o.load_lopt(tmp_path / "rel.safetensors")
    assert again.relative and again.scale_floor == 0.02
    assert "relative" not in l2o.GMNLOpt().config()   # configs saved before relative updates rebuild as absolute
    with pytest.raises(ValueError, match="scale_floor"):
        l2o.GMNLOpt(relative=True, scale_floor=0.0)


@pytest.mark.parametrize("path", ["reference", "chunked"])
def test_optimizer_applies_the_relative_scale_on_both_step_paths(path, use_step_path):
    use_step_path(path)
    model, graph, lopt, flat, grad = _setup()
    reference, _ = lopt(graph, flat, grad, lopt.init_state(flat))
    opt = l2o.GMNOptimizer(model, weights=lopt)
    for p, g in zip(model.parameters(), graph.scatter(grad)):
        p.grad = g.clone()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    moved = graph.gather([p.detach() - b for p, b in zip(model.parameters(), before)])
    torch.testing.assert_close(moved, reference, rtol=1e-4, atol=1e-7)


def test_held_out_meta_loss_reads_the_test_split(monkeypatch):
    pool = TaskPool("gmn", "cpu")
    lopt = l2o.GMNLOpt()
    run = inner.new_run(pool, "task:regression_teacher", 3, lopt, slot=0, index=0, length=50)
    entry = pool.get(run.spec)
    seen = []
    real = type(entry.task).batches

    def spy(self, split="train", seed=0, device="cpu"):
        seen.append(split)
        return real(self, split, seed, device)

    monkeypatch.setattr(type(entry.task), "batches", spy)
    on_train = inner.unroll(lopt, run, entry, 4, MetaConfig(meta_data="train"), "cpu", meta=True)
    assert seen == ["train"]
    seen.clear()
    on_valid = inner.unroll(lopt, run, entry, 4, MetaConfig(meta_data="valid"), "cpu", meta=True)
    assert sorted(seen) == ["test", "train"]
    # the same steps (the optimizer still sees training gradients) ...
    torch.testing.assert_close(on_valid.final["params"], on_train.final["params"])
    # ... measured on other data, and differentiable w.r.t. the metanetwork
    assert not torch.isclose(on_valid.meta_loss, on_train.meta_loss)
    on_valid.meta_loss.backward()
    assert lopt.log_nominal.grad is not None and torch.isfinite(lopt.log_nominal.grad)


def test_mixed_horizon_lengths_are_deterministic_and_log_uniform():
    lengths = [draw_length(200, 2000, 0, slot, i) for slot in range(4) for i in range(100)]
    assert lengths == [draw_length(200, 2000, 0, slot, i) for slot in range(4) for i in range(100)]
    assert min(lengths) >= 200 and max(lengths) <= 2000
    below_geometric_mean = sum(n < math.sqrt(200 * 2000) for n in lengths) / len(lengths)
    assert 0.4 < below_geometric_mean < 0.6
    assert draw_length(300, 0, 0, 0, 0) == 300


@pytest.mark.parametrize("kind", ["gmn", "mlp"])
@pytest.mark.parametrize("adapt", [False, True])
def test_batched_runs_give_the_single_run_estimate(kind, adapt):
    """One metanetwork pass over the union of the runs' graphs (runs at different
    steps, of different architectures, one ending mid-unroll) = run by run."""
    from l2o.meta import config as C, tbptt
    from l2o.meta.inner import new_run

    torch.manual_seed(0)
    lopt = l2o.make_lopt(kind, relative=True, adapt=adapt)
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    pool = TaskPool(kind, "cpu")
    specs = ["task:regression_teacher", "task:cnn_digits_bn", "task:mlp_digits"]
    runs = [new_run(pool, s, 7 + i, lopt, slot=i, index=0, length=L) for i, (s, L) in enumerate(zip(specs, (3, 50, 50)))]
    runs = [inner.advance(r, inner.unroll(lopt, r, pool.get(r.spec), i + 1, MetaConfig(), "cpu", meta=False))
            for i, r in enumerate(runs)]                  # runs at steps 1, 2, 3
    out = {}
    for batch in (False, True):
        cfg = C.resolve("tiny", None, {"unroll": 5, "meta_data": "valid", "batch_runs": batch})
        lopt.zero_grad()
        est = tbptt.TruncatedBackprop(cfg, pool, "cpu", global_batch=3).estimate(lopt, runs, 0)
        out[batch] = est.loss_sum, [p.grad.clone() for p in lopt.parameters() if p.requires_grad], est.results
    assert [r.steps for r in out[True][2]] == [r.steps for r in out[False][2]] == [2, 5, 5]
    assert out[True][2][0].finished and not out[True][2][1].finished
    assert math.isclose(out[True][0], out[False][0], rel_tol=1e-5)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a.final["params"], b.final["params"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.final["lopt_state"]["m"], b.final["lopt_state"]["m"])
        assert float(a.final["lopt_state"]["step"]) == float(b.final["lopt_state"]["step"])
        if adapt:
            torch.testing.assert_close(a.final["lopt_state"]["log_lr"], b.final["lopt_state"]["log_lr"])


def test_step_size_controller_grows_aligned_and_shrinks_oscillating_tensors():
    """cos(g_t, m_{t-1}) > 0 (the steps were too short) raises a tensor's
    multiplier, < 0 (they overshot) lowers it, a zero gradient keeps it."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    graph = build_graph(model)
    lopt = l2o.GMNLOpt(adapt=True, adapt_rate=0.1).requires_grad_(False)
    flat = graph.gather([p.detach() for p in model.parameters()])
    g = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    first = graph.tensor_id == 0
    _, state = lopt(graph, flat, g, lopt.init_state(flat))
    assert torch.equal(state["log_lr"], torch.zeros(graph.num_tensors))  # no momentum yet: cos = 0
    g2 = g.clone()
    g2[first] = -g[first]                  # tensor 0 reverses, the others keep going
    g2[graph.tensor_id == 1] = 0.0         # tensor 1: no gradient (skipped)
    _, state2 = lopt(graph, flat, g2, state)
    assert state2["log_lr"][0] == pytest.approx(-0.1, rel=1e-4)
    assert state2["log_lr"][1] == 0.0
    assert torch.allclose(state2["log_lr"][2:], torch.full((graph.num_tensors - 2,), 0.1))
    # the update of each tensor is scaled by exp(log_lr)
    plain = l2o.GMNLOpt()
    plain.load_state_dict({k: v for k, v in lopt.state_dict().items() if k != "log_adapt_rate"})
    u_adapt, _ = lopt(graph, flat, g2, state)
    u_plain, _ = plain(graph, flat, g2, {k: v for k, v in state.items() if k != "log_lr"})
    scale = state2["log_lr"].exp().index_select(0, graph.tensor_id)
    torch.testing.assert_close(u_adapt, u_plain * scale)


@pytest.mark.parametrize("path", ["reference", "chunked"])
def test_optimizer_carries_the_controller_state(path, use_step_path, tmp_path):
    use_step_path(path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    lopt = l2o.GMNLOpt(adapt=True, relative=True)
    opt = l2o.GMNOptimizer(model, weights=lopt)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    multipliers = [float(opt.state[p]["log_lr"]) for p in model.parameters()]
    assert any(m != 0.0 for m in multipliers)
    again = l2o.GMNOptimizer(model, weights=lopt)
    again.load_state_dict(opt.state_dict())
    assert [float(again.state[p]["log_lr"]) for p in model.parameters()] == multipliers
    model[0].weight.grad = None                    # a tensor without gradient keeps its multiplier
    before = float(opt.state[model[0].weight]["log_lr"])
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad = None
    opt.step()
    assert float(opt.state[model[0].weight]["log_lr"]) == before


def test_warm_start_copies_matching_weights_and_keeps_new_ones(tmp_path, capsys):
    import meta_train

    torch.manual_seed(0)
    source = l2o.GMNLOpt(relative=True)
    with torch.no_grad():
        source.edge_head.weight.add_(1.0)
    l2o.save_lopt(source, tmp_path / "src.safetensors")
    target = l2o.GMNLOpt(relative=True, adapt=True, adapt_rate=0.07)
    meta_train.warm_start(target, str(tmp_path / "src.safetensors"))
    torch.testing.assert_close(target.edge_head.weight, source.edge_head.weight)
    assert float(target.log_adapt_rate.detach().exp()) == pytest.approx(0.07)
    assert "log_adapt_rate" in capsys.readouterr().err


@pytest.mark.parametrize("options", [{}, {"adapt_beta": 0.999, "adapt_decay": 0.05}, {"adapt_spike": 2.0},
                                     {"adapt_fade": 1.0}])
def test_controller_gives_the_same_steps_on_both_paths(use_step_path, options):
    """The chunked step computes the controller tensor by tensor (no flat
    gradient copy); the differentiable forward over the flat vector."""
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.randn(32, 2)
    torch.manual_seed(0)
    lopt = l2o.GMNLOpt(adapt=True, adapt_rate=0.3, **options)   # heads near zero: Adam-like steps (scrambled weights
    finals = []                                       # make 4-step trajectories chaotic on either path)
    for path in ("reference", "chunked"):
        use_step_path(path)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
        opt = l2o.GMNOptimizer(model, weights=lopt)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals.append(([p.detach().clone() for p in model.parameters()],
                       [float(opt.state[p]["log_lr"]) for p in model.parameters()]))
    for a, b in zip(finals[0][0], finals[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert finals[0][1] == pytest.approx(finals[1][1], abs=1e-5) and any(v != 0 for v in finals[0][1])


def test_controller_leaks_toward_the_nominal_step_and_reads_the_chosen_momentum():
    """l <- (1 - decay) l + rate cos(g, m_beta): with a gradient orthogonal to
    every kept momentum the multiplier only decays; the cosine is taken with
    the momentum of ``adapt_beta``, not Adam's."""
    model = nn.Sequential(nn.Linear(4, 3))
    graph = build_graph(model)
    n = graph.num_params
    lopt = l2o.GMNLOpt(adapt=True, adapt_rate=0.1, adapt_decay=0.25, adapt_beta=0.999).requires_grad_(False)
    flat = torch.zeros(n)
    state = lopt.init_state(flat)
    state["log_lr"] = torch.full((graph.num_tensors,), 2.0)
    m = state["m"].clone()
    m[:, :] = 0.0
    m[F_.MOMENTUM_BETAS.index(0.999)] = 1.0        # only the slow momentum points along +1
    m[F_.ADAM_BETA1_INDEX] = -1.0                  # Adam's points the other way
    state["m"] = m
    g = torch.ones(n)
    assert torch.allclose(lopt.adapted_log_lr(graph, g, state), torch.full((graph.num_tensors,), 0.75 * 2.0 + 0.1))
    orthogonal = torch.zeros(n)
    orthogonal[graph.tensor_id == 0] = torch.tensor([1.0, -1.0] * (int((graph.tensor_id == 0).sum()) // 2))
    orthogonal[graph.tensor_id == 1] = torch.tensor([1.0, -1.0, 0.0])
    assert torch.allclose(lopt.adapted_log_lr(graph, orthogonal, state), torch.full((graph.num_tensors,), 1.5))
    adam_read = l2o.GMNLOpt(adapt=True, adapt_rate=0.1).requires_grad_(False)
    assert torch.allclose(adam_read.adapted_log_lr(graph, g, state), torch.full((graph.num_tensors,), 2.0 - 0.1))


def test_controller_options_round_trip_and_reject_bad_values(tmp_path):
    lopt = l2o.GMNLOpt(adapt=True, adapt_decay=0.01, adapt_beta=0.999)
    l2o.save_lopt(lopt, tmp_path / "w.safetensors")
    back = l2o.load_lopt(tmp_path / "w.safetensors")
    assert (back.adapt_decay, back.adapt_beta) == (0.01, 0.999)
    assert "adapt_decay" not in l2o.GMNLOpt(adapt=True).config()   # older files keep their exact config
    with pytest.raises(ValueError, match="adapt_decay"):
        l2o.GMNLOpt(adapt=True, adapt_decay=1.0)
    with pytest.raises(ValueError, match="adapt_beta"):
        l2o.GMNLOpt(adapt=True, adapt_beta=0.95)


def test_controller_shrinks_a_tensor_whose_gradient_norm_spikes(tmp_path):
    """ell -= gamma relu(log(|g|^2 / sum(v_hat)) - log 4): a tensor whose squared
    gradient norm is 100x its running average shrinks by gamma log 25, one at
    its average does not move, and the first step (no average yet) is exempt."""
    model = nn.Sequential(nn.Linear(4, 3))
    graph = build_graph(model)
    lopt = l2o.GMNLOpt(adapt=True, adapt_rate=0.1, adapt_spike=0.5).requires_grad_(False)
    state = lopt.init_state(torch.zeros(graph.num_params))
    g = torch.ones(graph.num_params)
    first = lopt.adapted_log_lr(graph, g, state)                  # step 0: v = 0, m = 0
    assert torch.equal(first, torch.zeros(graph.num_tensors))
    state["step"] = torch.tensor(10.0)
    seen = 1.0 - F_.SECOND_MOMENT_BETA ** 10
    state["v"] = torch.full((graph.num_params,), seen)           # v_hat = 1 everywhere
    spiking = g.clone()
    spiking[graph.tensor_id == 0] = 10.0                          # |g|^2 = 100 x its average
    got = lopt.adapted_log_lr(graph, spiking, state)
    assert float(got[0]) == pytest.approx(-0.5 * math.log(25.0), rel=1e-4)
    assert float(got[1]) == pytest.approx(0.0, abs=1e-6)
    assert "adapt_spike" not in l2o.GMNLOpt(adapt=True).config()
    l2o.save_lopt(lopt, tmp_path / "w.safetensors")
    assert l2o.load_lopt(tmp_path / "w.safetensors").adapt_spike == 0.5
    silent = lopt.init_state(torch.zeros(graph.num_params))    # zero gradient, a vanishing average:
    silent["step"], silent["v"] = torch.tensor(10.0), torch.full((graph.num_params,), 1e-36)
    silent["log_lr"] = torch.full((graph.num_tensors,), 1.0)    # no spike, nothing non-finite
    assert torch.equal(lopt.adapted_log_lr(graph, torch.zeros(graph.num_params), silent), silent["log_lr"])
    with pytest.raises(ValueError, match="adapt_spike"):
        l2o.GMNLOpt(adapt=True, adapt_spike=-1.0)


def test_controller_fade_holds_a_tensor_whose_gradient_faded_below_its_average(tmp_path):
    """ell += rate cos(g, m) min(1, |g|^2 / sum(v_hat))^alpha: a tensor whose
    squared gradient norm fell to 1/100 of its running average moves by
    rate / 100^alpha, one at or above its average by the full rate, in both
    directions; the first step (no average yet) moves by the full rate."""
    model = nn.Sequential(nn.Linear(4, 3))
    graph = build_graph(model)
    lopt = l2o.GMNLOpt(adapt=True, adapt_rate=0.1, adapt_fade=0.5).requires_grad_(False)
    state = lopt.init_state(torch.zeros(graph.num_params))
    state["m"][F_.ADAM_BETA1_INDEX] = 1.0
    g = torch.ones(graph.num_params)
    assert torch.allclose(lopt.adapted_log_lr(graph, g, state), torch.full((graph.num_tensors,), 0.1))
    state["step"] = torch.tensor(10.0)
    state["v"] = torch.full((graph.num_params,), 1.0 - F_.SECOND_MOMENT_BETA ** 10)   # v_hat = 1
    faded = g.clone()
    faded[graph.tensor_id == 0] = 0.1                           # |g|^2 = 1/100 of its average
    faded[graph.tensor_id == 1] = 3.0                           # above it: not sped up
    got = lopt.adapted_log_lr(graph, faded, state)
    assert float(got[0]) == pytest.approx(0.1 / 10.0, rel=1e-4)
    assert float(got[1]) == pytest.approx(0.1, rel=1e-4)
    got = lopt.adapted_log_lr(graph, -faded, state)             # an overshoot shrinks as gently
    assert float(got[0]) == pytest.approx(-0.1 / 10.0, rel=1e-4)
    plain = l2o.GMNLOpt(adapt=True, adapt_rate=0.1).requires_grad_(False)
    assert torch.allclose(plain.adapted_log_lr(graph, faded, state), torch.full((graph.num_tensors,), 0.1))
    assert "adapt_fade" not in plain.config()
    l2o.save_lopt(lopt, tmp_path / "w.safetensors")
    assert l2o.load_lopt(tmp_path / "w.safetensors").adapt_fade == 0.5
    with pytest.raises(ValueError, match="adapt_fade"):
        l2o.GMNLOpt(adapt=True, adapt_fade=-0.5)
