"""More of the per-layer mappers' contract (l2o/graph/layers/: norm.py, embedding.py,
conv.py, layers/__init__.py): LayerNorms over more than the feature dim, the token
nodes of embeddings, which module a registered mapper is handed, pinned against
hand-counted graphs in both captures and against the mappers called on a bare
GraphState."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from graph_helpers import build, canonical, kinds, not_followed, part
from l2o.graph import build_graph
from l2o.graph.param_graph import EdgeKind, EntryKind, NodeType
from l2o.graph.state import GraphState
from l2o.graph.values import Val


def _build(model, inputs, capture):
    """An uncached strict build with the given capture; nothing left unfollowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, inputs, strict=True, use_cache=False, capture=capture)
    assert not_followed(g) == [] and g.unstructured == []
    return g


def kinds_of(g, name):
    """The set of edge or entry kinds of parameter ``name``."""
    return set(kinds(g, name).tolist())


class Sandwich(nn.Module):
    """``a`` -> ``norm`` -> ``b``: two layers with a normalisation between them."""

    def __init__(self, a, norm, b):
        super().__init__()
        self.a, self.norm, self.b = a, norm, b

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


# ------------------------------------------------------------------ norm.py: LayerNorm over several dims
@pytest.mark.parametrize("capture", ["eager", "fx"])
@pytest.mark.parametrize("conv, shape, x_shape", [
    (nn.Conv2d, (3, 4, 5), (2, 2, 4, 5)),      # channels-first 2-D map, (C, H, W) all distinct
    (nn.Conv1d, (3, 5), (2, 2, 5)),            # channels-first 1-D map, (C, L)
])
def test_a_layer_norm_over_a_whole_channel_map_holds_entry_c_on_channel_c(capture, conv, shape, x_shape):
    torch.manual_seed(0)
    m = Sandwich(conv(2, 3, 1), nn.LayerNorm(shape), conv(3, 4, 1))
    g = _build(m, (torch.randn(x_shape),), capture)
    chan = part(g, "a.weight")[1].reshape(3, -1)[:, 0]                  # conv a's 3 output channels
    want = chan.view((3,) + (1,) * (len(shape) - 1)).expand(shape)
    assert torch.equal(part(g, "norm.weight"), want) and torch.equal(part(g, "norm.bias"), want)
    assert kinds_of(g, "norm.weight") == {int(EntryKind.NORM_WEIGHT)}
    assert kinds_of(g, "norm.bias") == {int(EntryKind.NORM_BIAS)}
    # the norm adds no units: conv b reads conv a's channels, one layer deeper
    assert torch.equal(part(g, "b.weight")[0].reshape(4, 3, -1)[0, :, 0], chan)
    assert g.num_nodes == 2 + 3 + 4
    assert torch.allclose(g.node_depth[chan], torch.full((3,), 0.5))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_a_layer_norm_over_the_spatial_dims_of_a_channel_map_keeps_the_channels_for_the_next_layer(capture):
    """``LayerNorm((H, W))`` on a ``[B, C, H, W]`` map: its entries are not per channel, so they sit on W
    fresh units (entry ``(h, w)`` on unit ``w``) at the depth of its input; the map's channels pass
    through unchanged, so the next conv reads conv a's channels (it was cut off from them)."""
    torch.manual_seed(0)
    m = Sandwich(nn.Conv2d(2, 3, 1), nn.LayerNorm((4, 5)), nn.Conv2d(3, 4, 1))
    g = _build(m, (torch.randn(2, 2, 4, 5),), capture)
    chan = part(g, "a.weight")[1].reshape(3, -1)[:, 0]
    w = part(g, "norm.weight")
    assert torch.equal(w, w[:1].expand(4, 5)) and torch.equal(part(g, "norm.bias"), w)
    units = w[0]
    assert units.unique().numel() == 5 and not set(units.tolist()) & set(chan.tolist())
    assert torch.all(g.node_type[units] == int(NodeType.HIDDEN))
    assert torch.all(g.node_depth[chan] == 0.5) and torch.all(g.node_depth[units] == 0.5)
    assert torch.equal(part(g, "b.weight")[0].reshape(4, 3)[0], chan)
    assert g.num_nodes == 2 + 3 + 5 + 4


def test_a_layer_norm_over_a_sequence_and_its_features_holds_entry_t_f_on_feature_f_in_fx():
    """``LayerNorm((T, F))`` on ``[B, T, F]``: entry ``(t, f)`` on feature ``f`` (the fx capture, which
    knows the features are the last dim; the eager capture reads dim 1 for every multi-dim LayerNorm)."""
    torch.manual_seed(0)
    m = Sandwich(nn.Linear(2, 3), nn.LayerNorm((6, 3)), nn.Linear(3, 4))
    g = _build(m, (torch.randn(2, 6, 2),), "fx")
    feat = part(g, "a.weight")[1][:, 0]
    assert torch.equal(part(g, "norm.weight"), feat.view(1, 3).expand(6, 3))
    assert torch.equal(part(g, "norm.bias"), part(g, "norm.weight"))
    assert torch.equal(part(g, "b.weight")[0][0], feat) and g.num_nodes == 2 + 3 + 4


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_a_layer_norm_over_a_flattened_channel_map_hands_its_own_units_to_the_next_layer(capture):
    """``LayerNorm(C * H * W)`` after a flatten: its entries sit on C * H * W fresh units at the depth of
    the map, and those units (the flattened map's own list is shorter than its width) are what the
    next Linear reads, column by column."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten(), nn.LayerNorm(60), nn.Linear(60, 4))
    g = _build(m, (torch.randn(2, 2, 4, 5),), capture)
    chan = part(g, "0.weight")[1].reshape(3, -1)[:, 0]
    units = part(g, "2.weight")
    assert torch.equal(part(g, "2.bias"), units) and units.unique().numel() == 60
    assert not set(units.tolist()) & set(chan.tolist())
    assert torch.all(g.node_depth[units] == 0.5) and torch.all(g.node_type[units] == int(NodeType.HIDDEN))
    assert torch.equal(part(g, "3.weight")[0][0], units) and g.num_nodes == 2 + 3 + 60 + 4


def test_layer_norm_mapper_on_units_of_another_width_puts_its_entries_on_fresh_units():
    from l2o.graph.layers import map_layer_norm
    norm = nn.LayerNorm((4, 5))
    st = GraphState(norm)
    x = Val(own_nodes=st.new_nodes(3, NodeType.HIDDEN, 2), depth=2, fdim="chan")
    out = map_layer_norm(st, norm, "n", [x], {})
    assert out is x                                   # a normalisation hands its input's units on
    assert st._depth[3:] == [2] * 5 and st._type[3:] == [int(NodeType.HIDDEN)] * 5
    assert [(c.kind, c.nodes.tolist()) for c in st.entry_chunks] == [
        (int(EntryKind.NORM_WEIGHT), [3, 4, 5, 6, 7] * 4), (int(EntryKind.NORM_BIAS), [3, 4, 5, 6, 7] * 4)]


# ------------------------------------------------------------------ norm.py: _result
def test_a_channel_norm_without_an_input_value_holds_its_entries_on_fresh_channels():
    """No input value (``input`` missing, as for an fx input the walk was not given): fresh channels at
    depth 0, handed on as the output's units."""
    from l2o.graph.layers import map_channel_norm
    bn = nn.BatchNorm1d(3)
    st = GraphState(bn)
    out = map_channel_norm(st, bn, "n", [], {})
    assert isinstance(out, Val) and out.nodes.tolist() == [0, 1, 2] and (out.depth, out.fdim) == (0, None)
    assert st._depth == [0, 0, 0] and st._type == [int(NodeType.HIDDEN)] * 3
    assert [c.nodes.tolist() for c in st.entry_chunks] == [[0, 1, 2], [0, 1, 2]]


def test_a_channel_norm_on_units_of_another_width_hands_on_fresh_channels_at_the_input_depth():
    from l2o.graph.layers import map_channel_norm
    gn = nn.GroupNorm(1, 3)
    st = GraphState(gn)
    x = Val(own_nodes=st.new_nodes(2, NodeType.HIDDEN, 3), depth=3, fdim="chan")
    out = map_channel_norm(st, gn, "n", [x], {})
    assert out is not x and out.nodes.tolist() == [2, 3, 4] and (out.depth, out.fdim) == (3, "chan")
    assert out.lazy is None and st._depth[2:] == [3, 3, 3]
    assert [c.nodes.tolist() for c in st.entry_chunks] == [[2, 3, 4], [2, 3, 4]]
    # on units of the right width: entries on them, the input value handed on as it is
    st2 = GraphState(gn)
    y = Val(own_nodes=st2.new_nodes(3, NodeType.HIDDEN, 1), depth=1, fdim="chan")
    assert map_channel_norm(st2, gn, "n", [y], {}) is y and st2.entry_chunks[0].nodes.tolist() == [0, 1, 2]


# ------------------------------------------------------------------ embedding.py
class TwoTables(nn.Module):
    """Two embeddings read the same token ids (the second by keyword); a learned position table is
    read with ids made by ``arange``; a Linear reads a float input given after the tokens."""

    def __init__(self):
        super().__init__()
        self.lin, self.e1, self.e2, self.pos = nn.Linear(2, 4), nn.Embedding(7, 4), nn.Embedding(7, 4), \
            nn.Embedding(3, 4)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens, x):
        h = self.lin(x)                                 # the float input is met first
        e = self.e1(tokens) + self.pos(torch.arange(3))
        return self.head(torch.cat([h, e, self.e2(input=tokens)], -1))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_embeddings_of_the_same_ids_share_the_input_token_nodes_ordered_by_input_position(capture):
    torch.manual_seed(0)
    g = _build(TwoTables(), (torch.randint(0, 7, (2, 3)), torch.randn(2, 3, 2)), capture)
    tok1, tok2 = part(g, "e1.weight")[0][:, 0], part(g, "e2.weight")[0][:, 0]
    pos = part(g, "pos.weight")[0][:, 0]
    xin = part(g, "lin.weight")[0][0]
    assert torch.equal(tok1, tok2) and tok1.unique().numel() == 7
    assert set(pos.tolist()).isdisjoint(tok1.tolist()) and pos.unique().numel() == 3
    for nodes in (tok1, pos, xin):
        assert torch.all(g.node_type[nodes] == int(NodeType.INPUT)) and torch.all(g.node_depth[nodes] == 0)
    # input order: the tokens (first argument), then x, then ids no input feeds
    assert g.node_io_index[tok1].tolist() == list(range(7))
    assert g.node_io_index[xin].tolist() == [7, 8]
    assert g.node_io_index[pos].tolist() == [9, 10, 11]
    assert kinds_of(g, "e1.weight") == {int(EdgeKind.EMBEDDING)}


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_an_embedding_is_one_layer_deeper_than_its_ids(capture):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3))
    g = _build(m, (torch.randint(0, 7, (2, 3)),), capture)
    tok, emb = part(g, "0.weight")
    head = part(g, "1.weight")[1][:, 0]
    assert torch.all(g.node_depth[tok[:, 0]] == 0)
    assert torch.allclose(g.node_depth[emb[0]], torch.full((4,), 0.5))
    assert torch.all(g.node_depth[head] == 1.0)
    assert torch.equal(part(g, "1.weight")[0][0], emb[0])


def test_embedding_mapper_on_ids_of_another_width_makes_fresh_token_nodes_one_layer_under_it():
    """Ids computed by a layer (their units not the vocabulary): fresh INPUT token nodes at depth 0, the
    embedding's units one deeper than the ids."""
    from l2o.graph.layers import map_embedding
    emb = nn.Embedding(7, 4)
    st = GraphState(emb)
    x = Val(own_nodes=st.new_nodes(5, NodeType.HIDDEN, 2), depth=2, fdim="last")
    out = map_embedding(st, emb, "e", [x], {})
    assert (out.depth, out.fdim) == (3, "last") and out.nodes.tolist() == [12, 13, 14, 15]
    assert st._type[5:12] == [int(NodeType.INPUT)] * 7 and st._depth[5:12] == [0] * 7
    assert st._type[12:] == [int(NodeType.HIDDEN)] * 4 and st._depth[12:] == [3] * 4
    (c,) = st.edge_chunks
    assert c.shape == (7, 4) and c.kind == EdgeKind.EMBEDDING
    assert torch.equal(c.src.expand(7, 4), torch.arange(5, 12).view(7, 1).expand(7, 4))
    assert torch.equal(c.dst.expand(7, 4), torch.arange(12, 16).view(1, 4).expand(7, 4))


class CatTables(nn.Module):
    """Two embeddings of the same ids side by side, concatenated along dim 2 ([B, T, 8])."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Embedding(7, 4), nn.Embedding(7, 4), nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(torch.cat([self.a(tokens), self.b(tokens)], dim=2))


def test_without_shapes_a_cat_of_embeddings_along_dim_2_is_a_feature_concat():
    """The fx capture without example inputs knows which dim holds an embedding's units only from what
    its mapper says ("last"): the head reads both tables' 8 units, as in the eager capture."""
    torch.manual_seed(0)
    m = CatTables()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx = build_graph(m, capture="fx", use_cache=False)
    eager = build(m, torch.randint(0, 7, (2, 3)))
    assert part(fx, "head.weight")[0][0].unique().numel() == 8
    assert canonical(fx) == canonical(eager)


# ------------------------------------------------------------------ conv.py
def test_kernels_of_more_than_three_spatial_dims_are_refused_by_name():
    from l2o.graph.layers.conv import kernel_offsets
    with pytest.raises(NotImplementedError, match=r"^kernels of 4 spatial dims$"):
        kernel_offsets((3, 3, 3, 3))
    assert torch.equal(kernel_offsets((3,)), torch.tensor([[0.0, -1.0], [0.0, 0.0], [0.0, 1.0]]))
    three = kernel_offsets((2, 3, 3))           # 3-D: the inner two axes' offsets, at every depth
    assert torch.equal(three, kernel_offsets((3, 3)).repeat(2, 1))


# ------------------------------------------------------------------ layers/__init__.py
class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own (a built-in kind that is not kept whole unless registered)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) * 2.0


def test_a_registered_subclass_of_a_built_in_with_its_own_forward_is_handed_to_its_mapper():
    from l2o.graph import register_module, unregister_module
    from l2o.graph.layers import keep_whole, mapper_for
    seen = []

    def mapper(ctx, m, x):
        seen.append(m)
        return ctx.linear(m.weight, x, m.bias)
    assert not keep_whole(ScaledLinear(3, 4))         # unregistered: its forward is recorded op by op
    register_module(ScaledLinear, mapper)
    try:
        m = nn.Sequential(nn.Linear(2, 3), ScaledLinear(3, 4))
        assert keep_whole(m[1]) and mapper_for(m[1]) is not None
        g = build(m, torch.randn(2, 2))
        assert seen == [m[1]]
        assert torch.equal(part(g, "1.weight")[0][0], part(g, "0.weight")[1][:, 0])
        assert torch.equal(part(g, "1.bias"), part(g, "1.weight")[1][:, 0])
    finally:
        unregister_module(ScaledLinear)
