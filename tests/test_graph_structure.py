"""Structure of the graph mappers, entry by entry: which units each edge joins and
with which kind (not only counts). Each test here was checked to fail when the
one-line bug it names is put back by hand (issue 17)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2o
import tasks
from graph_helpers import canonical, part
from l2o.graph.param_graph import EdgeKind, EntryKind


def edges_of(graph, name):
    """(src [n], dst [n], kind [n]) of the edges holding parameter ``name``, in the
    parameter's own flattened entry order."""
    i = graph.param_names.index(name)
    k = graph.flat_order.index(i)
    assert k < graph.num_edge_params, f"{name} is not edge-held"
    s = graph.tensor_slices[k]
    return graph.edge_index[0, s], graph.edge_index[1, s], graph.edge_kind[s]


class _Attn(nn.Module):
    def __init__(self, kdim=None):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, x, y=None):
        y = x if y is None else y
        return self.att(x, y, y, need_weights=False)[0]


def test_packed_attention_projection_kinds_and_units():
    # Catches: the q/k edge kinds swapped; rows wired to the wrong unit block.
    E = 8
    g = l2o.build_graph(_Attn(), (torch.randn(2, 5, E),), strict=True)
    src, dst, kind = (t.view(3, E, E) for t in edges_of(g, "att.in_proj_weight"))
    assert (kind[0] == EdgeKind.ATTN_Q).all()
    assert (kind[1] == EdgeKind.ATTN_K).all()
    assert (kind[2] == EdgeKind.ATTN_V).all()
    # row r of block b is one unit; column c is input neuron c, the same for q, k, v (self-attention)
    assert (dst == dst[:, :, :1]).all() and (src == src[:1, :1, :]).all()
    units = dst[:, :, 0]
    assert units.unique().numel() == 3 * E, "q, k and v units must be distinct nodes"
    inputs = src[0, 0]
    assert inputs.unique().numel() == E and not set(inputs.tolist()) & set(units.flatten().tolist())
    # out_proj reads the v units: out_proj.weight[o, c] is the edge v_c -> out_o
    osrc, odst, okind = (t.view(E, E) for t in edges_of(g, "att.out_proj.weight"))
    assert (okind == EdgeKind.ATTN_OUT).all()
    assert torch.equal(osrc, units[2].view(1, E).expand(E, E))
    assert (odst == odst[:, :1]).all() and odst[:, 0].unique().numel() == E
    # in_proj_bias sits on the q/k/v units, in order
    slots = g.entry_kind == EntryKind.ATTN_BIAS
    assert torch.equal(g.entry_node[slots], units.flatten())


def test_separate_attention_projections_read_their_own_inputs():
    # kdim != embed_dim: q_proj_weight, k_proj_weight, v_proj_weight are separate tensors.
    E, D = 8, 6
    g = l2o.build_graph(_Attn(kdim=D), (torch.randn(2, 5, E), torch.randn(2, 5, D)), strict=True)
    qs, qd, qk = edges_of(g, "att.q_proj_weight")
    ks, kd, kk = edges_of(g, "att.k_proj_weight")
    vs, vd, vk = edges_of(g, "att.v_proj_weight")
    assert (qk == EdgeKind.ATTN_Q).all() and (kk == EdgeKind.ATTN_K).all() and (vk == EdgeKind.ATTN_V).all()
    assert qs.unique().numel() == E and ks.unique().numel() == D
    assert not set(qs.tolist()) & set(ks.tolist()), "the query and key inputs are different neurons"
    assert torch.equal(ks.unique(), vs.unique()), "key and value come from the same tensor here"
    q_units, k_units, v_units = qd.view(E, E)[:, 0], kd.view(E, D)[:, 0], vd.view(E, D)[:, 0]
    assert len(set(q_units.tolist()) | set(k_units.tolist()) | set(v_units.tolist())) == 3 * E


def _expected_conv_pairs(w_shape, groups, transposed):
    """(input channel, output channel) of every kernel entry, in flattened order."""
    a, b, *ks = w_shape
    k = 1
    for s in ks:
        k *= s
    pairs = []
    for r in range(a):
        for c in range(b):
            if not transposed:   # W[o, i]: output o of group o // (O/g) reads input g*(I/g) + i
                o, i = r, (r // (a // groups)) * b + c
            else:                # W[i, o']: input i of group i // (I/g) feeds output g*(O/g) + o'
                i, o = r, (r // (a // groups)) * b + c
            pairs += [(i, o)] * k
    return pairs


@pytest.mark.parametrize("make,transposed", [
    (lambda: nn.Conv2d(4, 6, 3, groups=2), False),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), True),
    (lambda: nn.ConvTranspose2d(6, 4, 3, groups=2), True),
    (lambda: nn.ConvTranspose1d(4, 8, 3, groups=4), True),
    (lambda: nn.Conv1d(4, 8, 3, groups=4), False),
], ids=["conv2d_g2", "convT2d_4_6_g2", "convT2d_6_4_g2", "convT1d_g4", "conv1d_g4"])
def test_grouped_conv_edges_join_the_right_channels(make, transposed):
    # Catches: ConvTranspose ignoring groups (every input wired to the first group's outputs).
    torch.manual_seed(0)
    conv = make()
    dims = conv.weight.dim() - 2
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(1, conv.in_channels, *([6] * dims))
    g = l2o.build_graph(model, (x,), strict=True)
    src, dst, kind = edges_of(g, "0.weight")
    assert (kind == EdgeKind.CONV).all()
    in_nodes, out_nodes = src.unique(), dst.unique()
    assert in_nodes.numel() == conv.in_channels and out_nodes.numel() == conv.out_channels
    rank_in = {n: j for j, n in enumerate(in_nodes.tolist())}
    rank_out = {n: j for j, n in enumerate(out_nodes.tolist())}
    got = [(rank_in[s], rank_out[d]) for s, d in zip(src.tolist(), dst.tolist())]
    assert got == _expected_conv_pairs(tuple(conv.weight.shape), conv.groups, transposed)
    # the bias sits on the output channels, in order
    bias = g.entry_kind == EntryKind.BIAS
    assert torch.equal(g.entry_node[bias][: conv.out_channels], out_nodes)


def test_linear_edges_are_input_to_output_in_row_major_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    g = l2o.build_graph(model, (torch.randn(1, 3),), strict=True)
    s0, d0, k0 = edges_of(g, "0.weight")
    s2, d2, _ = edges_of(g, "2.weight")
    assert (k0 == EdgeKind.LINEAR).all()
    s0, d0, s2, d2 = s0.view(4, 3), d0.view(4, 3), s2.view(2, 4), d2.view(2, 4)
    assert (s0 == s0[:1]).all() and (d0 == d0[:, :1]).all()
    hidden = d0[:, 0]
    assert torch.equal(s2[0], hidden), "layer 2 reads layer 1's output neurons in order"
    assert d2[:, 0].unique().numel() == 2 and not set(d2.flatten().tolist()) & set(hidden.tolist())


# ------------------------------------------------ activation ops: both captures
class _Pieces(nn.Module):
    """``fc`` (3 -> 8) cut into two 4-unit pieces by ``cut``, each read by its own layer."""
    def __init__(self, cut):
        super().__init__()
        self.cut, self.fc, self.a, self.b = cut, nn.Linear(3, 8), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.cut(self.fc(x))
        return self.a(a) + self.b(b)


CUTS = {
    "chunk": lambda h: h.chunk(2, -1),
    "chunk_kwargs": lambda h: h.chunk(chunks=2, dim=-1),
    "torch_chunk_dim1": lambda h: torch.chunk(h, 2, dim=1),
    "split": lambda h: h.split(4, -1),
    "split_kwargs": lambda h: h.split(split_size=4, dim=-1),
    "split_sections": lambda h: torch.split(h, [4, 4], dim=-1),
    "tensor_split": lambda h: h.tensor_split(2, dim=-1),
}


# (without shapes, dim 1 of a Linear's output may be a sequence dim: fx cannot tell)
@pytest.mark.parametrize("cut, capture", [(c, k) for c in CUTS for k in ("eager", "fx", "fx_without_inputs")
                                          if not (c == "torch_chunk_dim1" and k == "fx_without_inputs")])
def test_pieces_cut_along_the_features_read_their_own_units(cut, capture):
    # Catches: a split/chunk along the feature dim not splitting the unit list
    # (every piece read as all 8 units, or the pieces swapped). Without example
    # inputs, fx has no shapes and decides the feature dim from the layers alone.
    x = None if capture == "fx_without_inputs" else (torch.randn(2, 3),)
    g = l2o.build_graph(_Pieces(CUTS[cut]), x, strict=True, capture=capture.removesuffix("_without_inputs"),
                        use_cache=False)
    units = edges_of(g, "fc.weight")[1].view(8, 3)[:, 0]
    assert units.unique().numel() == 8
    assert torch.equal(edges_of(g, "a.weight")[0].view(2, 4)[0], units[:4])
    assert torch.equal(edges_of(g, "b.weight")[0].view(2, 4)[0], units[4:])


class _FlatHead(nn.Module):
    def __init__(self, flat):
        super().__init__()
        self.flat, self.conv, self.fc = flat, nn.Conv1d(2, 3, 3), nn.Linear(3 * 6, 2)

    def forward(self, x):
        return self.fc(self.flat(torch.relu(self.conv(x))))


FLATS = {
    "view_shape0": lambda h: h.view(h.shape[0], -1),
    "view_size0": lambda h: h.view(h.size(0), -1),
    "reshape": lambda h: h.reshape(h.shape[0], -1),
    "flatten": lambda h: h.flatten(1),
    "torch_flatten": lambda h: torch.flatten(h, 1),
}


@pytest.mark.parametrize("capture", ["eager", "fx"])
@pytest.mark.parametrize("flat", list(FLATS))
def test_a_flattened_conv_map_is_read_by_channel(flat, capture):
    # Catches: ``h.view(h.size(0), -1)`` (the usual CNN head) not followed by the
    # eager capture -- the broadcast shadow of a conv map is not viewable -- so the
    # head read 18 fresh nodes cut off from the conv's channels.
    g = l2o.build_graph(_FlatHead(FLATS[flat]), (torch.randn(2, 2, 8),), strict=True, capture=capture,
                        use_cache=False)
    channels = edges_of(g, "conv.weight")[1].view(3, 2, 3)[:, 0, 0]
    assert channels.unique().numel() == 3
    # column j of the head reads channel j // 6 (6 positions per channel)
    assert torch.equal(edges_of(g, "fc.weight")[0].view(2, 18)[0], channels.repeat_interleave(6))


class _BatchCat(nn.Module):
    """Two branches concatenated along the batch and read by one head (as in a
    contrastive or multi-view loss): the head's column j multiplies unit j of both."""
    def __init__(self, join):
        super().__init__()
        self.join, self.a, self.b, self.out = join, nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.join(torch.relu(self.a(x)), torch.tanh(self.b(x))))


@pytest.mark.parametrize("capture", ["eager", "fx"])
@pytest.mark.parametrize("join", ["cat", "cat_sequence", "stack_mean", "stack_sum_keepdim"])
def test_branches_concatenated_along_the_batch_share_their_units(join, capture):
    # Catches: the head wired to the last branch's units only (the eager capture
    # took one node per column), the first branch's units left without a reader;
    # an ensemble's mean over stacked branches read as fresh nodes.
    joins = {"cat": lambda a, b: torch.cat([a, b], dim=0), "cat_sequence": lambda a, b: torch.cat([a, b], dim=1),
             "stack_mean": lambda a, b: torch.stack([a, b]).mean(0),
             "stack_sum_keepdim": lambda a, b: torch.stack([a, b], dim=1).sum(1, keepdim=True)}
    x = torch.randn(2, 5, 3) if join in ("cat_sequence", "stack_sum_keepdim") else torch.randn(2, 3)
    g = l2o.build_graph(_BatchCat(joins[join]), (x,), strict=True, capture=capture, use_cache=False)
    a_units = edges_of(g, "a.weight")[1].view(4, 3)[:, 0]
    b_units = edges_of(g, "b.weight")[1].view(4, 3)[:, 0]
    assert a_units.unique().numel() == 4 and torch.equal(a_units, b_units)
    assert torch.equal(edges_of(g, "out.weight")[0].view(2, 4)[0], a_units)


class _Scores(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 6)

    def forward(self, x):
        return self.o(torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), -1) @ self.v(x)) + x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.gn, self.out = nn.Linear(3, 8), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.out(self.gn(self.ln(a * torch.sigmoid(b))))


@pytest.mark.parametrize("make, shape", [
    (_Scores, (2, 5, 6)), (_Gated, (2, 3)), (lambda: _Pieces(CUTS["split_sections"]), (2, 3)),
    (lambda: _FlatHead(FLATS["view_size0"]), (2, 2, 8)), (lambda: _BatchCat(lambda a, b: torch.cat([a, b])), (2, 3)),
], ids=["attention_scores", "gated_norms", "split", "flat_head", "batch_cat"])
def test_eager_and_fx_captures_give_the_same_graph(make, shape):
    # The two captures are written independently (shadows of a recorded run vs
    # node lists on an fx trace); on models both follow, they must agree entry by entry.
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    eager = l2o.build_graph(model, (x,), strict=True, capture="eager", use_cache=False)
    fx = l2o.build_graph(model, (x,), strict=True, capture="fx", use_cache=False)
    assert eager.num_nodes == fx.num_nodes
    assert canonical(eager) == canonical(fx)


@pytest.mark.parametrize("family", list(tasks.FAMILIES))
def test_eager_and_fx_captures_agree_on_every_task_family(family):
    task = tasks.sample_task(family, 1, "train")
    model = task.init(0)
    eager = l2o.build_graph(model, task.example_inputs(), capture="eager", use_cache=False)
    fx = l2o.build_graph(model, task.example_inputs(), capture="fx", use_cache=False)
    assert eager.num_nodes == fx.num_nodes
    assert canonical(eager) == canonical(fx)


class _FunctionalGlu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(3, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.nn.functional.glu(self.fc(x), dim=-1))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_glu_makes_its_two_halves_one_unit_each(capture):
    # Catches: the fx capture passing glu's input through (8 units read by a 4-column head)
    g = l2o.build_graph(_FunctionalGlu(), (torch.randn(2, 3),), strict=True, capture=capture, use_cache=False)
    units = edges_of(g, "fc.weight")[1].view(8, 3)[:, 0]
    assert torch.equal(units[:4], units[4:]) and units.unique().numel() == 4
    assert torch.equal(edges_of(g, "out.weight")[0].view(2, 4)[0], units[:4])


def _entry_kinds(g, name):
    k = g.flat_order.index(g.param_names.index(name))
    s = g.tensor_slices[k]
    assert k >= g.num_edge_params, f"{name} is edge-held"
    return g.entry_kind[s.start - g.num_edges:s.stop - g.num_edges]


def test_a_per_channel_prelu_on_a_conv_map_sits_on_the_channels():
    # Catches: the slope read along another dim than the channels (shadow dim 1)
    g = l2o.build_graph(nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 1)),
                        (torch.randn(2, 2, 6, 6),), strict=True, use_cache=False)
    channels = edges_of(g, "0.weight")[1].view(4, 18)[:, 0]
    assert torch.equal(part(g, "1.weight"), channels)
    assert (_entry_kinds(g, "1.weight") == EntryKind.NORM_WEIGHT).all()


def test_a_shared_prelu_slope_is_one_entry_on_its_own_node_without_a_warning():
    # nn.PReLU() (one slope for every unit, the default): nothing to structure, so no
    # "no graph structure" warning, and strict builds accept it
    import warnings
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = l2o.build_graph(model, (torch.randn(2, 3),), strict=True, use_cache=False)
        l2o.build_graph(model, use_cache=False)
    assert (_entry_kinds(g, "1.weight") == EntryKind.FALLBACK).all()
    # the slope is shared, so the units pass through: the head reads the first layer's units
    assert torch.equal(edges_of(g, "2.weight")[0].view(2, 4)[0], edges_of(g, "0.weight")[1].view(4, 3)[:, 0])


@pytest.mark.parametrize("call", ["positional", "keyword", "channels"])
def test_glu_halves_along_the_dim_it_is_given(call):
    # Catches: glu's dim argument ignored (positional or keyword) or taken as the last dim
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            conv = call == "channels"
            self.fc = nn.Conv1d(3, 8, 1) if conv else nn.Linear(3, 8)
            self.out = nn.Conv1d(4, 2, 1) if conv else nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            h = {"positional": lambda: torch.nn.functional.glu(h, -1),
                 "keyword": lambda: torch.nn.functional.glu(h, dim=-1),
                 "channels": lambda: torch.nn.functional.glu(h, 1)}[call]()
            return self.out(h)

    x = torch.randn(2, 3, 4) if call == "channels" else torch.randn(2, 3)
    g = l2o.build_graph(Model(), (x,), strict=True, use_cache=False)
    units = edges_of(g, "fc.weight")[1].view(8, -1)[:, 0]
    assert torch.equal(units[:4], units[4:]) and units.unique().numel() == 4
    assert torch.equal(edges_of(g, "out.weight")[0].view(2, 4, -1)[0, :, 0], units[:4])


class _ConvCat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim, self.a, self.b = dim, nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3 if dim != 1 else 4, 3, padding=1)
        self.out = nn.Conv2d(7 if dim == 1 else 3, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=self.dim))


@pytest.mark.parametrize("capture", ["eager", "fx", "fx_without_inputs"])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_conv_maps_concatenated_along_channels_stack_units_and_along_space_share_them(dim, capture):
    model, x = _ConvCat(dim), torch.randn(2, 2, 5, 5)
    g = l2o.build_graph(model, None if capture == "fx_without_inputs" else (x,), strict=True,
                        capture=capture.removesuffix("_without_inputs"), use_cache=False)
    a = edges_of(g, "a.weight")[1].view(3, 18)[:, 0]
    b = edges_of(g, "b.weight")[1].view(-1, 18)[:, 0]
    reads = edges_of(g, "out.weight")[0].view(2, -1)[0]
    if dim == 1:
        assert torch.equal(reads, torch.cat([a, b])) and len(set(a.tolist()) | set(b.tolist())) == 7
    else:
        assert torch.equal(a, b) and torch.equal(reads, a)


@pytest.mark.parametrize("pieces", ["three_branches", "one_to_one", "not_one_to_one", "a_sum_over_features"])
def test_a_stack_reduced_merges_units_only_in_one_to_one_correspondence(pieces):
    # Slices that pair each unit with exactly one other are one neuron each (an
    # ensemble's mean); a slice pairing one unit with two (a gather) or a sum over
    # the feature dim itself must not collapse the units into fewer nodes.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
            self.c = nn.Linear(3, 4) if pieces in ("three_branches", "a_sum_over_features") else None
            self.out = nn.Linear(4 if pieces != "a_sum_over_features" else 1, 2)

        def forward(self, x):
            a = self.a(x)
            if pieces == "three_branches":
                return self.out(torch.stack([a, self.b(x), self.c(x)]).mean(0))
            if pieces == "one_to_one":
                return self.out(torch.stack([a, self.b(x)[:, [1, 0, 3, 2]]]).sum(0))
            if pieces == "not_one_to_one":
                return self.out(torch.stack([a, self.b(x)[:, [0, 0, 1, 1]]]).sum(0))
            return self.out(a.sum(-1, keepdim=True) + self.b(x).sum(-1, keepdim=True) + self.c(x).sum(-1, keepdim=True))

    g = l2o.build_graph(Model(), (torch.randn(2, 3),), strict=True, use_cache=False)
    units = {k: edges_of(g, f"{k}.weight")[1].view(4, 3)[:, 0] for k in "abc" if f"{k}.weight" in g.param_names}
    for k in units:
        assert units[k].unique().numel() == 4, f"{k}'s units collapsed"
    if pieces == "three_branches":
        assert torch.equal(units["a"], units["b"]) and torch.equal(units["a"], units["c"])
        assert torch.equal(edges_of(g, "out.weight")[0].view(2, 4)[0], units["a"])
    elif pieces == "one_to_one":
        assert torch.equal(units["a"], units["b"][[1, 0, 3, 2]])
    else:
        assert not set(units["a"].tolist()) & set(units["b"].tolist())
