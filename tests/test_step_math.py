"""The step math is defined once (l2o/features.py, l2o/update_rule.py): every
other form of it -- the folded update formula, the no-grad step's Adam
scaling, the C kernels -- is checked here against that definition, on random
inputs, term by term. A change to a constant or to the feature layout on one
side only fails here before it fails a trajectory (tests/test_backends.py)."""
import ctypes
import math

import pytest
import torch

from l2o import features as F_
from l2o import update_rule
from l2o.fast import kernel_calls, native


@pytest.fixture
def kernels(monkeypatch):
    """The fused kernels (a machine with a C compiler must have them: fail, not skip)."""
    monkeypatch.setenv("L2O_NATIVE", "1")
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    lib = kernel_calls.load(F_.NUM_ENTRY_FEATURES, 8, 16, 32)
    assert lib is not None, native.status()
    return lib


def _random(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"p": torch.randn(n, generator=g), "g": torch.randn(n, generator=g) * 3,
           "m": torch.randn(len(F_.MOMENTUM_BETAS), n, generator=g), "v": torch.rand(n, generator=g)}
    out["v"][::5], out["g"][::5] = 0.0, 0.0          # no gradient history: the eps terms matter
    out["m"][:, ::5] = 0.0
    return out


def test_the_layout_rows_are_the_forwards_columns():
    """entry_features puts each feature in the column ROW_* names."""
    x = _random(9)
    state = F_.update_state({"m": x["m"], "v": x["v"], "step": torch.tensor(3.0)}, x["g"])
    adam = F_.adam_direction(state)
    raw = F_.entry_features(x["p"], x["g"], state, adam, torch.zeros(9, dtype=torch.long), 1)
    scale = raw.new_tensor([float((c * c).mean().sqrt()) for c in (
        x["p"], x["g"], *state["m"], adam, (state["v"] + F_.SQRT_EPS).sqrt())])
    rows = {F_.ROW_P: x["p"], F_.ROW_G: x["g"], F_.ROW_ADAM: adam, F_.ROW_SQRT_V: (state["v"] + F_.SQRT_EPS).sqrt(),
            **{F_.ROW_M0 + i: state["m"][i] for i in range(len(F_.MOMENTUM_BETAS))}}
    assert sorted(rows) == list(range(F_.NUM_ENTRY_FEATURES))
    for row, want in rows.items():
        torch.testing.assert_close(raw[:, row] * (scale[row] + F_.RMS_EPS), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 7.0, 1e3, 1e6])
def test_the_folded_adam_direction_is_the_forwards(t):
    x = _random(50, seed=int(t) % 97)
    state = {"m": x["m"], "v": x["v"], "step": torch.tensor(t)}
    scale, eps = F_.adam_bias_correction(t)
    folded = scale * x["m"][F_.ADAM_BETA1_INDEX] / ((x["v"] + F_.SQRT_EPS).sqrt() + eps)
    # float32 rounding of two orders of operations: ~1e-5 relative (a wrong constant shows as 1e-3 or more)
    torch.testing.assert_close(folded, F_.adam_direction(state), rtol=3e-5, atol=0)


@pytest.mark.parametrize("nominal,w_nom", [(True, 1.3e-3), (True, 1.0), (False, 1.3e-3)])
def test_the_folded_update_formula_is_the_tanh_form(nominal, w_nom):
    g = torch.Generator().manual_seed(1)
    weight, bias, z = torch.randn(2, 6, generator=g), torch.randn(2, generator=g), torch.randn(6, 40, generator=g) * 3
    adam = torch.randn(40, generator=g)
    alpha, c = 1e-3, 2.5
    d, s = weight @ z + bias.unsqueeze(1)
    want = update_rule.learned_update(d, s, adam, alpha, w_nom if nominal else None, c)
    fw, fb = update_rule.fold_head(weight, bias, alpha, c)
    out = fw @ z + fb
    got = update_rule.finish_folded_(torch.empty(40), out[0], out[1].clone(), adam, w_nom if nominal else 0.0, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_the_kernels_are_built_with_the_python_layout(kernels):
    layout = (ctypes.c_long * 7)()
    kernels.lib.l2o_layout(layout)
    assert dict(zip(("NF", "NM", "ROW_P", "ROW_G", "ROW_M0", "ROW_ADAM", "ROW_SQRT_V"), layout)) == \
        native.layout_defines()
    assert native.layout_defines()["NF"] == F_.NUM_ENTRY_FEATURES


@pytest.mark.parametrize("n", [1, 7, 16, 37, 1000])
def test_the_statistics_kernel_computes_the_forwards_features(kernels, n):
    """l2o_stats: the new m, v and every feature row, against l2o.features."""
    x = _random(n, seed=n)
    t = 5.0
    state = F_.update_state({"m": x["m"], "v": x["v"], "step": torch.tensor(t - 1.0)}, x["g"])
    want = {F_.ROW_P: x["p"], F_.ROW_G: x["g"], F_.ROW_ADAM: F_.adam_direction(state),
            F_.ROW_SQRT_V: (state["v"] + F_.SQRT_EPS).sqrt(),
            **{F_.ROW_M0 + i: state["m"][i] for i in range(len(F_.MOMENTUM_BETAS))}}
    m, v = x["m"].clone(), x["v"].clone()
    rows, sums = torch.full((F_.NUM_ENTRY_FEATURES, n), float("nan")), torch.empty(F_.NUM_ENTRY_FEATURES,
                                                                                   dtype=torch.float64)
    scale, eps = F_.adam_bias_correction(t)
    kernels.stats(x["p"], x["g"], m, v, rows, torch.tensor(F_.MOMENTUM_BETAS), scale, eps, True, sums)
    for row, value in want.items():
        torch.testing.assert_close(rows[row], value, rtol=3e-5, atol=1e-7)
    torch.testing.assert_close(m, state["m"], rtol=1e-6, atol=1e-7)   # cancellation: absolute rounding
    torch.testing.assert_close(v, state["v"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sums, (rows.double() ** 2).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("nominal", [0.0, 1.7e-3])
def test_the_kernels_update_formula_is_the_python_one(kernels, nominal):
    g = torch.Generator().manual_seed(2)
    n = 203
    d, s, adam = torch.randn(n, generator=g) * 1e-3, torch.randn(n, generator=g) * 4, torch.randn(n, generator=g)
    s[:3] = torch.tensor([80.0, -80.0, 0.0])        # saturating the sigmoid both ways
    want = update_rule.finish_folded_(torch.empty(n), d, s.clone(), adam, nominal, 3.0)
    got = kernels.finish(d, s, adam, nominal, 3.0, torch.empty(n))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_the_kernel_boundary_checks_its_arguments(kernels):
    """Wrong dtype, length or stride: a clear error before any pointer is passed."""
    x = _random(10)
    rows, sums = torch.empty(F_.NUM_ENTRY_FEATURES, 10), torch.empty(F_.NUM_ENTRY_FEATURES, dtype=torch.float64)
    betas = torch.tensor(F_.MOMENTUM_BETAS)
    args = dict(p=x["p"], g=x["g"], m=x["m"], v=x["v"], x=rows, betas=betas, adam_scale=1.0, adam_eps=1e-8,
                write_back=False, sums=sums)
    kernels.stats(**args)
    for name, bad in (("p", x["p"].double()), ("g", x["g"][:9]), ("v", x["v"].repeat(2)[::2]),
                      ("m", x["m"][:2]), ("x", torch.empty(F_.NUM_ENTRY_FEATURES, 9)), ("sums", sums.float()),
                      ("x", torch.empty(10, F_.NUM_ENTRY_FEATURES).t())):
        with pytest.raises(ValueError, match=f"l2o_stats: {name} "):
            kernels.stats(**{**args, name: bad})
    with pytest.raises(ValueError, match="l2o_finish: out"):
        kernels.finish(x["p"], x["g"], x["v"], 0.0, 3.0, torch.empty(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="l2o_apply: u"):
        kernels.apply(x["p"].clone(), x["g"].double(), 1.0, 1.0)


def test_features_of_a_tensor_with_vanishing_gradients_keep_their_sign_and_stay_small():
    # RMS normalisation divides by (rms + eps): a tensor whose gradients are far
    # below eps gets features near 0 with the gradient's sign, never a blow-up or a flip
    grad = torch.tensor([0.5, -1.0, 2.0, 3e-14, -1e-13, 2e-13])
    tensor_id = torch.tensor([0, 0, 0, 1, 1, 1])
    params = torch.ones(6)
    state = F_.update_state(F_.init_state(params), grad)
    feats = F_.entry_features(params, grad, state, F_.adam_direction(state), tensor_id, 2)
    g = feats[:, F_.ROW_G]
    assert torch.equal(g.sign(), grad.sign())
    assert bool((g[3:].abs() < 0.5).all()) and bool(torch.isfinite(feats).all())


def test_time_features_are_tanh_of_step_over_each_time_scale_minus_one():
    for t in (0, 1, 7, 250, 10_000):
        want = [math.tanh(t / tau - 1.0) for tau in F_.TIME_SCALES]
        torch.testing.assert_close(F_.time_features(torch.tensor(t)), torch.tensor(want), rtol=1e-6, atol=1e-6)
    runs = F_.time_features(torch.tensor([3, 300]))      # one row per run
    assert runs.shape == (2, F_.NUM_TIME_FEATURES)
    torch.testing.assert_close(runs[1], F_.time_features(torch.tensor(300)))


def test_statistics_are_float32_whatever_the_default_dtype():
    # the flat statistics are float32 for float64 / bfloat16 models alike (lean state);
    # under a float64 default dtype a dropped dtype argument would make them float64
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = F_.init_state(torch.zeros(5, dtype=torch.float64))
    finally:
        torch.set_default_dtype(old)
    assert {k: t.dtype for k, t in state.items()} == dict.fromkeys(state, torch.float32)


def test_per_tensor_rms_of_a_single_entry_tensor_is_its_magnitude():
    # a scalar parameter (a learned temperature, a gate) is a tensor of one entry
    x = torch.tensor([[3.0], [-4.0], [-2.0]])
    rms = F_.per_tensor_rms(x, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(rms, torch.tensor([[12.5 ** 0.5], [12.5 ** 0.5], [2.0]]))
