"""Weights used directly by ops rather than through their modules
(:mod:`l2o.graph.param_uses`): a conv kernel handed to ``F.conv*d`` (itself
or an in-order reshape of it, ``conv.weight.squeeze(1).unsqueeze(1)``), a
weight applied from the left, ``W @ x``, to a channels-first ``x``. Both as
plain-torch modules and in Hugging Face's Mamba mixer, whose CPU path does
exactly that (``causal_conv1d_fn`` -> ``F.conv1d(x, conv1d.weight.squeeze(1)
.unsqueeze(1), bias, groups=C)``; ``dt_proj.weight @ time_step.transpose(1, 2)``).

Each test was checked to fail without the handlers (the weights then left to
the per-tensor fallback, the units after them fresh; Mamba's automatic
capture then the unwired per-module one)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from graph_helpers import build, canonical, kinds, not_followed, part
from l2o.graph.param_graph import EdgeKind, EntryKind


def units_of(g, name):
    """The output units of a Linear-like weight ``W[o, i]``, in row order."""
    return part(g, name)[1][:, 0]


def reads(g, name):
    """The input units a Linear-like weight ``W[o, i]`` reads, in column order."""
    return part(g, name)[0][0]


# ------------------------------------------------------------ conv kernels
class _DepthwiseConv(nn.Module):
    """Linear(3, 4) -> channels-first -> depthwise causal Conv1d(4, k=3) -> Linear(4, 2),
    the conv written as ``form``."""
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc, self.conv, self.out = nn.Linear(3, 4), nn.Conv1d(4, 4, 3, groups=4, padding=2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x).transpose(1, 2)
        w, b = self.conv.weight, self.conv.bias
        y = {"module": lambda: self.conv(h),
             "F": lambda: F.conv1d(h, w, b, padding=2, groups=4),
             "squeezed": lambda: F.conv1d(h, w.squeeze(1).unsqueeze(1), b, padding=2, groups=4),
             "torch.conv1d_keywords": lambda: torch.conv1d(input=h, weight=w.squeeze(1).unsqueeze(1), bias=b,
                                                           padding=2, groups=4)}[self.form]()
        return self.out(torch.relu(y[..., :x.shape[1]]).transpose(1, 2))


@pytest.mark.parametrize("form", ["F", "squeezed", "torch.conv1d_keywords"])
def test_a_functional_depthwise_conv_on_a_conv_weight_maps_like_the_module(form):
    x = torch.randn(2, 5, 3)
    torch.manual_seed(0)
    want = build(_DepthwiseConv("module"), x)
    torch.manual_seed(0)
    got = build(_DepthwiseConv(form), x)
    assert not not_followed(got) and got.unstructured == []
    assert canonical(got) == canonical(want)
    src, dst = part(got, "conv.weight")                 # [4, 1, 3]
    fc = units_of(got, "fc.weight")
    assert torch.equal(src, fc.view(4, 1, 1).expand(4, 1, 3)), "tap k of channel c reads fc unit c"
    assert (dst == dst[:, :1, :1]).all() and dst[:, 0, 0].unique().numel() == 4
    assert (kinds(got, "conv.weight") == EdgeKind.CONV).all()
    assert torch.equal(part(got, "conv.bias"), dst[:, 0, 0])
    assert torch.equal(reads(got, "out.weight"), dst[:, 0, 0])


class _Conv2d(nn.Module):
    def __init__(self, form, transposed=False):
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(4, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        c = self.conv
        if self.form == "module":
            y = c(h)
        elif isinstance(c, nn.ConvTranspose2d):
            y = F.conv_transpose2d(h, c.weight, c.bias, padding=1, groups=2)
        else:
            y = F.conv2d(h, c.weight, c.bias, 1, 1, 1, 2)
        return self.head(torch.relu(y))


@pytest.mark.parametrize("transposed", [False, True])
def test_a_functional_grouped_conv2d_maps_like_the_module(transposed):
    x = torch.randn(1, 3, 5, 5)
    torch.manual_seed(0)
    want = build(_Conv2d("module", transposed), x)
    torch.manual_seed(0)
    got = build(_Conv2d("F", transposed), x)
    assert not not_followed(got) and got.unstructured == []
    assert canonical(got) == canonical(want)


class _PointwiseLinear(nn.Module):
    """A Linear's ``W[o, i]`` used as a 1x1 conv kernel ``W[o, i, 1]``."""
    def __init__(self):
        super().__init__()
        self.fc, self.pw, self.out = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc(x).transpose(1, 2)
        y = F.conv1d(h, self.pw.weight.unsqueeze(-1), self.pw.bias)
        return self.out(torch.relu(y).transpose(1, 2))


def test_a_linear_weight_reshaped_into_a_1x1_kernel_is_a_linear_map():
    g = build(_PointwiseLinear(), torch.randn(2, 4, 3))
    assert not not_followed(g) and g.unstructured == []
    src, dst = part(g, "pw.weight")                      # [5, 4]
    assert torch.equal(src[0], units_of(g, "fc.weight")) and (src == src[:1]).all()
    assert (dst == dst[:, :1]).all() and dst[:, 0].unique().numel() == 5
    assert torch.equal(part(g, "pw.bias"), dst[:, 0])
    assert torch.equal(reads(g, "out.weight"), dst[:, 0])


# ------------------------------------------------------------- W @ x
class _LeftProduct(nn.Module):
    """Linear(3, 4) -> Linear(4, 5) -> relu -> Linear(5, 2), the middle layer written as ``form``
    on the channels-first activation ``h^T`` (``[B, 4, L]``)."""
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc, self.mid, self.out = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)
        self.hf = nn.Parameter(torch.randn(4, 5))        # HF Conv1D layout W[in, out]

    def forward(self, x):
        h = self.fc(x)
        ht = h.transpose(-1, -2)
        w, b, hf = self.mid.weight, self.mid.bias, self.hf
        y = {"module": lambda: self.mid(h),
             "W@x": lambda: (w @ ht + b[:, None]).transpose(-1, -2),
             "torch.matmul": lambda: (torch.matmul(w, ht) + b[:, None]).transpose(-1, -2),
             "torch.mm": lambda: (torch.mm(w, ht) + b[:, None]).t(),
             "x@Whf": lambda: h @ hf + b,
             "Whf.T@x": lambda: (hf.T @ ht + b[:, None]).transpose(-1, -2)}[self.form]()
        return self.out(torch.relu(y))


@pytest.mark.parametrize("form,want_form,x_shape", [
    ("W@x", "module", (2, 6, 3)), ("torch.matmul", "module", (2, 6, 3)), ("torch.mm", "module", (6, 3)),
    ("Whf.T@x", "x@Whf", (2, 6, 3))])
def test_a_weight_applied_from_the_left_to_a_channels_first_activation_is_a_linear_map(form, want_form, x_shape):
    x = torch.randn(*x_shape)
    torch.manual_seed(0)
    want = build(_LeftProduct(want_form), x, strict=False)
    torch.manual_seed(0)
    got = build(_LeftProduct(form), x, strict=False)
    assert not not_followed(got)
    used = "hf" if "hf" in form else "mid.weight"
    assert used not in got.unstructured
    assert canonical(got) == canonical(want)
    if used == "mid.weight":
        assert torch.equal(reads(got, "mid.weight"), units_of(got, "fc.weight"))
        assert torch.equal(reads(got, "out.weight"), units_of(got, "mid.weight"))
        assert torch.equal(part(got, "mid.bias"), units_of(got, "mid.weight"))
        assert (kinds(got, "mid.bias") == EntryKind.BIAS).all()


class _TokenMixing(nn.Module):
    """``M @ x`` with ``x`` token-major ``[B, L, C]``: ``M`` mixes positions, not units."""
    def __init__(self):
        super().__init__()
        self.fc, self.m, self.out = nn.Linear(3, 4), nn.Parameter(torch.randn(6, 6)), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.m @ self.fc(x)))


def test_a_weight_mixing_token_positions_from_the_left_is_not_taken_for_a_linear_map():
    # Guards the rule's condition (x's units along the contracted dim): a
    # position-mixing matrix stays on the fallback, the channels pass through.
    g = build(_TokenMixing(), torch.randn(2, 6, 3), strict=False)
    assert g.unstructured == ["m"]
    assert torch.equal(reads(g, "out.weight"), units_of(g, "fc.weight"))


# ------------------------------------------------------------------- Mamba
def _tiny_mamba():
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tr.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4, expand=2)
    return tr.MambaForCausalLM(cfg), cfg


def _mamba_graph(**kw):
    model, cfg = _tiny_mamba()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = l2o.build_graph(model, use_cache=False, **kw)
    return g, cfg, [str(x.message) for x in w if "build_graph" in str(x.message)]


def test_mamba_builds_eager_and_connected_without_example_inputs():
    # Without the handlers: eager left conv1d / dt_proj / A_log on the fallback
    # (7.6%), so the automatic capture took the per-module one (137 pieces, 3.5%
    # fallback, a warning).
    g, cfg, warned = _mamba_graph()
    assert g.capture == "eager"
    assert not warned
    assert g.edge_components() == 1
    assert g.unstructured == []
    assert g.fractions()["fallback"] < 0.005


def test_mamba_mixer_weights_join_the_right_units():
    g, cfg, _ = _mamba_graph(example_inputs={"input_ids": torch.randint(0, 100, (2, 8))})
    inner, rank, k = cfg.intermediate_size, int(cfg.time_step_rank), cfg.conv_kernel
    for layer in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{layer}.mixer."
        in_units = units_of(g, p + "in_proj.weight")     # [2 * inner]: conv input, then gate
        src, dst = part(g, p + "conv1d.weight")          # [inner, 1, k]
        assert torch.equal(src, in_units[:inner].view(inner, 1, 1).expand(inner, 1, k))
        assert (dst == dst[:, :1, :1]).all()
        conv = dst[:, 0, 0]
        assert conv.unique().numel() == inner
        assert (kinds(g, p + "conv1d.weight") == EdgeKind.CONV).all()
        assert torch.equal(part(g, p + "conv1d.bias"), conv)
        assert torch.equal(reads(g, p + "x_proj.weight"), conv)
        # dt_proj.weight @ time_step^T: reads x_proj's first `rank` units; its units
        # are the conv channels' (met elementwise in the scan), its bias on them
        assert torch.equal(reads(g, p + "dt_proj.weight"), units_of(g, p + "x_proj.weight")[:rank])
        assert torch.equal(units_of(g, p + "dt_proj.weight"), conv)
        assert (kinds(g, p + "dt_proj.weight") == EdgeKind.LINEAR).all()
        assert torch.equal(part(g, p + "dt_proj.bias"), conv)
        # A_log[c, s] multiplies channel c's dt; D[c] channel c's input
        assert torch.equal(part(g, p + "A_log"), conv.view(inner, 1).expand(inner, cfg.state_size))
        assert torch.equal(part(g, p + "D"), conv)
        assert torch.equal(reads(g, p + "out_proj.weight"), conv)
