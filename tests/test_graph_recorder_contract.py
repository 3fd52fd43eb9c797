"""The eager capture's recorder (:mod:`l2o.graph.recorder`): the shadows it
makes for inputs, the columns and values it hands to layer mappers, what a
mapper's output is given, and which pairs of units it merges -- each against
a reference worked by hand, on a bare :class:`~l2o.graph.state.GraphState`, or
through ``build_graph`` on a small model. Written against the survivors of a
mutation run over the module (docs/mutation.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_helpers import build, not_followed, part
from l2o.graph import register_module, unregister_module
from l2o.graph.param_graph import NodeType
from l2o.graph.recorder import Recorder
from l2o.graph.shadows import TensorInfo, along
from l2o.graph.state import GraphState
from l2o.graph.values import LazyNodes, TupleVal, Val

HIDDEN, INPUT = int(NodeType.HIDDEN), int(NodeType.INPUT)


def _recorder(nodes: int = 0):
    """A recorder on a bare state that already holds ``nodes`` HIDDEN nodes 0..nodes-1."""
    model = nn.Linear(2, 2)
    state = GraphState(model)
    if nodes:
        state.new_nodes(nodes, NodeType.HIDDEN, 0)
    return Recorder(state, model, None, None, None)


def _types(rec, nodes):
    return [rec.state.node_type_of(int(i)) for i in nodes]


def _depths(rec, nodes):
    return [rec.state._depth[int(i)] for i in nodes]


def _roots(rec):
    return [rec.state.find(i) for i in range(rec.state.num_raw_nodes)]


# ------------------------------------------------------------------ shadow_of
def test_a_lazy_input_gets_its_nodes_on_the_asked_dim_and_keeps_them():
    rec = _recorder()
    x, lz = torch.zeros(2, 3, 4), LazyNodes(NodeType.INPUT, group=0)
    info = TensorInfo(lazy=lz)
    sh = rec.shadow_of(x, info, 1)
    assert torch.equal(sh, torch.arange(3).view(1, 3, 1).expand(2, 3, 4))
    assert _types(rec, range(3)) == [INPUT] * 3 and rec.state.num_raw_nodes == 3
    assert info.sh is sh and info.lazy is None and torch.equal(lz.nodes, torch.arange(3))
    assert rec.shadow_of(x, info, 2) is sh            # known now: no new nodes
    assert rec.state.num_raw_nodes == 3


def test_a_lazy_input_met_at_another_width_gets_fresh_hidden_units_at_its_depth():
    """The input's nodes were made 3 wide; a view of it read 5 wide (a transpose)
    gets 5 HIDDEN units at the input's depth, and the input keeps its 3."""
    rec = _recorder()
    lz = LazyNodes(NodeType.INPUT, group=0, depth=2)
    rec.shadow_of(torch.zeros(5, 3), TensorInfo(lazy=lz, depth=2), -1)
    view = TensorInfo(lazy=lz, depth=2)
    sh = rec.shadow_of(torch.zeros(3, 5), view, -1)
    assert torch.equal(sh, torch.arange(3, 8).expand(3, 5))
    assert _types(rec, range(8)) == [INPUT] * 3 + [HIDDEN] * 5
    assert _depths(rec, range(3, 8)) == [2] * 5
    assert torch.equal(lz.nodes, torch.arange(3)) and view.sh is sh and view.lazy is None


def test_a_scalar_input_is_one_unit():
    rec = _recorder()
    info = TensorInfo(lazy=LazyNodes(NodeType.INPUT, group=0))
    sh = rec.shadow_of(torch.tensor(1.5), info, -1)
    assert sh.shape == () and int(sh) == 0 and rec.state.num_raw_nodes == 1
    assert _types(rec, [0]) == [INPUT]


def test_a_tensor_without_nodes_gets_fresh_hidden_units_at_its_depth():
    rec = _recorder(2)
    x = torch.zeros(2, 3, 4)
    sh = rec.shadow_of(x, None, 1)                    # untracked: depth 0
    assert torch.equal(sh, along(torch.arange(2, 5), x.shape, 1))
    assert _types(rec, range(2, 5)) == [HIDDEN] * 3 and _depths(rec, range(2, 5)) == [0] * 3
    info = TensorInfo(depth=3)
    sh = rec.shadow_of(x, info, -1)
    assert torch.equal(sh, along(torch.arange(5, 9), x.shape, -1))
    assert _types(rec, range(5, 9)) == [HIDDEN] * 4 and _depths(rec, range(5, 9)) == [3] * 4
    assert info.sh is sh and info.lazy is None


def test_a_layer_norm_of_a_parameter_puts_its_entries_on_fresh_units():
    """``F.layer_norm(latents, ...)`` (Perceiver-style learned queries): the
    normalised parameter has no units of its own, so it gets 4 fresh HIDDEN
    ones; the norm's scale and shift sit on them, and the add merges them with
    ``inp``'s outputs, which the head reads."""
    class Latents(nn.Module):
        def __init__(self):
            super().__init__()
            self.lat = nn.Parameter(torch.randn(3, 4))
            self.ln, self.inp, self.fc = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.layer_norm(self.lat, (4,), self.ln.weight, self.ln.bias) + self.inp(x))
    torch.manual_seed(0)
    g = build(Latents(), torch.randn(3, 4), strict=False)
    assert not_followed(g) == []
    units = part(g, "inp.weight")[1][:, 0]
    assert torch.equal(part(g, "ln.weight"), units) and torch.equal(part(g, "ln.bias"), units)
    assert torch.equal(part(g, "fc.weight")[0][0], units)
    assert (g.node_type[units] == HIDDEN).all()


# ------------------------------------------------------------------ val
def test_a_lazy_value_keeps_its_depth_and_a_scalar_its_depth_only():
    rec = _recorder()
    lz = LazyNodes(NodeType.HIDDEN, group=-1, depth=2)
    t, s = torch.zeros(2, 3), torch.tensor(2.0)
    rec.set(t, TensorInfo(lazy=lz, depth=2))
    v = rec.val(t)
    assert v.lazy is lz and v.depth == 2 and v.own_nodes is None
    rec.set(s, TensorInfo(sh=torch.tensor(4), depth=3))
    v = rec.val(s)
    assert v == Val(depth=3)


def test_a_flattened_map_is_read_as_its_channels_with_their_spatial_shape():
    """A [B, 3 x 2] tensor whose last dim is 3 channels x 2 positions: the
    mapper sees the 3 channel units and the spatial shape (2,)."""
    rec = _recorder(3)
    t = torch.zeros(4, 6)
    rec.set(t, TensorInfo(sh=torch.tensor([0, 0, 1, 1, 2, 2]).expand(4, 6), depth=1, spatial=(2,)))
    v = rec.val(t)
    assert torch.equal(v.own_nodes, torch.tensor([0, 1, 2]))
    assert v.spatial == (2,) and v.depth == 1 and v.fdim != "chan"
    # a spatial shape that does not divide the width: each column is a unit
    u = torch.zeros(4, 6)
    rec.set(u, TensorInfo(sh=torch.tensor([0, 0, 1, 1, 2, 2]).expand(4, 6), depth=1, spatial=(4,)))
    v = rec.val(u)
    assert torch.equal(v.own_nodes, torch.tensor([0, 0, 1, 1, 2, 2])) and v.spatial is None


def test_only_dim_one_of_a_map_is_a_channel_dim():
    rec = _recorder(3)
    flat, img = torch.zeros(2, 3), torch.zeros(2, 3, 5)
    rec.set(flat, TensorInfo(sh=torch.arange(3).expand(2, 3)))
    rec.set(img, TensorInfo(sh=along(torch.arange(3), img.shape, 1)))
    assert rec.val(flat).fdim != "chan" and rec.val(flat, 1).fdim != "chan"
    assert rec.val(img, 1).fdim == "chan" and torch.equal(rec.val(img, 1).own_nodes, torch.arange(3))


class _Rep(nn.Module):
    """[B, F] -> [B, 5, F] (the same F features at 5 positions)."""
    def forward(self, x):
        return x.unsqueeze(1).expand(-1, 5, -1)


@pytest.fixture
def passthrough_rep():
    register_module(_Rep, lambda ctx, m, x: x)     # a mapper that hands its input on
    yield
    unregister_module(_Rep)


def test_a_mapper_that_hands_on_a_flat_value_gives_the_output_its_last_dim_units(passthrough_rep):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.rep, self.fc2 = nn.Linear(3, 4), _Rep(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.rep(self.fc1(x)))
    torch.manual_seed(0)
    g = build(M(), torch.randn(2, 3), strict=False)
    assert not_followed(g) == []
    assert torch.equal(part(g, "fc2.weight")[0][0], part(g, "fc1.weight")[1][:, 0])


def test_a_mapper_that_hands_on_a_network_input_keeps_it_an_input(passthrough_rep):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rep, self.fc = _Rep(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rep(x))
    torch.manual_seed(0)
    g = build(M(), torch.randn(2, 4), strict=False)
    assert not_followed(g) == []
    src = part(g, "fc.weight")[0][0]
    assert len(set(src.tolist())) == 4 and (g.node_type[src] == INPUT).all()


# ------------------------------------------------------------------ columns
def test_columns_of_an_empty_batch_are_fresh_hidden_units():
    rec = _recorder(2)
    cols = rec.columns(torch.zeros(0, 3, dtype=torch.long), 1)
    assert torch.equal(cols, torch.tensor([2, 3, 4]))
    assert _types(rec, cols) == [HIDDEN] * 3 and _depths(rec, cols) == [0] * 3
    assert _roots(rec) == list(range(5))


def test_columns_without_a_unit_get_fresh_depth_zero_units():
    rec = _recorder(3)
    rec.state.new_nodes(1, NodeType.HIDDEN, 4)                 # node 3, depth 4
    cols = rec.columns(torch.tensor([[-1, 3], [-1, 3]]), 1)
    assert torch.equal(cols, torch.tensor([4, 3]))
    assert _depths(rec, cols) == [0, 4]


def test_units_stacked_along_the_batch_are_merged_column_by_column():
    rec = _recorder(4)
    cols = rec.columns(torch.tensor([[0, 1], [2, 3]]), 1)      # two rows of two distinct units
    assert torch.equal(cols, torch.tensor([2, 3]))
    assert _roots(rec) == [0, 1, 0, 1]


def test_rows_with_a_missing_or_repeated_unit_are_not_merged():
    rec = _recorder(5)
    rec.columns(torch.tensor([[-1, 1], [2, 3]]), 1)            # a row with no unit at one column
    rec.columns(torch.tensor([[0, 1, 1], [2, 3, 4]]), 1)       # a row repeating a unit
    assert _roots(rec) == list(range(5))


def test_two_linears_concatenated_along_the_batch_feed_one_set_of_units():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 0))
    torch.manual_seed(0)
    g = build(Cat(), torch.randn(1, 3), strict=False)
    assert not_followed(g) == []
    a = part(g, "a.weight")[1][:, 0]
    assert torch.equal(part(g, "b.weight")[1][:, 0], a) and torch.equal(part(g, "c.weight")[0][0], a)
    assert len(set(a.tolist())) == 2


# ------------------------------------------------------------------ assign
def test_a_single_value_for_a_tuple_output_goes_to_its_first_tensor():
    rec = _recorder(3)
    out, extra = torch.zeros(2, 3), torch.zeros(2, 3)
    rec.assign((out, extra), Val(own_nodes=torch.arange(3), depth=1))
    assert torch.equal(rec.get(out).sh, torch.arange(3).expand(2, 3)) and rec.get(out).depth == 1
    assert rec.get(extra) is None
    a, b = torch.zeros(3), torch.zeros(2, 2)
    rec.assign([a, b], TupleVal([Val(own_nodes=torch.arange(3)), Val(own_nodes=torch.tensor([1, 2]))]))
    assert torch.equal(rec.get(a).sh, torch.arange(3)) and torch.equal(rec.get(b).sh, torch.tensor([[1, 2], [1, 2]]))


def test_a_lazy_value_is_assigned_lazily_and_a_value_without_nodes_not_at_all():
    rec = _recorder()
    lz = LazyNodes(NodeType.HIDDEN, group=-1, depth=2)
    out, other = torch.zeros(2, 3), torch.zeros(2, 3)
    rec.assign(out, Val(lazy=lz, depth=2))
    info = rec.get(out)
    assert info.lazy is lz and info.depth == 2 and info.sh is None and info.pidx is None
    rec.assign(other, Val(depth=1))
    assert rec.get(other) is None and id(other) not in rec.info


# ------------------------------------------------------------------ merge_pairs
def test_only_pairs_of_two_distinct_units_are_merged():
    rec = _recorder(5)
    rec.merge_pairs(torch.tensor([-1, 0, 2, 3]), torch.tensor([3, 1, -1, 3]))
    assert _roots(rec) == [0, 0, 2, 3, 4]


def test_a_value_of_another_width_or_a_scalar_output_is_not_assigned():
    rec = _recorder(3)
    wide, scalar = torch.zeros(2, 5), torch.tensor(1.0)
    rec.assign(wide, Val(own_nodes=torch.arange(3)))
    rec.assign(scalar, Val(own_nodes=torch.arange(3)))
    assert rec.get(wide) is None and rec.get(scalar) is None and rec.info == {}


# ------------------------------------------------------------------ hooks
class _Block(nn.Module):
    """A registered module with a Linear inside (its hooks nest in the block's)."""
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)

    def forward(self, x):
        return torch.tanh(self.inner(x)) * 2


def test_a_module_inside_a_mapped_module_is_left_to_the_outer_mapper():
    """Only the block's mapper runs (once, on the block's input); the ``relu``
    after the block is recorded, so the head reads the block's units."""
    calls = []

    def mapper(ctx, m, x):
        calls.append(ctx.qualname)
        return ctx.linear(m.inner.weight, x, m.inner.bias)
    register_module(_Block, mapper)
    try:
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.block, self.head = _Block(), nn.Linear(4, 2)

            def forward(self, x):
                return self.head(torch.relu(self.block(x)))
        torch.manual_seed(0)
        g = build(M(), torch.randn(2, 3), strict=False)
    finally:
        unregister_module(_Block)
    assert calls == ["block"] and not_followed(g) == []
    units = part(g, "block.inner.weight")[1][:, 0]
    assert torch.equal(part(g, "head.weight")[0][0], units) and len(set(units.tolist())) == 4
    assert (g.node_type[part(g, "block.inner.weight")[0][0]] == INPUT).all()


def test_an_embedding_reads_its_index_tensor_along_the_last_dim():
    """``feature_dim_for`` says "tokens" for an Embedding: its mapper gets the
    index tensor's units along the last dim (here the 5 token units), not dim 1."""
    from l2o.graph.layers import feature_dim_for, keep_whole, mapper_for
    emb = nn.Embedding(5, 2)
    seen = []

    def spy(module):
        real = mapper_for(module)

        def f(state, mod, qn, args, kwargs):
            seen.append(args[0])
            return real(state, mod, qn, args, kwargs)
        return f
    state = GraphState(emb)
    tokens = state.new_nodes(5, NodeType.INPUT, 0)
    rec = Recorder(state, emb, spy, feature_dim_for, keep_whole)
    ids = torch.zeros(2, 3, 5, dtype=torch.long)
    rec.set(ids, TensorInfo(sh=along(tokens, ids.shape, -1)))
    rec.install()
    try:
        out = emb(ids)
    finally:
        rec.remove()
    assert rec.errors == [] and len(seen) == 1
    assert torch.equal(seen[0].own_nodes, tokens)
    assert rec.get(out).sh.shape == out.shape and torch.equal(rec.get(out).sh[0, 0, 0], torch.arange(5, 7))


def test_mapped_modules_called_with_keyword_inputs_read_their_units():
    """``bn(input=h)``, ``conv(input=h)``: a keyword input is read like a
    positional one, along the module's feature dim (channels here)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Conv1d(3, 2, 1)

        def forward(self, x):
            return self.c2(input=self.bn(input=self.c1(x)))
    torch.manual_seed(0)
    g = build(M(), torch.randn(2, 2, 5), strict=False)
    assert not_followed(g) == []
    units = part(g, "c1.weight")[1][:, 0, 0]
    assert len(set(units.tolist())) == 3
    assert torch.equal(part(g, "bn.weight"), units) and torch.equal(part(g, "bn.bias"), units)
    assert torch.equal(part(g, "c2.weight")[0][0, :, 0], units)
