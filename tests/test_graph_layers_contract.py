"""Contract of the graph's per-layer mappers (l2o/graph/layers/), the
registration API (registry.py), the unstructured report (report.py), the
drawing (draw.py) and the dense-block aggregation (blocks.py), pinned against
exact messages, hand-counted graphs and independent references."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from graph_helpers import build, canonical, not_followed, part
from l2o.graph import UnsupportedModuleError, build_graph

NO_MAPPING = "no graph mapping for this module or a parameter used directly"
FIX = (" To fix: pass example_inputs=... so the forward can be run and recorded, or describe the module with "
       "l2o.graph.register_module(cls, mapper); build_graph(..., strict=True) lists every reason.")
STRICT = ("build_graph(strict=True): these modules have parameters the parameter graph cannot structure, "
          "or cannot be traced:\n")
FX_REASON = "fx could not trace it (TraceError: symbolically traced variables cannot be used as inputs to control flow)"


# ------------------------------------------------------------------ report.py
class Odd(nn.Module):
    """Four 2x2 parameters used through matrix_exp: nothing the graph can structure."""

    def __init__(self, n: int = 4):
        super().__init__()
        for c in "abcd"[:n]:
            setattr(self, c, nn.Parameter(torch.ones(2, 2)))

    def forward(self, x):
        for p in self.parameters(recurse=False):
            x = x @ torch.linalg.matrix_exp(p)
        return x


class Many(nn.Module):
    def __init__(self, n_odd: int = 7):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.mods = nn.ModuleList([Odd() for _ in range(n_odd)])
        self.three = Odd(3)
        self.top = nn.Parameter(torch.ones(2, 2))

    def forward(self, x):
        x = self.three(self.fc(x))
        for m in self.mods:
            x = m(x)
        return x @ torch.linalg.matrix_exp(self.top)


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "build_graph" in str(w.message)]


def test_strict_error_names_each_module_its_parameters_and_why():
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(Many(), torch.randn(3, 2), strict=True, use_cache=False)
    lines = [f"  mods.{i} (Odd): " + ", ".join(f"mods.{i}.{n}" for n in "abcd") + f" -- {NO_MAPPING}"
             for i in range(7)]
    # a module's own parameters come before its children's (named_parameters' order)
    assert str(err.value) == STRICT + "\n".join(
        [f"  <root> (Many): top -- {NO_MAPPING}"] + lines + [f"  three (Odd): three.a, three.b, three.c -- {NO_MAPPING}"])


@pytest.mark.parametrize("n_odd, more", [(3, ""), (4, ""), (5, ", and 1 more"), (7, ", and 3 more")])
def test_the_warning_gives_the_share_a_few_modules_and_the_fix(n_odd, more):
    ours = _warnings_of(lambda: build_graph(Many(n_odd), torch.randn(3, 2), use_cache=False))
    # 16 entries per Odd, 12 of `three`, 4 of `top` unstructured, the Linear's 6 structured; six
    # modules named, three parameters of each at most
    unstructured = 16 * n_odd + 12 + 4
    share = f"{100.0 * unstructured / (unstructured + 6):.1f}"
    assert share == {3: "91.4", 4: "93.0", 5: "94.1", 7: "95.5"}[n_odd]
    mods = ["<root> (Many: top)"] + [f"mods.{i} (Odd: a, b, c, ...)" for i in range(n_odd)] + ["three (Odd: a, b, c)"]
    assert ours == [f"build_graph: {share}% of the parameters ({4 * n_odd + 4} tensor(s)) have no graph structure "
                    f"(capture: eager); they are still optimised, on per-tensor nodes. Modules: "
                    f"{', '.join(mods[:6])}{more}." + FIX]


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="mutmut's trampolines add stack frames between the caller and the warning")
def test_the_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_graph(Many(), torch.randn(3, 2), use_cache=False)
    assert [w.filename for w in caught if "build_graph" in str(w.message)] == [__file__]


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(5, 5))

    def forward(self, x):
        return x @ torch.linalg.matrix_exp(self.s)


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self, with_sub: bool, with_own: bool = False):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        if with_sub:
            self.deep = Deep()
        if with_own:
            self.own = nn.Parameter(torch.ones(5))

    def forward(self, x):
        if x.mean() > 0:
            x = self.inner(x)
            x = self.deep(x) if hasattr(self, "deep") else x
            return x * self.own if hasattr(self, "own") else x
        return x


class Outer(nn.Module):
    def __init__(self, with_sub: bool, with_own: bool = False):
        super().__init__()
        self.fc1, self.branchy, self.fc2 = nn.Linear(3, 5), Branchy(with_sub, with_own), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.branchy(self.fc1(x)))


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.outer = inner

    def forward(self, x):
        return self.outer(x)


def test_a_parameter_inside_an_untraceable_module_is_reported_with_that_module():
    m = Wrap(Outer(with_sub=True))
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(m, strict=True, capture="fx", use_cache=False)
    assert str(err.value) == STRICT + (
        f"  outer.branchy.deep (Deep): outer.branchy.deep.s -- {FX_REASON} (inside untraceable 'outer.branchy')\n"
        f"  outer.branchy (Branchy): children structured separately, wiring between them unknown -- {FX_REASON}")
    ours = _warnings_of(lambda: build_graph(m, capture="fx", use_cache=False))
    # 25 of 20 + 30 + 25 + 12 = 87 entries
    assert ours == ["build_graph: 28.7% of the parameters (1 tensor(s)) have no graph structure (capture: fx); "
                    "they are still optimised, on per-tensor nodes. Modules: outer.branchy.deep (Deep: s). "
                    "The wiring between the children of outer.branchy is unknown (could not be traced)." + FIX]


def test_a_parameter_of_the_untraceable_module_itself_gives_one_line():
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(Outer(with_sub=False, with_own=True), strict=True, capture="fx", use_cache=False)
    assert str(err.value) == STRICT + f"  branchy (Branchy): branchy.own -- {FX_REASON}"


def test_an_untraceable_module_whose_parameters_are_all_structured_is_still_reported():
    m = Outer(with_sub=False)
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(m, strict=True, capture="fx", use_cache=False)
    assert str(err.value) == STRICT + (
        f"  branchy (Branchy): children structured separately, wiring between them unknown -- {FX_REASON}")
    ours = _warnings_of(lambda: build_graph(m, capture="fx", use_cache=False))
    assert ours == ["build_graph: every parameter is structured (capture: fx), but the wiring between the "
                    "children of branchy is unknown (could not be traced)." + FIX]


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.deep = Deep()

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_an_untraceable_root_is_named_root_with_its_class():
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(UntraceableRoot(), strict=True, capture="fx", use_cache=False)
    assert str(err.value) == STRICT + (
        f"  deep (Deep): deep.s -- {FX_REASON} (inside untraceable '<root>')\n"
        f"  <root> (UntraceableRoot): children structured separately, wiring between them unknown -- {FX_REASON}")


def test_the_warning_is_given_once_per_model_and_outcome():
    m = Wrap(Outer(with_sub=True))
    first = _warnings_of(lambda: build_graph(m, capture="fx", use_cache=False))
    again = _warnings_of(lambda: build_graph(m, capture="fx", use_cache=False))
    other_model = _warnings_of(lambda: build_graph(Wrap(Outer(with_sub=True)), capture="fx", use_cache=False))
    assert len(first) == 1 and again == [] and other_model == first
    # another outcome for the same model (the eager capture structures the branch taken) warns again
    eager = _warnings_of(lambda: build_graph(m, torch.randn(2, 3), use_cache=False))
    assert len(eager) == 1 and eager != first


# ------------------------------------------------------------------ mappers: inputs by keyword
class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: a Linear stored transposed (recognised by its class name)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x=None, input=None):
        x = x if x is not None else input
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class LlamaRMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, hidden_states=None, x=None):
        h = hidden_states if hidden_states is not None else x
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class MoEExperts(nn.Module):
    """3-D experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) read as ``hidden_states``."""

    def __init__(self, E=2, H=4, I=3):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.3)

    def forward(self, hidden_states):
        out = 0
        for e in range(self.gate_up_proj.shape[0]):
            g, u = (hidden_states @ self.gate_up_proj[e].T).chunk(2, -1)
            out = out + (torch.sigmoid(g) * u) @ self.down_proj[e].T
        return out


class Call(nn.Module):
    """``mod`` called on the input(s) positionally or by keyword; ``pick`` selects a tuple output."""

    def __init__(self, mod, keys, pick=None, n_inputs=1, pre=None):
        super().__init__()
        self.mod, self.keys, self.pick, self.n, self.pre = mod, keys, pick, n_inputs, pre
        # key and value made by Linears of their own: units distinct from the query's
        self.kv = nn.ModuleList([nn.Linear(4, 4) for _ in range(1, n_inputs)])

    def forward(self, x):
        x = self.pre(x) if self.pre is not None else x       # so the input's units have edges into them
        xs = [x] + [lin(x) for lin in self.kv]
        y = self.mod(**dict(zip(self.keys, xs))) if self.keys else self.mod(*xs)
        return y[self.pick] if self.pick is not None else y


def _enc_layer():
    return nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)


KEYWORD_CASES = {
    "linear": (lambda: nn.Linear(3, 4), ["input"], None, 1, (2, 3)),
    "conv": (lambda: nn.Conv1d(3, 4, 3), ["input"], None, 1, (2, 3, 5)),
    "embedding": (lambda: nn.Embedding(7, 4), ["input"], None, 1, None),
    "batch_norm": (lambda: nn.BatchNorm1d(3), ["input"], None, 1, (4, 3)),
    "layer_norm": (lambda: nn.LayerNorm(3), ["input"], None, 1, (4, 3)),
    "mha": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), ["query", "key", "value"], 0, 3, (2, 3, 4)),
    "mha_key_by_keyword": (lambda: nn.MultiheadAttention(4, 2, batch_first=True, kdim=4, vdim=4), None, 0, 3,
                           (2, 3, 4)),
    "encoder_layer": (_enc_layer, ["src"], None, 1, (2, 3, 8)),
    "encoder": (lambda: nn.TransformerEncoder(_enc_layer(), 2, enable_nested_tensor=False), ["src"], None, 1,
                (2, 3, 8)),
    "gru": (lambda: nn.GRU(3, 4, batch_first=True), ["input"], 0, 1, (2, 5, 3)),
    "hf_conv1d_x": (lambda: Conv1D(3, 4), ["x"], None, 1, (2, 3)),
    "hf_conv1d_input": (lambda: Conv1D(3, 4), ["input"], None, 1, (2, 3)),
    "rms_norm_hidden_states": (lambda: LlamaRMSNorm(3), ["hidden_states"], None, 1, (2, 3)),
    "rms_norm_x": (lambda: LlamaRMSNorm(3), ["x"], None, 1, (2, 3)),
    "moe_experts": (lambda: MoEExperts(), ["hidden_states"], None, 1, (2, 4)),
}


@pytest.mark.parametrize("name", KEYWORD_CASES)
def test_every_mapper_reads_its_inputs_by_keyword_as_by_position(name):
    make, keys, pick, n, shape = KEYWORD_CASES[name]
    torch.manual_seed(0)
    mod = make()
    x = torch.randint(0, 7, (2, 3)) if shape is None else torch.randn(shape)
    pre = None if shape is None else nn.Conv1d(3, 3, 1) if name == "conv" else nn.Linear(shape[-1], shape[-1])
    if name == "mha_key_by_keyword":       # query positionally, key and value by keyword
        class Mixed(nn.Module):
            def __init__(self):
                super().__init__()
                self.mod, self.pre, self.kv = mod, pre, nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

            def forward(self, q):
                q = self.pre(q)
                return self.mod(q, key=self.kv[0](q), value=self.kv[1](q))[0]
        by_keyword = build(Mixed(), x)
    else:
        by_keyword = build(Call(mod, keys, pick, n, pre), x)
    by_position = build(Call(mod, None, pick, n, pre), x)
    assert not_followed(by_keyword) == [] and not_followed(by_position) == []
    assert canonical(by_keyword) == canonical(by_position)


class Bag(nn.Module):
    def __init__(self, bag: bool):
        super().__init__()
        self.e = nn.EmbeddingBag(20, 8, mode="mean") if bag else nn.Embedding(20, 8)
        self.o = nn.Linear(8, 3)

    def forward(self, x, offsets=None):
        return self.o(self.e(x, offsets) if isinstance(self.e, nn.EmbeddingBag) else self.e(x).mean(1))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_an_embedding_bag_is_placed_as_the_embedding_it_averages(capture):
    """nn.EmbeddingBag over fixed bags ([B, L] ids) or offsets (flat ids) is
    the graph of nn.Embedding followed by the bag's mean: token -> dim edges."""
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 6))
    want = canonical(build_graph(Bag(False), (ids,), strict=True, use_cache=False, capture=capture))
    for inputs in ((ids,), (ids.flatten(), torch.tensor([0, 5, 11, 17]))):
        assert canonical(build_graph(Bag(True), inputs, strict=True, use_cache=False, capture=capture)) == want


# ------------------------------------------------------------------ mappers: recurrent layers
def _edge_pos(g, name):
    i = g.param_names.index(name)
    return g.edge_pos[g.tensor_slices[g.flat_order.index(i)]].view(*g.param_shapes[i], 2)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_with_projections_two_layers_both_directions_is_wired_per_gate_and_unit():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, num_layers=2, proj_size=3, bidirectional=True)
    g = build(Call(lstm, ["input"], 0), torch.randn(4, 2, 5))
    gate_x = torch.tensor([-1.0, -1.0 / 3, 1.0 / 3, 1.0])
    inputs = None
    for layer in range(2):
        outs = []
        for sfx in ("", "_reverse"):
            s = f"mod.weight_ih_l{layer}{sfx}"
            ih_src, ih_dst = part(g, s)
            h = ih_dst[:7, 0]
            # the 4 gate rows of unit j all end on node h_j; input column i starts at input unit i
            assert torch.equal(ih_dst, h.repeat(4).view(28, 1).expand(28, ih_src.shape[1]))
            if inputs is not None:
                assert torch.equal(ih_src, inputs.view(1, 6).expand(28, 6))
            else:
                assert (g.node_type[ih_src[0]] == 0).all() and torch.equal(ih_src, ih_src[:1].expand(28, 5))
            pos = _edge_pos(g, s)
            assert torch.allclose(pos[..., 0], gate_x.repeat_interleave(7).view(28, 1).expand_as(pos[..., 0]))
            assert (pos[..., 1] == 0).all()
            hr_src, hr_dst = part(g, f"mod.weight_hr_l{layer}{sfx}")        # [3, 7]: h_j -> p
            p = hr_dst[:, 0]
            assert torch.equal(hr_src, h.view(1, 7).expand(3, 7)) and torch.equal(hr_dst, p.view(3, 1).expand(3, 7))
            hh_src, hh_dst = part(g, f"mod.weight_hh_l{layer}{sfx}")        # [28, 3]: p_i -> h_j, per gate
            assert torch.equal(hh_src, p.view(1, 3).expand(28, 3)) and torch.equal(hh_dst, ih_dst[:, :3])
            assert torch.equal(_edge_pos(g, f"mod.weight_hh_l{layer}{sfx}"), pos[:, :3])
            for b in ("bias_ih", "bias_hh"):
                assert torch.equal(part(g, f"mod.{b}_l{layer}{sfx}"), h.repeat(4))
            # depths (normalised by the deepest, 4): the units one layer deeper than their input, the
            # projections one deeper again
            assert g.node_depth[h].tolist() == [(1.0 + 2 * layer) / 4] * 7
            assert g.node_depth[p].tolist() == [(2.0 + 2 * layer) / 4] * 3
            outs.append(p)
        inputs = torch.cat(outs)     # the next layer reads both directions' units
    assert set(torch.nonzero(g.node_type == 2).flatten().tolist()) == set(inputs.tolist())
    assert g.num_nodes == 5 + 2 * 2 * (7 + 3)


@pytest.mark.parametrize("kind, gate_x", [("GRU", [-1.0, 0.0, 1.0]), ("RNN", [0.0])])
def test_gru_and_plain_rnn_gates_sit_at_their_offsets(kind, gate_x):
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(4, 3, batch_first=True)
    g = build(Call(rnn, None, 0, pre=nn.Linear(4, 4)), torch.randn(2, 5, 4))
    G = len(gate_x)
    pos = _edge_pos(g, "mod.weight_ih_l0")
    assert pos.shape == (3 * G, 4, 2)
    assert torch.equal(pos[..., 0], torch.tensor(gate_x).repeat_interleave(3).view(3 * G, 1).expand(3 * G, 4))
    src, dst = part(g, "mod.weight_ih_l0")
    assert torch.equal(src[0], part(g, "pre.weight")[1][:, 0])      # reads the Linear's units
    # one deeper than the Linear's (depths normalised by the deepest)
    assert g.node_depth[src[0]].tolist() == [0.5] * 4 and g.node_depth[dst[:, 0]].tolist() == [1.0] * (3 * G)
    hh_src, hh_dst = part(g, "mod.weight_hh_l0")
    assert torch.equal(hh_src, dst[:3, 0].view(1, 3).expand(3 * G, 3)) and torch.equal(hh_dst, dst[:, :3])


class CellLoop(nn.Module):
    """A GRUCell feeding an LSTMCell, stepped over dim 1 of ``x`` (zero initial states), then a head."""

    def __init__(self):
        super().__init__()
        self.gru, self.lstm, self.head = nn.GRUCell(4, 3), nn.LSTMCell(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = hc = None
        for t in range(x.shape[1]):
            h = self.gru(x[:, t], h)
            hc = self.lstm(h, hc)
        return self.head(hc[0])


@pytest.mark.parametrize("steps", [1, 4])
def test_rnn_cells_in_a_loop_are_one_set_of_units_for_every_step(steps):
    """Each cell's weights are placed as nn.GRU's / nn.LSTM's one layer:
    gate rows of unit j end on node j, at the gates' offsets; the recurrent
    weight runs between the cell's own units; every step's units are the
    first step's, and the next layer reads them."""
    torch.manual_seed(0)
    g = build(CellLoop(), torch.randn(2, steps, 4))
    gru_src, gru_dst = part(g, "gru.weight_ih")                      # [9, 4]
    h = gru_dst[:3, 0]
    assert torch.equal(gru_dst, h.repeat(3).view(9, 1).expand(9, 4))
    assert (g.node_type[gru_src[0]] == 0).all() and torch.equal(gru_src, gru_src[:1].expand(9, 4))
    assert torch.equal(part(g, "gru.weight_hh")[0], h.view(1, 3).expand(9, 3))
    assert torch.equal(part(g, "gru.weight_hh")[1], gru_dst[:, :3])
    assert torch.equal(part(g, "gru.bias_ih"), h.repeat(3)) and torch.equal(part(g, "gru.bias_hh"), h.repeat(3))
    assert torch.equal(_edge_pos(g, "gru.weight_ih")[..., 0],
                       torch.tensor([-1.0, 0.0, 1.0]).repeat_interleave(3).view(9, 1).expand(9, 4))
    lstm_src, lstm_dst = part(g, "lstm.weight_ih")                   # [20, 3]: reads the GRU's units
    c = lstm_dst[:5, 0]
    assert torch.equal(lstm_src, h.view(1, 3).expand(20, 3))
    assert torch.equal(lstm_dst, c.repeat(4).view(20, 1).expand(20, 3))
    assert torch.equal(part(g, "lstm.weight_hh")[0], c.view(1, 5).expand(20, 5))
    assert torch.equal(part(g, "head.weight")[0], c.view(1, 5).expand(2, 5))
    assert g.num_nodes == 4 + 3 + 5 + 2
    assert torch.allclose(g.node_depth[h], torch.full((3,), 1 / 3))
    assert torch.allclose(g.node_depth[c], torch.full((5,), 2 / 3))


def test_the_gmn_update_of_an_rnn_cell_loop_permutes_with_its_hidden_units():
    """Permuting the GRU cell's hidden units (the rows of every gate, the
    recurrent columns, the biases, the LSTM cell's input columns) permutes
    the update of a random GMN the same way: the graph built from made-up
    inputs (a sequence) has one set of units for every step."""
    from graph_helpers import random_gmn_update
    torch.manual_seed(0)
    model, x = CellLoop(), torch.randn(2, 4, 4)
    perm = torch.tensor([2, 0, 1])
    rows = torch.cat([g * 3 + perm for g in range(3)])
    permuted = CellLoop()
    with torch.no_grad():
        permuted.load_state_dict(model.state_dict())
        permuted.gru.weight_ih.copy_(model.gru.weight_ih[rows])
        permuted.gru.weight_hh.copy_(model.gru.weight_hh[rows][:, perm])
        permuted.gru.bias_ih.copy_(model.gru.bias_ih[rows])
        permuted.gru.bias_hh.copy_(model.gru.bias_hh[rows])
        permuted.lstm.weight_ih.copy_(model.lstm.weight_ih[:, perm])
    torch.testing.assert_close(permuted(x), model(x))
    loss = lambda m: m(x).pow(2).mean()     # noqa: E731
    upd, upd_p = random_gmn_update(model, loss), random_gmn_update(permuted, loss)
    close = dict(rtol=1e-5, atol=1e-4)     # the sums run in another order
    torch.testing.assert_close(upd_p["gru.weight_ih"], upd["gru.weight_ih"][rows], **close)
    torch.testing.assert_close(upd_p["gru.weight_hh"], upd["gru.weight_hh"][rows][:, perm], **close)
    torch.testing.assert_close(upd_p["gru.bias_hh"], upd["gru.bias_hh"][rows], **close)
    torch.testing.assert_close(upd_p["lstm.weight_ih"], upd["lstm.weight_ih"][:, perm], **close)
    torch.testing.assert_close(upd_p["head.weight"], upd["head.weight"], **close)


class CellFromState(nn.Module):
    """An LSTMCell whose initial (h, c) is a Linear's output (an encoder's final state, say)."""

    def __init__(self):
        super().__init__()
        self.init, self.cell = nn.Linear(6, 3), nn.LSTMCell(4, 3)

    def forward(self, x, z):
        s = self.init(z)
        hc = (s, s)
        for t in range(x.shape[1]):
            hc = self.cell(x[:, t], hc)
        return hc[0]


def test_an_rnn_cells_given_state_is_its_units():
    """The state a cell starts from is what its recurrent weight reads: the
    units that produced it are the cell's units."""
    torch.manual_seed(0)
    g = build(CellFromState(), torch.randn(2, 3, 4), torch.randn(2, 6))
    units = part(g, "init.weight")[1][:, 0]
    assert torch.equal(part(g, "cell.weight_hh")[0], units.view(1, 3).expand(12, 3))
    assert torch.equal(part(g, "cell.weight_ih")[1][:3, 0], units)
    assert g.num_nodes == 4 + 6 + 3


# ------------------------------------------------------------------ mappers: transformer blocks
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layers_are_one_layer_deeper_per_projection(norm_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0,
                                                           norm_first=norm_first), 2, enable_nested_tensor=False)
    g = build(Call(enc, ["src"], pre=nn.Linear(8, 8)), torch.randn(2, 3, 8))
    # pre at depth 1; per layer: q/k/v +1, attention output +2 (the stream), linear1 +3, linear2 +4
    depth = {}
    for layer in range(2):
        pre = f"mod.layers.{layer}."
        depth[pre + "self_attn.in_proj_weight"] = 2 + 4 * layer
        depth[pre + "linear1.weight"] = 4 + 4 * layer
    for name, d in depth.items():
        units = part(g, name)[1][:, 0]
        assert torch.allclose(g.node_depth[units], torch.full((units.numel(),), d / 9)), name
    stream = part(g, "pre.weight")[1][:, 0]
    assert g.node_depth[stream].tolist() == [1.0] * 8        # merged with every block's output (depth 9)
    for layer in range(2):
        assert torch.equal(part(g, f"mod.layers.{layer}.linear2.weight")[1][:, 0], stream)
        assert torch.equal(part(g, f"mod.layers.{layer}.self_attn.out_proj.weight")[1][:, 0], stream)
        assert torch.equal(part(g, f"mod.layers.{layer}.norm1.weight"), stream)


class MHAOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


class GRUOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0]


CAT_AFTER = {
    "encoder_layer": lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0),
    "encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0),
                                             1, norm=nn.LayerNorm(8), enable_nested_tensor=False),
    "layer_norm": lambda: nn.LayerNorm(8),
    "linear": lambda: nn.Linear(8, 8),
    "hf_conv1d": lambda: Conv1D(8, 8),
    "moe_experts": lambda: MoEExperts(H=8),
    "mha": lambda: MHAOut(),
    "gru": lambda: GRUOut(),
}


class CatAfter(nn.Module):
    """Two copies of a block side by side on a [B, T, 8] input, concatenated along dim 2."""

    def __init__(self, make):
        super().__init__()
        self.pre, self.a, self.b, self.head = nn.Linear(8, 8), make(), make(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.pre(x)
        return self.head(torch.cat([self.a(h), self.b(h)], dim=2))


@pytest.mark.parametrize("name", CAT_AFTER)
def test_without_shapes_a_cat_along_dim_2_after_a_block_is_a_feature_concat(name):
    """The fx capture without example inputs knows the dim of the features only from what
    the mapper says ("last"): the head reads both copies' units, as in the eager capture."""
    torch.manual_seed(0)
    m = CatAfter(CAT_AFTER[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx = build_graph(m, capture="fx", use_cache=False)
    eager = build(m, torch.randn(2, 3, 8))
    head = part(fx, "head.weight")[0][0]
    # blocks with a residual stream or no units of their own give back their input's units
    assert head.unique().numel() == (8 if name in ("encoder_layer", "encoder", "layer_norm") else 16)
    assert canonical(fx) == canonical(eager)


# ------------------------------------------------------------------ registry.py
class Custom(nn.Module):
    """Parameters used in ways no tracer structures on its own (through matrix_exp)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 4) * 0.3)      # tokens -> 4 units
        self.w_t = nn.Parameter(torch.randn(4, 5) * 0.3)        # [in, out], stored transposed
        self.w = nn.Parameter(torch.randn(4, 5) * 0.3)          # [out, in]
        self.scale, self.shift = nn.Parameter(torch.ones(5)), nn.Parameter(torch.zeros(5))
        self.ab = nn.Parameter(torch.zeros(4))
        self.gate = nn.Parameter(torch.ones(4))

    def forward(self, tokens, x):
        e = torch.linalg.matrix_exp(torch.eye(4)) @ self.table[tokens].unsqueeze(-1)
        h = x @ torch.linalg.matrix_exp(torch.eye(4) * 0) @ self.w_t
        h = h * torch.exp(self.scale) + self.shift.sinh()
        y = h @ torch.linalg.matrix_exp(torch.zeros(5, 5)) @ self.w.T + self.ab.cosh() * self.gate.exp()
        return y + e.squeeze(-1), h


class CustomSub(Custom):
    pass


def map_custom(ctx, m, tokens, x):
    assert ctx.qualname == "mod"
    e = ctx.embedding(m.table, tokens)
    h = ctx.linear(m.w_t, x, transposed=True)
    h = ctx.entries(m.scale, h, kind="scale")
    assert ctx.entries(m.shift, h, kind="shift") is h
    y = ctx.linear(m.w, h)
    y = ctx.entries(m.ab, y, kind="attn_bias")
    fresh = ctx.new_units(4, like=y)
    ctx.entries(m.gate, ctx.same_units(fresh, y))
    assert ctx.same_units(None, y) is y
    assert torch.equal(ctx.units(y, 4), y.nodes) and ctx.units(y, 3).shape == (3,)
    return ctx.tuple(ctx.same_units(y, e), h)


class TwoInputs(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.pre, self.mod = nn.Linear(4, 4), cls()

    def forward(self, tokens, x):
        y, h = self.mod(tokens, x=self.pre(x))          # the mapper gets keyword inputs as keywords
        return y, h


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_a_registered_mapper_structures_its_module_and_subclasses(capture):
    from l2o.graph import EdgeKind, EntryKind, register_module, unregister_module
    unregister_module(Custom)                     # nothing left registered by an earlier test
    with pytest.raises(TypeError, match="^register_module needs an nn.Module subclass$"):
        register_module(map_custom, map_custom)
    with pytest.raises(TypeError, match="^register_module needs an nn.Module subclass$"):
        register_module(int, map_custom)
    inputs = (torch.randint(0, 6, (2,)), torch.randn(2, 4))
    m = TwoInputs(CustomSub)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = build_graph(m, inputs if capture == "eager" else None, capture=capture)   # cached
    assert "mod.w" in before.unstructured
    register_module(Custom, map_custom)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # everything structured: no warning
            g = build_graph(m, inputs if capture == "eager" else None, capture=capture)   # the cache was cleared
        assert g.unstructured == [] and not_followed(g) == []
        pre_units = part(g, "pre.weight")[1][:, 0]
        t_src, t_dst = part(g, "mod.table")                    # [6, 4]: token t -> unit d
        tokens, e = t_src[:, 0], t_dst[0]
        assert (g.node_type[tokens] == 0).all() and torch.equal(t_dst, e.view(1, 4).expand(6, 4))
        wt_src, wt_dst = part(g, "mod.w_t")                    # [4, 5]: x_i -> h_o
        h = wt_dst[0]
        assert torch.equal(wt_src, pre_units.view(4, 1).expand(4, 5)) and torch.equal(wt_dst, h.view(1, 5).expand(4, 5))
        assert torch.equal(part(g, "mod.scale"), h) and torch.equal(part(g, "mod.shift"), h)
        w_src, w_dst = part(g, "mod.w")                        # [4, 5]: h_i -> y_o
        y = w_dst[:, 0]
        assert torch.equal(w_src, h.view(1, 5).expand(4, 5))
        # the embedding's units are the output's (same_units), which hold ab and gate
        assert torch.equal(y, e) and torch.equal(part(g, "mod.ab"), y) and torch.equal(part(g, "mod.gate"), y)
        kinds = {n: int(g.entry_kind[part_slice(g, n)][0]) for n in ("mod.scale", "mod.shift", "mod.ab", "mod.gate")}
        assert kinds == {"mod.scale": int(EntryKind.NORM_WEIGHT), "mod.shift": int(EntryKind.NORM_BIAS),
                         "mod.ab": int(EntryKind.ATTN_BIAS), "mod.gate": int(EntryKind.BIAS)}
        assert int(g.edge_kind[edge_slice(g, "mod.table")][0]) == int(EdgeKind.EMBEDDING)
        assert int(g.edge_kind[edge_slice(g, "mod.w_t")][0]) == int(EdgeKind.LINEAR)
        assert int(g.edge_kind[edge_slice(g, "mod.w")][0]) == int(EdgeKind.LINEAR)
        d = g.node_depth
        assert torch.allclose(d[h], torch.full((5,), 2 * float(d[pre_units[0]]))) and float(d[h].max()) < float(d[y].min())
    finally:
        unregister_module(Custom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = build_graph(m, inputs if capture == "eager" else None, capture=capture)
    assert "mod.w" in after.unstructured          # unregistering cleared the cache too
    unregister_module(Custom)                     # unregistering twice is harmless


def edge_slice(g, name):
    return g.tensor_slices[g.flat_order.index(g.param_names.index(name))]


def part_slice(g, name):
    s = edge_slice(g, name)
    return slice(s.start - g.num_edges, s.stop - g.num_edges)


# ------------------------------------------------------------------ draw.py
class Drawn(nn.Module):
    """A conv with 11 taps (parallel edges), a Linear head, and one unstructured tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 11), nn.Linear(2, 3)
        self.t = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return self.fc(self.conv(x).mean(-1)), torch.linalg.matrix_exp(self.t)


def test_the_drawing_places_nodes_by_depth_and_draws_parallel_edges_once(tmp_path, monkeypatch):
    import matplotlib.figure

    from l2o.graph import NodeType, draw_graph
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append((fig, path, kw)))
    g = build(Drawn(), torch.randn(1, 1, 13), strict=False)
    assert draw_graph(g, str(tmp_path / "g.png"), max_nodes=g.num_nodes) == str(tmp_path / "g.png")
    [(fig, path, kw)] = saved
    assert path == str(tmp_path / "g.png") and kw == {"dpi": 120} and tuple(fig.get_size_inches()) == (10, 6)
    [ax] = fig.axes
    # a plain reference: columns by depth (tensor nodes at x = 1.15), members spread evenly around 0
    types, depth = g.node_type.tolist(), g.node_depth.tolist()
    cols = {}
    for n in range(g.num_nodes):
        cols.setdefault(1.15 if types[n] == NodeType.TENSOR else depth[n], []).append(n)
    xy = {n: (x, (k - (len(ms) - 1) / 2) / len(ms)) for x, ms in cols.items() for k, n in enumerate(ms)}
    assert 1.15 in cols and len(cols) == 4
    pairs = {}
    for s, d in g.edge_index.t().tolist():
        pairs[(s, d)] = pairs.get((s, d), 0) + 1
    assert sorted(pairs.values()) == [1] * 6 + [11] * 2
    assert len(ax.lines) == len(pairs)
    for line, ((s, d), c) in zip(ax.lines, pairs.items()):
        assert line.get_xdata().tolist() == [xy[s][0], xy[d][0]]
        assert line.get_ydata().tolist() == pytest.approx([xy[s][1], xy[d][1]])
        assert line.get_color() == "#bbbbbb" and line.get_zorder() == 1
        assert line.get_linewidth() == pytest.approx(0.3 + 0.3 * min(c, 9))     # 11 taps: capped at 9
    colours = {"input": "#4c72b0", "hidden": "#8c8c8c", "output": "#dd8452", "tensor": "#c44e52"}
    assert [c.get_label() for c in ax.collections] == list(colours)
    for coll, (label, colour) in zip(ax.collections, colours.items()):
        members = [n for n in range(g.num_nodes) if types[n] == NodeType[label.upper()]]
        assert torch.allclose(torch.tensor(coll.get_offsets().tolist()), torch.tensor([list(xy[n]) for n in members]))
        assert matplotlib.colors.to_hex(coll.get_facecolor()[0]) == colour
        assert coll.get_sizes().tolist() == [30] and coll.get_zorder() == 2
        assert matplotlib.colors.to_hex(coll.get_edgecolor()[0]) == "#000000" and coll.get_linewidths().tolist() == [0.3]
    assert ax.get_xlabel() == "depth" and list(ax.get_yticks()) == []
    assert ax.get_title() == f"{g.num_nodes} nodes, {g.num_edges} edges, {g.num_entries} node-held entries"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(colours)
    assert legend._ncols == 4 and not legend.get_frame_on() and legend.get_texts()[0].get_fontsize() == 8
    with pytest.raises(ValueError, match=f"graph has {g.num_nodes} nodes, more than max_nodes={g.num_nodes - 1}; "
                                         "draw a smaller model or raise max_nodes"):
        draw_graph(g, str(tmp_path / "big.png"), max_nodes=g.num_nodes - 1)


def test_the_default_drawing_limit_is_300_nodes(tmp_path):
    from l2o.graph import draw_graph
    g = build(nn.Linear(300, 1), torch.randn(1, 300))                 # 301 nodes
    with pytest.raises(ValueError, match="max_nodes=300"):
        draw_graph(g, str(tmp_path / "g.png"))


# ------------------------------------------------------------------ blocks.py
def _grouped_edges(groups, rows, cols, row_end="dst"):
    """Edges of a grouped weight [rows, cols]: row r fixed to node 100 + r, column c of group
    g to node 10 * g + c (a plain construction of what detect_block must recognise)."""
    per = rows // groups
    r = (100 + torch.arange(rows)).view(rows, 1).expand(rows, cols)
    c = torch.stack([10 * (i // per) + torch.arange(cols) for i in range(rows)])
    fixed, free = r.reshape(-1), c.reshape(-1)
    return (free, fixed) if row_end == "dst" else (fixed, free)


@pytest.mark.parametrize("groups, rows, cols, row_end", [
    (1, 4, 3, "dst"), (2, 4, 3, "dst"), (4, 4, 2, "dst"), (1, 3, 5, "src"), (3, 6, 2, "src"), (1, 1, 4, "dst"),
    (1, 3, 1, "dst"), (2, 4, 1, "dst")])
def test_a_dense_block_is_detected_with_its_groups_rows_and_columns(groups, rows, cols, row_end):
    from l2o.graph.blocks import detect_block
    src, dst = _grouped_edges(groups, rows, cols, row_end)
    b = detect_block(src, dst, rows)
    per = rows // groups
    assert (b.start, b.stop, b.groups, b.rows, b.cols, b.row_end) == (0, rows * cols, groups, rows, cols, row_end)
    assert torch.equal(b.row_nodes, 100 + torch.arange(rows))
    assert torch.equal(b.col_nodes, torch.cat([10 * g + torch.arange(cols) for g in range(groups)]))
    # the sums over the block equal a plain scatter
    m = torch.randn(rows * cols, 2)
    want = torch.zeros(200, 2).index_add_(0, dst, m)
    got = torch.zeros(200, 2)
    if row_end == "dst":
        got.index_add_(0, b.row_nodes, m.view(rows, cols, 2).sum(1))
    else:
        got.index_add_(0, b.col_nodes, m.view(groups, per, cols, 2).sum(1).reshape(groups * cols, 2))
    assert torch.equal(got, want)


def test_edges_without_a_block_pattern_are_not_a_block():
    from l2o.graph.blocks import detect_block
    src, dst = _grouped_edges(1, 4, 3)
    assert detect_block(src, dst, 0) is None and detect_block(src, dst, 5) is None     # no rows / not a divisor
    assert detect_block(src, dst[[0, 1, 3, 2] + list(range(4, 12))], 4) is None      # rows not fixed
    src2 = src.clone()
    src2[7] = 99                                  # rows 2 and 3 (one group after rows 0, 1) differ
    assert detect_block(src2, dst, 4) is None
    # groups of unequal size (3 rows, table changes after row 2) are not a block
    s, d = _grouped_edges(1, 3, 2)
    s = s.clone()
    s[4:] += 50
    assert detect_block(s, d, 3) is None


def test_row_counts_try_the_first_dim_then_the_first_two():
    from l2o.graph.blocks import row_counts
    assert row_counts(torch.Size([4, 3])) == [4]
    assert row_counts(torch.Size([2, 6, 5])) == [2, 12]
    assert row_counts(torch.Size([7])) == [7]


def test_attention_units_are_one_layer_deeper_than_the_deepest_input():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.mha = nn.Linear(4, 4), nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            kv = self.a(x)
            return self.mha(self.b(kv), kv, kv)[0]       # the query one layer deeper than key and value
    g = build(Cross(), torch.randn(2, 3, 4))
    qkv = part(g, "mha.in_proj_weight")[1][:, 0]
    out = part(g, "mha.out_proj.weight")[1][:, 0]
    # depths (normalised by the deepest, 4): a 1, b 2, q/k/v 3, output 4
    assert torch.allclose(g.node_depth[qkv], torch.full((12,), 0.75))
    assert torch.allclose(g.node_depth[out], torch.full((4,), 1.0))


class Conv1DNoBias(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)

    def forward(self, x):
        return x @ self.weight


Conv1DNoBias.__name__ = "Conv1D"


@pytest.mark.parametrize("make", [lambda: Conv1D(12, 4), lambda: Conv1DNoBias(12, 4)])
def test_hf_conv1d_is_a_transposed_linear_also_on_a_flattened_conv_map_and_as_the_first_layer(make):
    torch.manual_seed(0)
    conv1d = make()
    lin = nn.Linear(12, 4, bias=hasattr(conv1d, "bias"))
    x = torch.randn(2, 3, 4, 4)
    graphs = [build(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Flatten(), head), x) for head in (conv1d, lin)]
    hf, ref = graphs
    # edge (i, o) of the Conv1D is edge (o, i) of the Linear: same endpoints and spatial positions
    assert torch.equal(part(hf, "2.weight")[0], part(ref, "2.weight")[0].T)
    assert torch.equal(part(hf, "2.weight")[1], part(ref, "2.weight")[1].T)
    assert torch.equal(_edge_pos(hf, "2.weight"), _edge_pos(ref, "2.weight").transpose(0, 1))
    assert bool(_edge_pos(hf, "2.weight").abs().sum() > 0)
    assert torch.equal(hf.node_depth, ref.node_depth)
    first = build(make(), torch.randn(2, 12))                  # the network's input read directly
    src, dst = part(first, "weight")
    assert (first.node_type[src[:, 0]] == 0).all() and (first.node_type[dst[0]] == 2).all()
    assert first.unstructured == [] and first.num_nodes == 16


def test_experts_without_layout_flags_are_read_as_concatenated_gate_and_up_rows():
    torch.manual_seed(0)
    E, H, I = 2, 4, 3
    g = build(Call(MoEExperts(E, H, I), ["hidden_states"], pre=nn.Linear(H, H)), torch.randn(2, H))
    src, dst = part(g, "mod.gate_up_proj")                     # [E, 2I, H]
    units = dst[:, :I, 0]
    assert torch.equal(dst[:, I:, 0], units)                   # gate row j and up row j: one unit (e, j)
    assert units.unique().numel() == E * I
    d_src, d_dst = part(g, "mod.down_proj")                    # [E, H, I]: unit (e, j) -> out_h
    assert torch.equal(d_src, units.view(E, 1, I).expand(E, H, I))
    assert torch.equal(src, part(g, "pre.weight")[1][:, 0].view(1, 1, H).expand(E, 2 * I, H))


def test_experts_as_the_first_layer_and_their_depths():
    torch.manual_seed(0)
    E, H, I = 2, 4, 3
    first = build(MoEExperts(E, H, I), torch.randn(2, H))
    assert (first.node_type[part(first, "gate_up_proj")[0][0, 0]] == 0).all() and first.unstructured == []
    g = build(nn.Sequential(nn.Linear(H, H), MoEExperts(E, H, I), nn.Linear(H, 2)), torch.randn(2, H))
    units, out = part(g, "1.gate_up_proj")[1][:, :, 0], part(g, "1.down_proj")[1][0, :, 0]
    head = part(g, "2.weight")[1][:, 0]
    # depths (normalised by the deepest, 4): Linear 1, expert units 2, expert output 3, head 4
    assert torch.allclose(g.node_depth[units], torch.full((E, 2 * I), 0.5))
    assert torch.allclose(g.node_depth[out], torch.full((H,), 0.75))
    assert torch.allclose(g.node_depth[head], torch.full((2,), 1.0))


def test_recurrent_layers_without_biases_and_stacked_layers_one_deeper_each():
    torch.manual_seed(0)
    g = build(Call(nn.GRU(4, 3, num_layers=2, bias=False, batch_first=True), None, 0, pre=nn.Linear(4, 4)),
              torch.randn(2, 5, 4))
    assert g.unstructured == [] and g.num_entries == 4
    h0, h1 = part(g, "mod.weight_ih_l0")[1][:3, 0], part(g, "mod.weight_ih_l1")[1][:3, 0]
    # depths (normalised by the deepest, 3): Linear 1, layer 0 units 2, layer 1 units 3
    assert torch.allclose(g.node_depth[h0], torch.full((3,), 2 / 3))
    assert torch.allclose(g.node_depth[h1], torch.full((3,), 1.0))


def test_a_channel_norm_as_the_first_layer_holds_its_entries_on_the_input_channels():
    g = build(nn.BatchNorm1d(3), torch.randn(4, 3))
    assert g.num_nodes == 3 and torch.equal(part(g, "weight"), part(g, "bias"))


def test_module_context_new_units_and_entries_on_units_it_must_make():
    from l2o.graph.param_graph import EntryKind, NodeType
    from l2o.graph.registry import ModuleContext
    from l2o.graph.state import GraphState
    from l2o.graph.values import Val

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q = nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(2))
    holder = Holder()
    st = GraphState(holder)
    ctx = ModuleContext(st, "m")
    x = Val(own_nodes=st.new_nodes(3, NodeType.HIDDEN, 2), depth=2, fdim="chan")
    v = ctx.new_units(4, like=x)
    assert (v.depth, v.fdim, v.lazy) == (3, "last", None) and v.nodes.tolist() == [3, 4, 5, 6]
    assert st._type[3:7] == [int(NodeType.HIDDEN)] * 4 and st._depth[3:7] == [3] * 4
    w = ctx.new_units(2)
    assert w.depth == 1 and st._depth[7:9] == [1, 1]
    # 5 entries on an input with 3 units: 5 fresh units at the input's depth
    y = ctx.entries(holder.p, x, kind="scale")
    assert y is not x and (y.depth, y.fdim) == (2, "last") and y.nodes.tolist() == [9, 10, 11, 12, 13]
    assert st._depth[9:14] == [2] * 5 and st._type[9:14] == [int(NodeType.HIDDEN)] * 5
    z = ctx.entries(holder.q, None, kind="shift")                 # no input value at all
    assert (z.depth, z.fdim) == (0, "last") and z.nodes.tolist() == [14, 15]
    assert [(c.param, c.kind, c.nodes.tolist()) for c in st.entry_chunks] == [
        (0, int(EntryKind.NORM_WEIGHT), [9, 10, 11, 12, 13]), (1, int(EntryKind.NORM_BIAS), [14, 15])]
