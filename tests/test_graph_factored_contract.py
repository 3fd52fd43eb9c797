"""Contracts of the factored graph (l2o/graph/factored.py, factored_derive.py,
edge_factors.py) and of the eager capture's attention handlers
(l2o/graph/attention_ops.py), pinned against plain references: the written
per-edge tensors for the factors, and the exact unit structure of small
hand-written attentions for the handlers (the symmetry tests of
tests/test_graph_attention.py pass on a graph with less structure too)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_helpers import build, kinds, not_followed, part
from l2o.fast.lean import materialized
from l2o.fast import plan as plan_mod
from l2o.graph import blocks as blocks_mod
from l2o.graph.edge_factors import compact
from l2o.graph.factored import HEAVY, FactoredGraph
from l2o.graph.param_graph import EdgeKind, EntryKind, NodeType, ParamGraph
from test_graph_factored import _build, _hand_built

E, H = 8, 2
D = E // H


# ------------------------------------------------------------------ attention: q/k pairs, v units
class Attn(nn.Module):
    """Multi-head self-attention written out: ``q @ k^T`` (``mode="matmul"``)
    or ``F.scaled_dot_product_attention`` (``"sdpa"``, ``"sdpa_kw"``), with
    ``kv`` key/value heads (grouped-query when fewer than ``H``); ``term``
    adds a score term (see ``scores``)."""

    def __init__(self, mode="matmul", kv=H, term=None, L=5):
        super().__init__()
        self.mode, self.kv, self.term, self.L = mode, kv, term, L
        self.q = nn.Linear(E, E)
        self.k = nn.Linear(E, kv * D)
        self.v = nn.Linear(E, kv * D)
        self.o = nn.Linear(E, E)
        if term in ("t5", "t5_first", "t5_batch"):
            self.rel = nn.Embedding(2 * L, H)
        elif term == "one_column":
            self.rel = nn.Embedding(2 * L, 1)
        elif term in ("table", "table_twice"):
            self.table = nn.Parameter(torch.randn(2 * L - 1, H))
        elif term == "big_table":                       # sized for longer sequences: rows 0 and 2L.. unread
            self.table = nn.Parameter(torch.randn(2 * L + 3, H))
        elif term == "shared_row":
            self.table = nn.Parameter(torch.randn(H, 2 * L - 1))
        elif term == "shared_bias":
            self.bias = nn.Parameter(torch.randn(L, L))
        elif term == "temperature":
            self.temp = nn.Linear(E, H)
        elif term == "synth":
            self.synth = nn.Linear(E, H * L)
        elif term == "query_gate":
            self.gate = nn.Linear(E, 1)
        elif term == "dense":
            self.bias = nn.Parameter(torch.randn(H, L, L))
        if term == "logit_scale":
            self.rel = nn.Embedding(2 * L, H)
        if term in ("logit_scale", "logit_scale_alone"):
            self.logit_scale = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def heads(self, t, n):
        return t.unflatten(-1, (n, D)).transpose(-3, -2)          # [(B,) n, L, D]

    def rel_index(self):
        i = torch.arange(self.L)
        return i.view(-1, 1) - i.view(1, -1) + self.L - 1      # [L, L], values 0 .. 2L-2

    def score_term(self, x=None):
        if self.term in ("t5", "t5_first", "logit_scale", "one_column"):
            return self.rel(self.rel_index()).permute(2, 0, 1)                 # [H (or 1), L, L]
        if self.term == "t5_batch":
            return self.rel(self.rel_index()).permute(2, 0, 1).expand(x.shape[0], H, self.L, self.L)
        if self.term == "big_table":
            return self.table[self.rel_index().reshape(-1) + 1].view(self.L, self.L, H).permute(2, 0, 1)
        if self.term == "shared_row":
            return self.table[[1] * H][:, self.rel_index()]                    # both heads read row 1
        if self.term == "shared_bias":
            return self.bias
        if self.term == "synth":                        # scores predicted per key position from the input
            return self.synth(x).unflatten(-1, (H, self.L)).transpose(-3, -2)
        if self.term == "query_gate":
            return self.gate(x)                         # [L, 1]: one node
        if self.term == "temperature":
            return None
        if self.term in ("table", "table_twice"):
            return self.table[self.rel_index().reshape(-1)].view(self.L, self.L, H).permute(2, 0, 1)
        if self.term == "dense":
            return self.bias
        return None

    def forward(self, x):                               # x: [B, L, E] or [L, E]
        first = self.score_term(x) if self.term == "t5_first" else None
        q, k, v = self.heads(self.q(x), H), self.heads(self.k(x), self.kv), self.heads(self.v(x), self.kv)
        if self.mode == "matmul":
            if self.kv != H:
                k, v = (t.repeat_interleave(H // self.kv, dim=-3) for t in (k, v))
            s = q @ k.transpose(-2, -1)
            s = s / math.sqrt(D)
            if self.term in ("logit_scale", "logit_scale_alone"):
                s = s * self.logit_scale
            if self.term == "temperature":              # a per-head factor computed from the input
                s = s * self.temp(x.mean(-2)).unsqueeze(-1).unsqueeze(-1)
            term = first if first is not None else self.score_term(x)
            if term is not None:
                s = s + term
            if self.term == "table_twice":
                s = s + term
            y = s.softmax(-1) @ v
        else:
            mask = first if first is not None else self.score_term(x)
            gqa = {"enable_gqa": True} if self.kv != H else {}
            if self.mode == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, mask, **gqa)
            else:
                y = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, **gqa)
        return self.o(y.transpose(-3, -2).flatten(-2))


def _attn_graph(strict=True, batch=(2,), **kw):
    torch.manual_seed(0)
    m = Attn(**kw)
    g = build(m, torch.randn(*batch, m.L, E), strict=strict)
    assert g.capture == "eager" and not_followed(g) == [], g.notes
    return m, g


def _units(g, name):
    return part(g, f"{name}.weight")[1][:, 0]


@pytest.mark.parametrize("mode", ["matmul", "sdpa", "sdpa_kw"])
@pytest.mark.parametrize("kv", [H, 1])
@pytest.mark.parametrize("shape", ["batched", "unbatched", "one_token"])
def test_query_and_key_units_pair_per_head_and_the_output_reads_the_value_units(mode, kv, shape):
    """q unit (h, j) and the k unit (h', j) of its key head h' (h' = h for
    plain attention, h // (H / kv) for grouped-query) are one node; the
    attention output carries the value units (each value head repeated for
    the query heads it serves), so the output projection reads them. Also
    for unbatched inputs ``[L, E]`` and a sequence of one token."""
    _, g = _attn_graph(mode=mode, kv=kv, batch=() if shape == "unbatched" else (2,), L=1 if shape == "one_token" else 5)
    q, k, v = _units(g, "q").view(H, D), _units(g, "k").view(kv, D), _units(g, "v").view(kv, D)
    rep = H // kv
    assert torch.equal(q, k.repeat_interleave(rep, 0))
    assert q.unique().numel() == kv * D and v.unique().numel() == kv * D
    assert not set(v.flatten().tolist()) & set(q.flatten().tolist())
    o_src = part(g, "o.weight")[0]
    assert torch.equal(o_src, v.repeat_interleave(rep, 0).reshape(1, E).expand(E, E))
    # the attention output keeps the depth of the value units: the output projection is a layer deeper
    assert bool((g.node_depth[_units(g, "o")] > g.node_depth[v.flatten()].max()).all())



class Products(nn.Module):
    """Products the attention handler meets outside multi-head attention."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        if form == "pooling":
            self.score = nn.Linear(E, 1)
        self.register_buffer("mix", torch.randn(E, E))

    def forward(self, x):                               # x: [L, E], unbatched
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.form in ("unbatched", "single_head"):   # one head, x [L, E] or [B, L, E]
            y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        elif self.form == "pooling":                    # a 1-D weight vector times the values
            w = self.score(x).squeeze(-1).softmax(-1)
            y = (w @ v).expand_as(v)
        elif self.form == "constant_left":              # a fixed causal average of the values
            L = x.shape[0]
            avg = torch.tril(torch.ones(L, L)) / torch.arange(1, L + 1).view(L, 1)
            y = avg @ v
        else:                                           # "constant_right": values times a fixed matrix
            y = (v @ self.mix) + q + k
        return self.o(y)


@pytest.mark.parametrize("form", ["unbatched", "single_head", "constant_left"])
def test_a_product_with_the_values_on_the_right_carries_their_units(form):
    """Single-head attention (``q @ k^T`` on ``[L, E]`` or ``[B, L, E]``: q
    and k units one node each) and a constant matrix times the values: the
    product carries the value units, which the output projection reads."""
    torch.manual_seed(0)
    g = build(Products(form), torch.randn(*((2,) if form == "single_head" else ()), 5, E))
    assert g.capture == "eager" and not_followed(g) == [], g.notes
    q, k, v = _units(g, "q"), _units(g, "k"), _units(g, "v")
    if form != "constant_left":
        assert torch.equal(q, k) and q.unique().numel() == E
    else:
        assert not bool(torch.isin(q, k).any())
    assert torch.equal(part(g, "o.weight")[0], v.view(1, E).expand(E, E))


@pytest.mark.parametrize("form", ["pooling", "constant_right"])
def test_products_the_handler_does_not_structure_are_followed_without_errors(form):
    """A 1-D weight vector times the values, the values times a constant
    matrix: nothing to pair, and no error noted."""
    torch.manual_seed(0)
    g = build(Products(form), torch.randn(5, E), strict=False)
    assert g.capture == "eager" and not_followed(g) == [], g.notes
    assert not bool(torch.isin(_units(g, "v"), part(g, "o.weight")[0]).any())


class Depths(nn.Module):
    """A product, then two layers."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        if form == "deep_left":
            self.m1, self.m2, self.v = nn.Linear(E, E), nn.Linear(E, 5), nn.Linear(E, E)
        else:
            self.ln = nn.LayerNorm(E)
        self.o, self.p = nn.Linear(E, E), nn.Linear(E, 3)

    def forward(self, x):                               # x: [5, E]
        if self.form == "deep_left":                    # a mixing matrix two layers deep times values one deep
            y = self.m2(torch.relu(self.m1(x))) @ self.v(x)
        else:                                           # a constant matrix times the normalised input
            y = torch.tril(torch.ones(5, 5)) / 5 @ self.ln(x)
        return self.p(torch.relu(self.o(y)))


@pytest.mark.parametrize("form,depth", [("deep_left", 0.75), ("constant_left", 0.5)])
def test_a_product_is_as_deep_as_its_deeper_operand(form, depth):
    """The layer after a product sits one level above the deeper operand
    (a constant operand has no depth): depths 3 of 4 with the mixing matrix
    two layers deep, 1 of 2 after the input."""
    torch.manual_seed(0)
    g = build(Depths(form), torch.randn(5, E))
    assert not_followed(g) == [], g.notes
    assert torch.equal(g.node_depth[_units(g, "o")], torch.full((E,), depth))

# ------------------------------------------------------------------ attention: score terms
@pytest.mark.parametrize("term,batch", [("t5", (2,)), ("t5", ()), ("t5_first", (2,)), ("t5_batch", (3,))],
                         ids=["batched", "unbatched", "computed_first", "expanded_over_the_batch"])
@pytest.mark.parametrize("mode", ["matmul", "sdpa", "sdpa_kw"])
def test_a_per_head_score_bias_makes_each_heads_query_key_units_one_node(mode, term, batch):
    """T5's form: an embedding from relative-position buckets to heads added
    to the scores (after a scale): head h's q/k units and the table's column-h
    node are one node; v units stay apart. Also when the bias is computed
    before the projections, and when it is expanded over the batch."""
    _, g = _attn_graph(mode=mode, term=term, batch=batch)
    src, dst = part(g, "rel.weight")                     # [2L, H]: bucket r -> head h
    heads = dst[0]
    assert heads.unique().numel() == H and torch.equal(dst, heads.expand_as(dst))
    q, k = _units(g, "q").view(H, D), _units(g, "k").view(H, D)
    assert torch.equal(q, heads.view(H, 1).expand(H, D)) and torch.equal(k, q)
    assert _units(g, "v").unique().numel() == E and not bool(torch.isin(_units(g, "v"), heads).any())


@pytest.mark.parametrize("batch", [(2,), ()], ids=["batched", "unbatched"])
@pytest.mark.parametrize("mode", ["matmul", "sdpa", "sdpa_kw"])
def test_a_parameter_table_added_to_the_scores_maps_positions_to_heads(mode, batch):
    """Swin's form: ``table[rel_index]`` ([2L-1, H]) added to the scores is an
    embedding from 2L-1 new INPUT position nodes to H new head nodes (EMBEDDING
    edges), head node h one with head h's q/k units."""
    m, g = _attn_graph(mode=mode, term="table", batch=batch)
    src, dst = part(g, "table")
    R = 2 * m.L - 1
    pos, heads = src[:, 0], dst[0]
    assert torch.equal(src, pos.view(R, 1).expand(R, H)) and torch.equal(dst, heads.expand(R, H))
    assert pos.unique().numel() == R and heads.unique().numel() == H
    assert bool((g.node_type[pos] == NodeType.INPUT).all()) and bool((g.node_type[heads] == NodeType.HIDDEN).all())
    assert bool((g.node_depth[pos] == 0).all())         # inputs, like the network's
    assert bool((kinds(g, "table") == EdgeKind.EMBEDDING).all())
    q = _units(g, "q").view(H, D)
    assert torch.equal(q, heads.view(H, 1).expand(H, D)) and torch.equal(_units(g, "k").view(H, D), q)


def test_a_dense_learned_bias_is_a_table_from_score_positions_to_heads():
    """A learned ``[H, L, L]`` bias: its head dim is dim 0, so entry
    ``bias[h, i, j]`` is the edge from position node ``(i, j)`` to head h."""
    m, g = _attn_graph(mode="matmul", term="dense")
    src, dst = part(g, "bias")                           # [H, L, L]
    L = m.L
    pos, heads = src[0].reshape(-1), dst[:, 0, 0]
    assert torch.equal(src, pos.view(1, L, L).expand(H, L, L))
    assert torch.equal(dst, heads.view(H, 1, 1).expand(H, L, L))
    assert pos.unique().numel() == L * L and bool((g.node_type[pos] == NodeType.INPUT).all())
    assert torch.equal(_units(g, "q").view(H, D), heads.view(H, 1).expand(H, D))


def test_a_score_table_met_twice_is_mapped_once():
    m, g = _attn_graph(mode="matmul", term="table_twice")
    src, dst = part(g, "table")
    assert src[:, 0].unique().numel() == 2 * m.L - 1 and dst[0].unique().numel() == H
    assert torch.equal(_units(g, "q").view(H, D), dst[0].view(H, 1).expand(H, D))


def test_a_per_head_logit_scale_sits_on_the_head_nodes():
    """Swinv2's form: a ``[H, 1, 1]`` scale multiplied into the scores, whose
    heads a score bias made one node each: entry h is node-held (NORM_WEIGHT)
    by head h's node."""
    _, g = _attn_graph(mode="matmul", term="logit_scale")
    heads = part(g, "rel.weight")[1][0]
    assert torch.equal(part(g, "logit_scale").flatten(), heads)
    assert bool((kinds(g, "logit_scale") == EntryKind.NORM_WEIGHT).all())


def test_a_logit_scale_on_heads_whose_units_stay_apart_is_left_alone():
    _, g = _attn_graph(strict=False, mode="matmul", term="logit_scale_alone")
    assert bool((kinds(g, "logit_scale") == EntryKind.FALLBACK).all())
    assert _units(g, "q").unique().numel() == E


# ------------------------------------------------------------------ factors: compact, moves, writes
def test_compact_cuts_exactly_the_broadcast_dims_to_one():
    base = torch.arange(6).view(1, 6, 1)
    t = base.expand(5, 6, 2)                       # dims 0 and 2 broadcast
    c = compact(t)
    assert c.shape == (1, 6, 1) and torch.equal(c.expand(t.shape), t)
    assert compact(torch.tensor(7).expand(3, 4)).shape == (1, 1)
    dense = torch.arange(12).view(3, 4)
    assert compact(dense) is dense                  # nothing broadcast: the tensor itself
    one = torch.arange(3).view(3, 1)                # a size-1 dim (stride 1) is left as it is
    assert compact(one) is one
    single = torch.arange(4).view(4, 1).expand(4, 1)
    assert compact(single).shape == (4, 1)


def _chunks_equal(a, b, device):
    assert (a.num_edges, a.one_kind, a.any_pos, a.pos_dtype) == (b.num_edges, b.one_kind, b.any_pos, b.pos_dtype)
    assert len(a.chunks) == len(b.chunks)
    for x, y in zip(a.chunks, b.chunks):
        assert (x.start, x.stop, x.shape) == (y.start, y.stop, y.shape)
        for f in ("src", "dst", "kind", "pos"):
            u, w = getattr(x, f), getattr(y, f)
            if isinstance(u, torch.Tensor):
                assert isinstance(w, torch.Tensor) and w.device == torch.device(device) and w.shape == u.shape \
                       and w.dtype == u.dtype, f
            else:
                assert w == u and type(w) is type(u), f


def test_moving_a_factored_graph_moves_its_factors_and_drops_what_was_written():
    """``to`` another device: every factor tensor moves (int kinds and absent
    positions stay as they are), the other fields move, and per-edge tensors
    already written are not carried (they are written again from the moved
    factors when read). ``to`` the same device keeps them."""
    g = _hand_built()
    f = g.edge_factors
    assert any(isinstance(c.kind, int) for c in f.chunks) and any(isinstance(c.kind, torch.Tensor) for c in f.chunks)
    assert any(c.pos is None for c in f.chunks) and any(c.pos is not None for c in f.chunks)
    written = g.edge_index
    h = g.to("meta")
    assert type(h) is FactoredGraph and h.device == torch.device("meta")
    _chunks_equal(f, h.edge_factors, "meta")
    assert not any(h.is_written(n) for n in HEAVY)
    assert h.node_type.device == torch.device("meta") and h.num_edges == g.num_edges
    assert h.param_names == g.param_names and h.has_edge_pos == g.has_edge_pos
    _, one = _build("mlp")                              # every edge of one kind: kept as such
    assert one.edge_factors.one_kind is not None
    _chunks_equal(one.edge_factors, one.to("meta").edge_factors, "meta")
    same = g.to("cpu")
    assert type(same) is FactoredGraph and same.edge_factors is f
    assert same.is_written("edge_index") and same.edge_index is written
    assert not same.is_written("edge_kind")
    # a graph whose factors were dropped moves as a plain ParamGraph
    g.edge_kind = g.edge_kind.clone()
    moved = g.to("cpu")
    assert type(moved) is ParamGraph and torch.equal(moved.edge_index, g.edge_index)


def test_reading_writes_one_tensor_and_assigning_writes_them_all():
    g = _hand_built()
    full = materialized(copy.copy(g))
    assert g.num_edges == full.edge_index.shape[1]
    assert not any(g.is_written(n) for n in HEAVY)
    assert torch.equal(g.edge_kind, full.edge_kind)
    assert g.is_written("edge_kind") and not g.is_written("edge_pos") and g.edge_factors is not None
    new = full.edge_pos.clone() + 1
    g.edge_pos = new
    assert g.edge_factors is None and all(g.is_written(n) for n in HEAVY)
    assert g.edge_pos is new
    for n in ("edge_index", "edge_kind", "tensor_id"):
        assert torch.equal(getattr(g, n), getattr(full, n)), n
    assert g.num_edges == full.num_edges
    g.edge_kind = full.edge_kind                        # assigning again: nothing left to write
    assert g.edge_kind is full.edge_kind and g.edge_pos is new


def test_every_range_of_the_per_edge_tensors_is_the_written_slice():
    """``entry_slice`` over every pair of chunk boundaries (+-1) and the empty
    ranges, against slices of the written tensors: shapes and dtypes too."""
    g = _hand_built()
    full = materialized(copy.copy(g))
    cuts = sorted({x for c in g.edge_factors.chunks for y in (c.start, c.stop) for x in (y - 1, y, y + 1)
                   if 0 <= x <= g.num_edges})
    for s in cuts:
        for e in cuts:
            if e < s:
                continue
            for field in ("edge_index", "edge_kind", "edge_pos"):
                want = full.edge_index[:, s:e] if field == "edge_index" else getattr(full, field)[s:e]
                got = g.entry_slice(field, s, e)
                assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), (field, s, e)
    # fields that are not per-edge, or per-entry and cheap: the plain slice
    assert torch.equal(g.entry_slice("entry_node", 1, 3), full.entry_node[1:3])
    assert torch.equal(g.entry_slice("tensor_id", 20, 50), full.tensor_id[20:50])
    assert not any(g.is_written(n) for n in ("edge_index", "edge_kind", "edge_pos"))


def test_per_edge_tensors_keep_the_default_dtype_of_the_build():
    """Positions are in the default dtype at build time, whatever it is when
    they are read or derived."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        g = build(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 4), nn.ReLU(), nn.Linear(4, 2)),
                  torch.randn(2, 2, 8))
        _, plain = _build("mlp")
    finally:
        torch.set_default_dtype(old)
    f = g.edge_factors
    assert f.pos_dtype == torch.float64 and f.any_pos and any(c.pos is None for c in f.chunks)
    n = g.num_edges
    for c in f.chunks:                                  # ranges within each chunk, with and without positions
        assert g.entry_slice("edge_pos", c.start, c.stop).dtype == torch.float64
    assert g.entry_slice("edge_pos", 0, n).dtype == torch.float64
    values, _ = g.run_lengths("edge_pos")
    assert values.dtype == torch.float64
    for b in blocks_mod.edge_blocks(g):
        if isinstance(b, blocks_mod.EdgeBlock):
            found = g.column_static(b)
            if found not in (None, False):
                assert found[1].dtype == torch.float64
    assert g.edge_pos.dtype == torch.float64
    assert not plain.edge_factors.any_pos and plain.edge_pos.dtype == torch.float64
    assert plain.edge_pos.shape == (plain.num_edges, 2) and not bool(plain.edge_pos.any())



def test_ranges_of_a_moved_graph_are_on_its_device():
    """``entry_slice`` of a graph moved to another device (``meta``: no data)
    builds every range there, the empty ones too, with the shapes and dtypes
    of the same ranges on the CPU."""
    g = _hand_built()
    h = g.to("meta")
    n = g.num_edges
    for s, e in ((0, n), (3, 3), (n - 4, n), (30, 60)):
        for field in ("edge_index", "edge_kind", "edge_pos"):
            got, want = h.entry_slice(field, s, e), g.entry_slice(field, s, e)
            assert got.device == torch.device("meta") and got.shape == want.shape and got.dtype == want.dtype
    written = copy.copy(g)
    written.edge_kind = written.edge_kind.clone()       # factors dropped: moves as a ParamGraph
    moved = written.to("meta")
    assert type(moved) is ParamGraph and moved.edge_index.device == torch.device("meta")


def test_a_written_index_is_sliced_along_the_edges():
    g = _hand_built()
    full = g.edge_index                                 # written now
    assert g.is_written("edge_index") and g.edge_factors is not None
    for s, e in ((0, g.num_edges), (5, 40), (7, 7)):
        assert torch.equal(g.entry_slice("edge_index", s, e), full[:, s:e])



def test_a_table_with_rows_the_scores_never_read_is_still_a_table():
    m, g = _attn_graph(mode="matmul", term="big_table")
    src, dst = part(g, "table")
    R = 2 * m.L + 3
    assert src[:, 0].unique().numel() == R and torch.equal(dst, dst[0].expand(R, H))
    assert bool((kinds(g, "table") == EdgeKind.EMBEDDING).all())
    assert torch.equal(_units(g, "q").view(H, D), dst[0].view(H, 1).expand(H, D))


@pytest.mark.parametrize("term,batch", [("temperature", (2,)), ("synth", (2,)), ("query_gate", ()),
                                        ("one_column", (2,)), ("shared_bias", (2,)), ("shared_row", (2,))])
def test_score_terms_that_are_not_per_head_leave_the_heads_units_apart(term, batch):
    """A per-head factor computed from the input (multiplied, not added),
    scores predicted per key position, a one-node term, a bias column shared
    by the heads, a ``[L, L]`` bias all heads share, a table row two heads
    read: q/k units stay pairs of units (one node per q/k pair, none joined
    to a head), and nothing is noted."""
    _, g = _attn_graph(mode="matmul", term=term, batch=batch, strict=False)
    q, k = _units(g, "q"), _units(g, "k")
    assert torch.equal(q, k) and q.unique().numel() == E
    for name in ("bias", "table"):
        if name in g.param_names:
            assert not bool((kinds(g, name) == EdgeKind.EMBEDDING).any())


class OddSizes(nn.Module):
    """A one-entry bias and a zero-size layer next to ordinary ones."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.z = nn.Linear(4, 3), nn.Linear(3, 1), nn.Linear(3, 0)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return torch.cat([self.b(h), self.z(h)], -1)


def _derivation_graphs():
    """(graph, whether its chunks are laid out like the weights: built by the capture)"""
    yield _hand_built(), False
    for name in ("grouped_conv_flatten", "conv_bn_flatten", "mha_transformer"):
        yield _build(name)[1], True
    torch.manual_seed(0)
    yield build(OddSizes(), torch.randn(2, 4), strict=False), True


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_run_lengths_and_column_tables_come_from_the_factors_and_equal_the_written_ones():
    """On a graph nothing was written of, ``run_lengths`` answers for every
    per-entry tensor (None exactly for a stride-0 constant view) and
    ``column_static`` for every dense block, with the values the written
    tensors give; a written tensor, ``edge_index`` or a graph without
    factors get False (the caller reads the written tensor)."""
    for g, standard in _derivation_graphs():
        assert not any(g.is_written(n) for n in HEAVY)
        full = materialized(copy.copy(g))
        for name in ("tensor_id", "edge_kind", "edge_pos"):
            got = g.run_lengths(name)
            t = getattr(full, name)
            values, counts = torch.unique_consecutive(t, return_counts=True, dim=0)
            if got is None:
                assert t.stride(0) == 0 and values.shape[0] <= 1, name
            else:
                assert got is not False, name
                assert torch.equal(got[0], values) and torch.equal(got[1], counts), name
                assert got[0].dtype == values.dtype and got[1].dtype == counts.dtype, name
        for b in blocks_mod.edge_blocks(g):
            if not isinstance(b, blocks_mod.EdgeBlock):
                continue
            got, want = g.column_static(b), plan_mod._column_static(full, b)
            if got is False:                            # a chunk whose rows do not line up with the block's
                assert not standard
                continue
            assert (got is None) == (want is None)
            if got is not None:
                assert torch.equal(got[0], want[0]) and got[0].dtype == torch.long
                assert torch.equal(got[1], want[1]) and got[1].dtype == want[1].dtype
        assert g.run_lengths("edge_index") is False and g.run_lengths("entry_node") is False
        assert not any(g.is_written(n) for n in HEAVY)
        g.edge_kind                                      # noqa: B018  (written now)
        assert g.run_lengths("edge_kind") is False
        assert g.edge_components() == full.edge_components()
        g.edge_index = full.edge_index                  # factors dropped
        assert g.run_lengths("edge_pos") is False and g.run_lengths("tensor_id") is False
        for b in blocks_mod.edge_blocks(full):
            assert g.column_static(b) is False
        assert g.edge_components() == full.edge_components()


class GroupedQuery(nn.Module):
    """Four query heads on two key/value heads (``enable_gqa``), head size 2."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(E, 8), nn.Linear(E, 4), nn.Linear(E, 4), nn.Linear(8, E)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (-1, 2)).transpose(-3, -2) for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(-3, -2).flatten(-2))


@pytest.mark.parametrize("batch", [(2,), ()], ids=["batched", "unbatched"])
def test_grouped_query_heads_pair_with_their_key_value_head(batch):
    """Query heads 2h and 2h+1 pair with key head h, and the output carries
    value head h for both (the output projection reads it twice)."""
    torch.manual_seed(0)
    g = build(GroupedQuery(), torch.randn(*batch, 5, E))
    assert not_followed(g) == [], g.notes
    q, k, v = _units(g, "q").view(4, 2), _units(g, "k").view(2, 2), _units(g, "v").view(2, 2)
    assert torch.equal(q, k.repeat_interleave(2, 0)) and k.unique().numel() == 4
    assert torch.equal(part(g, "o.weight")[0][0], v.repeat_interleave(2, 0).flatten())
