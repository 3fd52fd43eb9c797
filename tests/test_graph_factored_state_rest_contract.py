"""Third pass over the factored graph (:mod:`l2o.graph.factored`,
:mod:`l2o.graph.factored_derive`, :mod:`l2o.graph.edge_factors`,
:mod:`l2o.graph.attention_ops`) and the builder's bookkeeping
(:mod:`l2o.graph.state`, :mod:`l2o.graph.values`): written against the
survivors among the mutants the two earlier runs (docs/mutation.md) never
reached (all 526 of them, in one mutmut run). Each test pins a behaviour
against a plain reference: the blocks, degrees and column tables of the
written per-edge tensors, the device of what is written, exact node lists,
return values and errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from l2o.fast.lean import materialized
from l2o.graph import blocks as blocks_mod
from l2o.graph import factored_derive
from l2o.graph.attention_ops import place_score_scales
from l2o.graph.factored import HEAVY, FactoredGraph
from l2o.graph.param_graph import EdgeKind, EntryKind, NodeType
from graph_helpers import build
from test_graph_factored import _compare
from test_graph_state_values_contract import _state

L = int(EdgeKind.LINEAR)


def _graph(*chunks, nodes=12):
    """A factored graph of edge chunks ``(shape, src, dst, kind, pos)`` on ``nodes`` hidden nodes."""
    st, m = _state(*(c[0] for c in chunks))
    st.new_nodes(nodes, NodeType.HIDDEN, 1)
    for k, (shape, src, dst, kind, pos) in enumerate(chunks):
        assert st.add_edges(getattr(m, f"p{k}"), shape, src, dst, kind, pos)
    g = st.finish([], [])
    assert isinstance(g, FactoredGraph)
    return g


def _rows(*v):
    return torch.tensor(v).view(-1, 1)


# ---------------------------------------------------------------- factored_derive
UNUSUAL = {
    # endpoints, kinds and positions with fewer dims than the weight (broadcast from the left)
    "short_ends": [((2, 3), torch.arange(3), _rows(3, 4), torch.tensor([L, L, int(EdgeKind.CONV)]),
                    torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]))],
    # kinds per row: row 1 equals row 0, row 2 does not (not column-static)
    "kind_rows_equal_then_differ": [((3, 2), torch.arange(2).view(1, 2), _rows(2, 3, 4), _rows(L, L, 0), None)],
    # both ends fixed by the row; as dst rows the source tables form groups of 2 that do not divide 3 rows,
    # as src rows the destination tables are one group per row
    "row_end_src_uneven_groups": [((3, 2), _rows(0, 0, 1), _rows(5, 6, 7), L, None)],
    # both ends fixed by the row; as dst rows groups of 2 rows whose tables differ within the second group
    "row_end_src_groups_not_shared": [((4, 3), _rows(0, 0, 1, 2), _rows(5, 5, 6, 6), L, None)],
    # an embedding's layout: the row is the source (token), the column the destination
    "embedding_layout": [((4, 3), _rows(0, 1, 2, 3), torch.arange(4, 7).view(1, 3), int(EdgeKind.EMBEDDING), None)],
    # a 0-d weight held by one edge, between two ordinary ones
    "scalar_weight": [((2, 3), torch.arange(3).view(1, 3), _rows(3, 4), L, None),
                      ((), torch.tensor(5), torch.tensor(6), L, None),
                      ((1, 2), torch.arange(2).view(1, 2), _rows(7), L, None)],
}


@pytest.mark.parametrize("case", UNUSUAL)
def test_unusual_chunks_give_the_blocks_degrees_and_column_tables_of_the_written_edges(case):
    """Blocks (kind, rows, groups, row end, nodes), degrees, column tables, ranges and run lengths
    derived from the factors equal those of the written per-edge tensors."""
    g = _graph(*UNUSUAL[case])
    _compare(g)
    got = [(type(b).__name__, getattr(b, "row_end", None), getattr(b, "groups", None))
           for b in blocks_mod.edge_blocks(g)]
    assert got == BLOCKS[case]


BLOCKS = {
    "short_ends": [("EdgeBlock", "dst", 1)],
    "kind_rows_equal_then_differ": [("EdgeBlock", "dst", 1)],
    "row_end_src_uneven_groups": [("EdgeBlock", "src", 3)],
    "row_end_src_groups_not_shared": [("EdgeBlock", "src", 2)],
    "embedding_layout": [("EdgeBlock", "src", 1)],
    "scalar_weight": [("EdgeBlock", "dst", 1), ("ScatterBlock", None, None), ("EdgeBlock", "dst", 1)],
}


class Layers(nn.Module):
    """Standard layers, with one-entry, one-row and one-column weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.a, self.one, self.b = nn.Linear(4, 5), nn.Linear(5, 1), nn.Linear(1, 3)
        self.unit, self.conv = nn.Linear(1, 1), nn.Conv1d(3, 4, 2)

    def forward(self, t):
        h = self.b(self.one(torch.relu(self.a(self.emb(t)))))          # [B, L, 3]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)                # [B, L - 1, 4]
        return h.sum(-1, keepdim=True) + self.unit(h[..., :1])


def test_dense_blocks_of_standard_layers_are_found_on_the_factors_without_writing_edges(monkeypatch):
    """The factored graph's point: a layer's dense block comes from its broadcast factors, never from
    its per-edge endpoints (the general detector, which would write them), also for weights of one
    entry, one row or one column; the blocks equal those of the written graph."""
    torch.manual_seed(0)
    g = build(Layers(), torch.randint(0, 7, (2, 5)))
    full = materialized(copy.copy(g))
    want = blocks_mod.edge_blocks(full)

    def general(*a, **k):
        raise AssertionError("per-edge endpoints written to find a dense block")
    monkeypatch.setattr(factored_derive, "detect_block", general)
    got = factored_derive.factored_edge_blocks(g)
    assert [type(b) for b in got] == [blocks_mod.EdgeBlock] * len(want) == [type(b) for b in want]
    for a, b in zip(got, want):
        assert (a.start, a.stop, a.groups, a.rows, a.cols, a.row_end) == \
            (b.start, b.stop, b.groups, b.rows, b.cols, b.row_end)
        assert torch.equal(a.row_nodes, b.row_nodes) and torch.equal(a.col_nodes, b.col_nodes)
    assert not any(g.is_written(n) for n in HEAVY)


# ---------------------------------------------------------------- factored
def _one_kind_graph():
    """Every edge a LINEAR edge (``edge_kind`` a constant view), no positions (``edge_pos`` zeros)."""
    return _graph(((2, 3), torch.arange(3).view(1, 3), _rows(3, 4), L, None),
                  ((3, 2), torch.arange(3, 5).view(1, 2), _rows(5, 6, 7), L, None))


def _mixed_graph():
    """Per-edge kinds (a tensor kind next to int kinds) and positions on some chunks only."""
    return _graph(((2, 3), torch.arange(3).view(1, 3), _rows(3, 4), L, torch.linspace(-1, 1, 6).view(2, 3, 1)),
                  ((3, 2), torch.arange(3, 5).view(1, 2), _rows(5, 6, 7), torch.tensor([L, 0]), None),
                  ((2, 2), torch.arange(5, 7).view(1, 2), _rows(8, 9), int(EdgeKind.CONV), None))


@pytest.mark.parametrize("make", [_one_kind_graph, _mixed_graph], ids=["one_kind", "mixed"])
def test_per_edge_tensors_of_a_moved_graph_are_written_on_its_device(make):
    """Reading a per-edge tensor of a graph moved to another device (``meta``: no data) writes it
    there, with the shape and dtype of the same tensor on the CPU."""
    g = make()
    h = g.to("meta")
    for name in HEAVY:
        got, want = getattr(h, name), getattr(g, name)
        assert got.device == torch.device("meta"), name
        assert got.shape == want.shape and got.dtype == want.dtype, name


# ---------------------------------------------------------------- attention_ops
def test_score_scales_go_on_heads_whose_units_are_one_node_each_and_each_scale_is_decided_alone():
    """``place_score_scales``: a per-head scale is node-held (NORM_WEIGHT) by the node of each head
    when every head's units (untracked -1 left out) are one node of their own, node 0 included; a
    scale whose heads' units stay apart, or whose heads share one node, is left unclaimed, and the
    scales after it are still placed."""
    st, m = _state((2, 1, 1), (2, 1, 1), (2, 1, 1), (1, 2))
    st.new_nodes(6, NodeType.HIDDEN, 1)
    apart = torch.tensor([[2, 3], [4, 5]])             # [H, D]: head 0's units are two nodes
    own = torch.tensor([[0, -1], [1, 1]])              # head 0 -> node 0 (and an untracked unit), head 1 -> node 1
    shared = torch.tensor([[4, 4], [4, 4]])            # both heads on node 4
    own_last = torch.tensor([[[3, 3], [5, 5]]])        # [B, H, D], the head dim of the parameter is dim 1
    rec = SimpleNamespace(state=st, score_scales=[(apart, 0, (2, 0)), (own, 1, (2, 0)), (shared, 2, (2, 0)),
                                                  (own_last, 3, (2, 1))])
    place_score_scales(rec)
    assert st.claimed == {1: "node", 3: "node"}
    placed = {c.param: (c.nodes.tolist(), c.kind) for c in st.entry_chunks}
    assert placed == {1: ([0, 1], int(EntryKind.NORM_WEIGHT)), 3: ([3, 5], int(EntryKind.NORM_WEIGHT))}


# ---------------------------------------------------------------- state
def test_add_edges_says_whether_it_placed_the_weight():
    """True for a model parameter placed now; False for a tensor that is not a model parameter, for
    None, for a parameter already node-held, and for a second use of an edge-held weight (merged)."""
    st, m = _state((2, 3), (3,))
    x, h = st.new_nodes(3, NodeType.INPUT, 0, input_group=0), st.new_nodes(2, NodeType.HIDDEN, 1)
    assert st.add_entries(m.p1, x, EntryKind.BIAS) is True
    src, dst = x.view(1, 3), h.view(2, 1)
    assert st.add_edges(torch.zeros(2, 3), (2, 3), src, dst, L) is False
    assert st.add_edges(None, (2, 3), src, dst, L) is False
    assert st.add_edges(m.p1, (1, 3), src, h[:1].view(1, 1), L) is False     # node-held already
    assert st.add_edges(m.p0, (2, 3), src, dst, L) is True
    assert st.add_edges(m.p0, (2, 3), src, dst, L) is False                   # used again
    assert [c.param for c in st.edge_chunks] == [0] and st.claimed == {1: "node", 0: "edge"}


@pytest.mark.parametrize("src,dst", [((1, 3), (3, 1)),      # broadcast to (3, 3), not the weight's (2, 3)
                                     ((1, 2), (2, 1)),      # a source per column of a 2-column weight
                                     ((1, 3), (3, 2)),      # destinations of a (3, 2) weight
                                     ((4,), (2, 1))],       # a source per column of 4 columns
                         ids=["both", "src", "dst", "short_src"])
def test_add_edges_refuses_endpoints_that_do_not_broadcast_to_the_weight(src, dst):
    """A mapper bug (endpoints not laid out like the weight) fails when the edges are added, not
    later when they are written."""
    st, m = _state((2, 3))
    st.new_nodes(12, NodeType.HIDDEN, 1)
    with pytest.raises(RuntimeError):
        st.add_edges(m.p0, (2, 3), torch.zeros(src, dtype=torch.long), torch.ones(dst, dtype=torch.long), L)
