"""The contract of the graph data structures and of ``build_graph`` itself
(``l2o/graph/param_graph.py``, ``batch.py``, ``builder.py``, ``op_names.py``):
sizes, the flat layout and its gather / scatter, moving a graph, its summary,
connected pieces, the disjoint union of several graphs, and what the builder
caches, validates and notes. Each test checks against a plain reference."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from l2o.graph import EntryKind, NodeType, ParamGraph, build_graph
from l2o.graph.batch import BatchedGraph, per_run, run_index
from l2o.graph import builder
from l2o.graph.builder import _check, _describe, _inputs_key, clear_cache
from l2o.graph.op_names import op_name
from l2o.graph.param_graph import count_components

from graph_helpers import build


@pytest.fixture(autouse=True)
def _leave_the_global_rng_alone():
    """These tests draw from torch's global generator; later tests in the same process
    (mutmut runs several sessions in one) see the state they would have seen without them."""
    with torch.random.fork_rng(devices=[]):
        yield


def mlp_graph():
    """3 -> 4 -> 2: edges 12 + 8, node slots 4 + 2."""
    return build(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3))


def plain_graph(num_nodes, edges, entry_nodes, entry_kinds, names, shapes, flat_order, num_edge_params,
                edge_pos=None):
    """A ParamGraph written by hand (every tensor a real, strided one)."""
    e = len(edges)
    edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T.contiguous()
    numels = [torch.Size(shapes[i]).numel() for i in flat_order]
    tid = torch.repeat_interleave(torch.arange(len(flat_order)), torch.tensor(numels, dtype=torch.long))
    return ParamGraph(
        num_nodes=num_nodes, node_type=torch.full((num_nodes,), int(NodeType.HIDDEN)),
        node_io_index=torch.full((num_nodes,), -1), node_depth=torch.zeros(num_nodes),
        edge_index=edge_index, edge_kind=torch.zeros(e, dtype=torch.long),
        edge_pos=torch.zeros(e, 2) if edge_pos is None else edge_pos,
        entry_node=torch.tensor(entry_nodes, dtype=torch.long), entry_kind=torch.tensor(entry_kinds, dtype=torch.long),
        tensor_id=tid, param_names=list(names), param_shapes=[torch.Size(s) for s in shapes],
        flat_order=list(flat_order), num_edge_params=num_edge_params)


# ------------------------------------------------------------------ ParamGraph
def test_sizes_and_flat_ranges_follow_the_flat_order():
    g = mlp_graph()
    assert g.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert g.flat_order == [0, 2, 1, 3] and g.num_edge_params == 2
    assert (g.num_edges, g.num_entries, g.num_params, g.num_tensors) == (20, 6, 26, 4)
    assert g.numels == [12, 8, 4, 2]
    assert g.tensor_slices == [slice(0, 12), slice(12, 20), slice(20, 24), slice(24, 26)]
    assert g.tensor_slices is g.tensor_slices     # cached
    assert g.device == torch.device("cpu")


def test_gather_puts_edge_held_tensors_first_and_scatter_inverts_it():
    g = mlp_graph()
    tensors = [torch.arange(12.).view(4, 3), 100 + torch.arange(4.), 200 + torch.arange(8.).view(2, 4),
               300 + torch.arange(2.)]
    flat = g.gather(tensors)
    ref = torch.cat([tensors[0].flatten(), tensors[2].flatten(), tensors[1], tensors[3]])
    assert torch.equal(flat, ref)
    back = g.scatter(flat)
    assert [tuple(b.shape) for b in back] == [(4, 3), (4,), (2, 4), (2,)]
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    assert back[2].data_ptr() == flat[12:].data_ptr()     # views of the flat vector, no copies
    edges, nodes = g.split_flat(flat)
    assert torch.equal(edges, ref[:20]) and torch.equal(nodes, ref[20:])
    # along a trailing dimension too
    two = torch.stack([flat, -flat], dim=1)
    e2, n2 = g.split_flat(two)
    assert e2.shape == (20, 2) and n2.shape == (6, 2) and torch.equal(n2[:, 1], -ref[20:])


def test_gather_and_scatter_refuse_the_wrong_sizes():
    g = mlp_graph()
    with pytest.raises(ValueError, match=r"^expected 4 tensors \(one per parameter\), got 3$"):
        g.gather([torch.zeros(12), torch.zeros(4), torch.zeros(8)])
    with pytest.raises(ValueError, match=r"^flat vector has 25 entries, graph has 26$"):
        g.scatter(torch.zeros(25))


def test_edge_positions_are_reported_only_when_some_edge_has_one():
    g = mlp_graph()
    assert g.has_edge_pos is False
    conv = build(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
                 torch.randn(1, 1, 4, 4))
    assert conv.has_edge_pos is True
    empty = plain_graph(2, [], [0, 1], [0, 0], ["b"], [(2,)], [0], 0)
    assert empty.edge_pos.numel() == 0 and empty.has_edge_pos is False
    # cached: the graph is static
    conv.edge_pos = torch.zeros_like(conv.edge_pos)
    assert conv.has_edge_pos is True


def test_derived_data_is_computed_once_per_key_until_forgotten():
    g = mlp_graph()
    calls = []

    def compute(v):
        return lambda: calls.append(v) or v
    assert g.derived("a", compute(1)) == 1 and g.derived("a", compute(2)) == 1
    assert g.derived("b", compute(3)) == 3
    assert calls == [1, 3]
    g.forget_derived()
    assert g.derived("a", compute(4)) == 4 and calls == [1, 3, 4]
    g.forget_derived()
    g.forget_derived()                 # forgetting nothing is fine


def test_moving_a_graph_keeps_every_field_and_constant_views_stay_views():
    g = mlp_graph()
    assert g.edge_pos.stride(0) == 0 and g.edge_kind.stride(0) == 0     # constants kept as stride-0 views
    assert g.has_edge_pos is False
    g.derived("x", lambda: 1)
    moved = g.to("cpu")
    for name in ["num_nodes", "param_names", "param_shapes", "flat_order", "num_edge_params", "unstructured",
                 "capture", "notes"]:
        assert getattr(moved, name) == getattr(g, name), name
    for name in ["node_type", "node_io_index", "node_depth", "edge_index", "edge_kind", "edge_pos", "entry_node",
                 "entry_kind", "tensor_id"]:
        a, b = getattr(moved, name), getattr(g, name)
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert moved.has_edge_pos is False and "_derived" not in moved.__dict__


def test_a_graph_moved_to_another_device_keeps_constants_as_views_and_its_edge_pos_flag():
    # the meta device stands in for an accelerator: a move really copies, and a
    # flag computed there would need to read the device tensor
    g = plain_graph(3, [(0, 2), (1, 2)], [2], [0], ["w", "b"], [(1, 2), (1,)], [0, 1], 1,
                    edge_pos=torch.ones(1, 2).expand(2, 2))           # two rows, one stored
    g.edge_kind = torch.ones(1, dtype=torch.long).expand(2)
    assert g.has_edge_pos is True
    moved = g.to("meta")
    for name in ["node_type", "node_io_index", "node_depth", "edge_index", "edge_kind", "edge_pos", "entry_node",
                 "entry_kind", "tensor_id"]:
        a, b = getattr(moved, name), getattr(g, name)
        assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype, name
    assert moved.edge_pos.stride() == (0, 1) and moved.edge_kind.stride() == (0,)
    assert moved.edge_index.stride() == g.edge_index.stride() and moved.device.type == "meta"
    assert moved.has_edge_pos is True                     # carried, not recomputed on the device
    assert g.to("cpu").edge_pos.stride() == (0, 1)
    flat = mlp_graph()
    assert flat.has_edge_pos is False and flat.to("meta").has_edge_pos is False


def test_signature_is_the_names_and_shapes_of_the_parameters():
    g = mlp_graph()
    assert g.signature() == (("0.weight", (4, 3)), ("0.bias", (4,)), ("2.weight", (2, 4)), ("2.bias", (2,)))


def test_fractions_split_the_parameters_between_edges_node_slots_and_fallback():
    g = build(nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)), torch.randn(2, 3), strict=False)
    assert (g.entry_kind == EntryKind.FALLBACK).sum() == 1          # PReLU's one shared slope
    f = g.fractions()
    assert f == {"edges": 20 / 27, "node_slots": 6 / 27, "fallback": 1 / 27}
    empty = plain_graph(0, [], [], [], [], [], [], 0)
    assert empty.fractions() == {"edges": 0.0, "node_slots": 0.0, "fallback": 0.0}
    one = plain_graph(2, [(0, 1)], [], [], ["w"], [(1, 1)], [0], 1)
    assert one.fractions() == {"edges": 1.0, "node_slots": 0.0, "fallback": 0.0}


def test_summary_names_counts_capture_notes_and_the_unstructured():
    g = build(nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)), torch.randn(2, 3), strict=False)
    g.notes = ["first", "second"]
    g.unstructured = ["1.weight", "x.y"]
    assert g.summary() == (
        "ParamGraph: 10 nodes (input=3, hidden=4, output=2, tensor=1), 20 edges, 7 node-held entries, "
        "5 tensors, 27 parameters\n"
        "  capture: eager; parameters on edges 74.1%, node slots 22.2%, fallback 3.7%\n"
        "  note: first\n"
        "  note: second\n"
        "  unstructured (per-tensor fallback): 1.weight, x.y")
    assert repr(g) == g.summary()
    g.capture, g.notes, g.unstructured = "", [], []
    assert g.summary().splitlines()[1].startswith("  capture: ?; ")
    assert len(g.summary().splitlines()) == 2
    # node types without nodes are left out
    assert mlp_graph().summary().splitlines()[0].startswith("ParamGraph: 9 nodes (input=3, hidden=4, output=2), ")
    flat = build(nn.Sequential(nn.Linear(3, 2), nn.PReLU()), torch.randn(2, 3), strict=False)
    assert flat.summary() == ("ParamGraph: 6 nodes (input=3, output=2, tensor=1), 6 edges, 3 node-held entries, "
                              "3 tensors, 9 parameters\n"
                              "  capture: eager; parameters on edges 66.7%, node slots 22.2%, fallback 11.1%")


def test_to_pyg_hands_the_graphs_tensors_to_pyg_under_their_own_names(monkeypatch):
    # a stand-in for torch_geometric.data.Data (the real import takes seconds): it keeps its arguments
    import types

    class Data:
        def __init__(self, **kw):
            self.kw = kw
    pkg, mod = types.ModuleType("torch_geometric"), types.ModuleType("torch_geometric.data")
    mod.Data, pkg.data = Data, mod
    monkeypatch.setitem(sys.modules, "torch_geometric", pkg)
    monkeypatch.setitem(sys.modules, "torch_geometric.data", mod)
    g = mlp_graph()
    kw = g.to_pyg().kw
    names = ["edge_index", "edge_kind", "edge_pos", "node_type", "node_depth", "entry_node", "entry_kind"]
    assert sorted(kw) == sorted(names + ["num_nodes"]) and kw["num_nodes"] == 9
    for name in names:
        assert kw[name] is getattr(g, name), name


def _components_reference(num_nodes, src, dst):
    parent = list(range(num_nodes))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for a, b in zip(src.tolist(), dst.tolist()):
        parent[find(a)] = find(b)
    return len({find(v) for v in set(src.tolist()) | set(dst.tolist())})


def test_connected_pieces_are_counted_among_the_nodes_with_edges():
    assert mlp_graph().edge_components() == 1
    assert plain_graph(2, [], [0, 1], [0, 0], ["b"], [(2,)], [0], 0).edge_components() == 0
    assert plain_graph(2, [(0, 1)], [], [], ["w"], [(1, 1)], [0], 1).edge_components() == 1
    # two chains 0-1-2 and 5-4 (edges pointing both ways), node 3 isolated: 2 pieces
    two = plain_graph(6, [(0, 1), (2, 1), (5, 4)], [3], [0], ["w", "b"], [(3,), (1,)], [0, 1], 1)
    assert two.edge_components() == 2
    # a long path numbered against the labels' flow needs many rounds
    n = 9
    order = [8, 0, 7, 1, 6, 2, 5, 3, 4]
    src, dst = torch.tensor(order[:-1]), torch.tensor(order[1:])
    assert count_components(n, src, dst) == 1 and count_components(n, dst, src) == 1
    gen = torch.Generator().manual_seed(0)
    for n, e in [(12, 5), (20, 12), (30, 25), (8, 1)]:
        src = torch.randint(0, n, (e,), generator=gen)
        dst = torch.randint(0, n, (e,), generator=gen)
        assert count_components(n, src, dst) == _components_reference(n, src, dst), (n, e)


# ------------------------------------------------------------------ BatchedGraph
def _two_graphs():
    a = mlp_graph()
    b = build(nn.Sequential(nn.Linear(2, 3, bias=False), nn.LayerNorm(3), nn.Linear(3, 1)), torch.randn(2, 2))
    return a, b


def test_union_lays_out_every_runs_edges_then_every_runs_node_slots():
    a, b = _two_graphs()
    u = BatchedGraph.union([a, b])
    assert u.num_runs == 2
    assert u.num_nodes == a.num_nodes + b.num_nodes
    assert (u.num_edges, u.num_entries) == (a.num_edges + b.num_edges, a.num_entries + b.num_entries)
    assert u.param_names == a.param_names + b.param_names
    assert u.param_shapes == a.param_shapes + b.param_shapes
    na = len(a.param_names)
    assert u.num_edge_params == a.num_edge_params + b.num_edge_params
    assert u.flat_order == (a.flat_order[:a.num_edge_params] + [na + i for i in b.flat_order[:b.num_edge_params]]
                            + a.flat_order[a.num_edge_params:] + [na + i for i in b.flat_order[b.num_edge_params:]])
    assert torch.equal(u.edge_index, torch.cat([a.edge_index, b.edge_index + a.num_nodes], dim=1))
    assert torch.equal(u.entry_node, torch.cat([a.entry_node, b.entry_node + a.num_nodes]))
    for name in ["node_type", "node_io_index", "node_depth", "edge_kind", "edge_pos", "entry_kind"]:
        assert torch.equal(getattr(u, name), torch.cat([getattr(a, name), getattr(b, name)])), name
    # tensor ids: the union's tensor order is its flat order
    numels = torch.tensor(u.numels)
    assert torch.equal(u.tensor_id, torch.repeat_interleave(torch.arange(u.num_tensors), numels))
    assert torch.equal(u.edge_run, torch.tensor([0] * a.num_edges + [1] * b.num_edges))
    assert torch.equal(u.node_run, torch.tensor([0] * a.num_nodes + [1] * b.num_nodes))
    assert torch.equal(u.entry_run, torch.tensor([0] * a.num_entries + [1] * b.num_entries))
    assert torch.equal(u.flat_run, torch.cat([u.edge_run, u.entry_run]))
    assert (u.run_edges, u.run_entries) == ((20, 9), (6, 7))
    assert (u.run_edge_tensors, u.run_node_tensors) == ((2, 2), (2, 3))
    assert u.edge_components() == 2


def test_union_keeps_each_runs_unstructured_parameters_and_refuses_no_graphs():
    a, b = _two_graphs()
    a.unstructured, b.unstructured = ["p", "q"], ["r"]
    u = BatchedGraph.union([a, b, a])
    assert u.unstructured == ["p", "q", "r", "p", "q"]
    assert u.num_runs == 3 and u.run_edges == (20, 9, 20)
    with pytest.raises(ValueError, match="^union of no graphs$"):
        BatchedGraph.union([])


def test_join_and_split_move_between_each_runs_layout_and_the_unions():
    a, b = _two_graphs()
    u = BatchedGraph.union([a, b])
    fa = torch.arange(float(a.num_params))
    fb = 100 + torch.arange(float(b.num_params))
    joined = u.join([fa, fb])
    assert torch.equal(joined, torch.cat([fa[:20], fb[:9], fa[20:], fb[9:]]))
    ra, rb = u.split(joined)
    assert torch.equal(ra, fa) and torch.equal(rb, fb)
    # the union's gather is the join of the runs' gathers
    pa = [torch.randn(s) for s in a.param_shapes]
    pb = [torch.randn(s) for s in b.param_shapes]
    assert torch.equal(u.gather(pa + pb), u.join([a.gather(pa), b.gather(pb)]))
    # along dim 1 (the momenta: [beta, entries])
    ma, mb = torch.stack([fa, -fa]), torch.stack([fb, -fb])
    j1 = u.join([ma, mb], dim=1)
    assert j1.shape == (2, u.num_params) and torch.equal(j1[0], joined) and torch.equal(j1[1], -joined)
    sa, sb = u.split(j1, dim=1)
    assert torch.equal(sa, ma) and torch.equal(sb, mb)


def test_per_tensor_values_join_with_every_runs_edge_tensors_first():
    a, b = _two_graphs()
    u = BatchedGraph.union([a, b])
    va, vb = torch.tensor([1., 2., 3., 4.]), torch.tensor([10., 20., 30., 40., 50.])
    joined = u.join_tensors([va, vb])
    assert joined.tolist() == [1., 2., 10., 20., 3., 4., 30., 40., 50.]
    # the union's tensor order: joined[k] belongs to the union's k-th tensor
    assert [u.param_names[i] for i in u.flat_order] == (
        [a.param_names[i] for i in a.flat_order[:2]] + [b.param_names[i] for i in b.flat_order[:2]]
        + [a.param_names[i] for i in a.flat_order[2:]] + [b.param_names[i] for i in b.flat_order[2:]])
    ra, rb = u.split_tensors(joined)
    assert torch.equal(ra, va) and torch.equal(rb, vb)


def test_per_run_values_are_shared_or_indexed_by_each_elements_run():
    a, b = _two_graphs()
    u = BatchedGraph.union([a, b])
    assert run_index(a, "edge") is None and run_index(a, "flat") is None
    assert run_index(u, "edge") is u.edge_run and run_index(u, "node") is u.node_run
    assert run_index(u, "entry") is u.entry_run
    assert torch.equal(run_index(u, "flat"), u.flat_run)
    rows = torch.tensor([[1., 2.], [3., 4.]])
    idx = torch.tensor([1, 0, 1])
    assert torch.equal(per_run(rows, idx), torch.tensor([[3., 4.], [1., 2.], [3., 4.]]))
    assert per_run(rows, None) is rows
    vec = torch.tensor([5., 6.])
    assert per_run(vec, idx) is vec


# ------------------------------------------------------------------ build_graph


def small():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_capture_must_be_auto_eager_or_fx():
    with pytest.raises(ValueError, match=r"^capture must be 'auto', 'eager' or 'fx', not 'jit'$"):
        build_graph(small(), capture="jit")
    for capture in ("auto", "eager", "fx"):
        assert build_graph(small(), capture=capture, use_cache=False).num_edges == 20


def test_cached_graphs_are_reused_only_for_the_same_parameters_strictness_capture_and_input_shapes():
    m = small()
    g = build_graph(m)
    assert build_graph(m) is g
    assert build_graph(m, strict=True) is not g
    assert build_graph(m, strict=True) is build_graph(m, strict=True)
    fx = build_graph(m, capture="fx")
    assert fx is not g and fx.capture == "fx" and build_graph(m, capture="fx") is fx
    # an uncached build neither reads nor replaces the cached graph
    fresh = build_graph(m, capture="fx", use_cache=False)
    assert fresh is not fx and build_graph(m, capture="fx") is fx
    clear_cache()
    fx2 = build_graph(m, capture="fx")
    assert fx2 is not fx
    # a graph fx built without inputs does not serve a plain call: that one records a run
    auto = build_graph(m)
    assert auto is not fx2 and auto.capture == "eager" and build_graph(m) is auto
    # new parameter shapes: rebuilt
    m[2] = nn.Linear(4, 3)
    assert build_graph(m).num_edges == 24


def test_a_graph_built_with_example_inputs_serves_later_calls_without_them():
    m = small()
    x = build_graph(m, torch.randn(5, 3))
    assert build_graph(m, torch.randn(5, 3)) is x                 # the same shapes and dtype
    assert build_graph(m, (torch.randn(5, 3),)) is x              # a tensor is a one-tensor tuple
    assert build_graph(m, [torch.randn(5, 3)]) is x
    assert build_graph(m, torch.randn(7, 3)) is not x             # another shape
    y = build_graph(m, torch.randn(7, 3))
    assert build_graph(m) is y                                    # the optimizer's call
    assert build_graph(m, capture="eager") is not y               # asked for another capture
    assert build_graph(m, strict=True) is not y                   # or another strictness
    # built without inputs first: a call with inputs records a run on them
    m2 = small()
    plain = build_graph(m2)
    assert build_graph(m2, torch.randn(2, 3)) is not plain
    # new parameter shapes: a graph recorded with inputs does not serve them
    m3 = small()
    build_graph(m3, torch.randn(2, 3))
    m3[2] = nn.Linear(4, 3)
    assert build_graph(m3).num_edges == 24


def test_dict_inputs_key_the_cache_by_name_shape_and_dtype_and_other_inputs_are_not_cached():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, scale=None):
            return self.fc(x) if scale is None else self.fc(x) * scale

    m = KW()
    a = build_graph(m, {"x": torch.randn(2, 3)})
    assert a.capture == "eager" and a.num_edges == 6
    assert build_graph(m, {"x": torch.randn(2, 3)}) is a
    b = build_graph(m, {"x": torch.randn(2, 3), "scale": 2.0})           # a non-tensor value: not cached
    assert b is not a and build_graph(m, {"x": torch.randn(2, 3), "scale": 2.0}) is not b
    assert build_graph(m, {"x": torch.randn(2, 3)}) is a                  # and the cache keeps its graph
    assert build_graph(m, {"x": torch.randn(2, 3, dtype=torch.float64)}) is not a
    assert build_graph(m, (torch.randn(2, 3), 2.0)) is not build_graph(m, (torch.randn(2, 3), 2.0))


def test_inputs_key_is_the_shapes_and_dtypes_of_the_tensors():
    x, y = torch.zeros(2, 3), torch.zeros(4, dtype=torch.long)
    assert _inputs_key(None) is None
    assert _inputs_key(x) == (((2, 3), "torch.float32"),)
    assert _inputs_key((x, y)) == _inputs_key([x, y]) == (((2, 3), "torch.float32"), ((4,), "torch.int64"))
    assert _inputs_key({"a": x, "b": y}) == (("a", (2, 3), "torch.float32"), ("b", (4,), "torch.int64"))
    assert _inputs_key({"b": y, "a": x}) != _inputs_key({"a": x, "b": y})
    assert _inputs_key({}) == () and _inputs_key(()) == ()
    uncacheable = builder._UNCACHEABLE
    assert _inputs_key({"a": x, "b": 1}) is uncacheable
    assert _inputs_key((x, None)) is uncacheable
    assert _inputs_key(3.0) is uncacheable
    assert _inputs_key("xy") is uncacheable


def test_the_build_runs_single_threaded_and_restores_the_thread_count():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.fc(x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_graph(Probe(), torch.randn(1, 3), use_cache=False)
        assert seen == [1] and torch.get_num_threads() == 2
        # also when the build raises
        with pytest.raises(ValueError, match="needs example_inputs"):
            build_graph(nn.ParameterList([nn.Parameter(torch.ones(2))]), capture="eager", use_cache=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Lone(nn.Module):
    """No layer to guess inputs from."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return x @ self.w


def test_eager_capture_needs_inputs_it_can_guess_or_is_given():
    with pytest.raises(ValueError, match=r"^build_graph\(capture='eager'\) needs example_inputs for this model$"):
        build_graph(_Lone(), capture="eager", use_cache=False)
    g = build_graph(_Lone(), torch.randn(2, 3), capture="eager", strict=True, use_cache=False)
    assert g.capture == "eager" and g.num_edges == 9 and g.notes == []


class _Picky(nn.Module):
    """A forward that raises on a batch of 5 (fx's symbolic trace goes through)."""

    def __init__(self, message):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.message = message

    def forward(self, x):
        if not isinstance(x, torch.fx.Proxy) and x.shape[0] == 5:
            raise RuntimeError(self.message)
        return self.fc(x)


def test_a_forward_that_raises_is_noted_and_fx_builds_the_graph():
    long = "first line " + "x" * 300 + "\nsecond line"
    g = build_graph(_Picky(long), torch.randn(5, 3), use_cache=False, strict=True)
    assert g.capture == "fx" and g.num_edges == 6
    assert g.notes == [f"eager capture failed (RuntimeError: {long.splitlines()[0][:200]})"]
    g = build_graph(_Picky(""), torch.randn(5, 3), use_cache=False, strict=True)
    assert g.notes == ["eager capture failed (RuntimeError: )"]
    # capture="eager" says so
    with pytest.raises(RuntimeError, match="boom"):
        build_graph(_Picky("boom"), torch.randn(5, 3), capture="eager", use_cache=False)
    # capture="fx" never runs the forward on the inputs but uses them for shapes
    g = build_graph(_Picky("boom"), torch.randn(4, 3), capture="fx", use_cache=False, strict=True)
    assert g.capture == "fx" and g.notes == []


class _OwnMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize("capture", ["fx", "eager"])
def test_a_mapper_that_raises_is_noted_and_named_in_both_captures(capture):
    """A registered mapper's exception does not escape build_graph in either
    capture: it is a note, the module's parameters go to fallback nodes, the
    layers after it are still structured, and the warning / strict error say
    which mapper raised what."""
    from l2o.graph import UnsupportedModuleError, register_module, unregister_module

    def wrong(ctx, module, x):
        raise ValueError("my mapper is wrong")

    register_module(_OwnMatmul, wrong)
    try:
        model = nn.Sequential(nn.Linear(3, 4), _OwnMatmul(), nn.Linear(4, 2))
        with pytest.warns(UserWarning, match=r"Modules: 1 \(_OwnMatmul: w; its mapper raised ValueError: "
                                             r"my mapper is wrong\)"):
            g = build_graph(model, torch.randn(2, 3), capture=capture, use_cache=False)
        assert g.notes == ["op not followed: 1 (_OwnMatmul): ValueError: my mapper is wrong"]
        assert g.unstructured == ["1.w"] and g.num_edges == 12 + 8
        with pytest.raises(UnsupportedModuleError, match=r"1 \(_OwnMatmul\): 1.w -- its mapper raised ValueError: "
                                                         r"my mapper is wrong"):
            build_graph(model, torch.randn(2, 3), capture=capture, use_cache=False, strict=True)
    finally:
        unregister_module(_OwnMatmul)


class _Gate(nn.Module):
    """Runs ``inner`` only when its input's mean is positive."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.own = nn.Parameter(torch.ones(5))

    def forward(self, x):
        if x.mean() > 0:
            return self.inner(x) * self.own
        return x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.gate = _Gate()
        self.fc2 = nn.Linear(5, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.fill_(-1.0)       # the branch with ``inner`` is never taken

    def forward(self, x):
        return self.fc2(self.gate(self.fc1(x)))


def test_a_run_on_guessed_inputs_that_structures_less_than_fx_gives_way_to_fx():
    m = _Gated()
    with pytest.warns(UserWarning, match="gate"):
        g = build_graph(m, use_cache=False)
    assert g.capture == "fx" and g.unstructured == ["gate.own"]
    assert g.notes[-1] == "eager run on guessed inputs (2, 3) structured less; fx used"
    assert g.num_edges == 15 + 25 + 10
    # given inputs, the run on them is kept (the user's inputs are the truth)
    with pytest.warns(UserWarning, match="inner"):
        g = build_graph(m, torch.randn(2, 3), use_cache=False)
    assert g.capture == "eager" and g.num_edges == 15 + 10
    assert not any("fx used" in n for n in g.notes)


def test_guessed_inputs_are_described_by_their_shapes():
    x, y = torch.zeros(2, 3), torch.zeros(1, 8, dtype=torch.long)
    assert _describe(x) == "(2, 3)"
    assert _describe((x, y)) == "(2, 3), (1, 8)"
    assert _describe({"input_ids": y, "mask": None, "pixel_values": x}) == "(1, 8), (2, 3)"
    assert _describe([x, 3, y]) == "(2, 3), (1, 8)"


def test_fx_capture_structures_a_flatten_with_dict_or_tensor_inputs():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = build_graph(m, torch.randn(1, 2, 2, 3), capture="fx", strict=True, use_cache=False)
        assert g.capture == "fx" and g.notes == []
        pos = g.edge_pos[g.tensor_slices[1]].view(4, 18, 2)[0]
        assert pos[11].tolist() == [1.0, 1.0]       # channel 1, y=1, x=2 of a 2 x 3 map
        # keyword inputs are not for fx: positions inferred from the layer sizes, no warning
        g = build_graph(m, {"input": torch.randn(1, 2, 2, 3)}, capture="fx", strict=True, use_cache=False)
        assert g.capture == "fx" and g.notes == []


class _LowRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.V = nn.Parameter(torch.randn(2, 3))
        self.U = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return x @ self.V.T @ self.U.T


def test_a_registered_mapper_sees_the_model_itself_under_the_empty_name():
    from l2o.graph import register_module, unregister_module
    seen = []

    def mapper(ctx, m, x):
        seen.append(ctx.qualname)
        return ctx.linear(m.U, ctx.linear(m.V, x))
    register_module(_LowRank, mapper)
    try:
        for capture in ("fx", "eager"):
            g = build_graph(_LowRank(), torch.randn(1, 3), capture=capture, strict=True, use_cache=False)
            assert g.num_edges == 6 + 8
            build_graph(nn.Sequential(_LowRank()), torch.randn(1, 3), capture=capture, strict=True, use_cache=False)
    finally:
        unregister_module(_LowRank)
    assert seen == ["", "0", "", "0"]


def _checked(**change):
    """A hand-written graph (w [2, 2] and an empty z on edges, b [2] on nodes), with ``change`` applied,
    through the build's final check."""
    g = plain_graph(4, [(0, 2), (1, 2), (0, 3), (1, 3)], [2, 3], [0, 0], ["w", "b", "z"], [(2, 2), (2,), (0,)],
                    [0, 2, 1], 2)
    assert g.tensor_id.tolist() == [0, 0, 0, 0, 2, 2]
    for k, v in change.items():
        setattr(g, k, v)
    _check(g)


def test_the_builds_check_passes_a_consistent_graph_and_refuses_misplaced_entries():
    _checked()
    with pytest.raises(AssertionError, match="^a parameter tensor is missing or placed twice$"):
        _checked(flat_order=[0, 1])
    with pytest.raises(AssertionError, match="^a parameter tensor is missing or placed twice$"):
        _checked(flat_order=[0, 2, 1, 1])
    with pytest.raises(AssertionError):
        _checked(entry_node=torch.tensor([2, 3, 3]), entry_kind=torch.zeros(3, dtype=torch.long))
    with pytest.raises(AssertionError):                 # w, z and b counted as edge-held
        _checked(num_edge_params=3)
    with pytest.raises(AssertionError):
        _checked(tensor_id=torch.tensor([0, 0, 0, 0, 2]))
    for bad in ([1, 0, 0, 0, 2, 2], [0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 2, 1]):
        with pytest.raises(AssertionError):
            _checked(tensor_id=torch.tensor(bad))
    # a one-entry tensor's piece is checked too
    one = plain_graph(3, [(0, 2), (1, 2)], [2], [0], ["w", "c"], [(1, 2), (1,)], [0, 1], 1)
    _check(one)
    one.tensor_id = torch.tensor([0, 0, 0])
    with pytest.raises(AssertionError):
        _check(one)
    # and a graph without parameters passes
    _check(plain_graph(0, [], [], [], [], [], [], 0))


def test_the_builds_check_reads_the_edge_chunks_of_a_factored_graph():
    import dataclasses
    g = mlp_graph()
    f = g.edge_factors
    assert [(c.start, c.stop) for c in f.chunks] == [(0, 12), (12, 20)]
    _check(g)
    g.tensor_id.zero_()          # not read when the chunks are there
    _check(g)
    for start, stop in [(1, 12), (0, 11), (0, 13)]:
        f.chunks[0] = dataclasses.replace(f.chunks[0], start=start, stop=stop)
        with pytest.raises(AssertionError):
            _check(g)
    f.chunks[0] = dataclasses.replace(f.chunks[0], start=0, stop=12)
    f.chunks.append(dataclasses.replace(f.chunks[1], start=20, stop=20))
    with pytest.raises(AssertionError):
        _check(g)


# ------------------------------------------------------------------ op_name


@pytest.fixture
def fresh_names(monkeypatch):
    """An empty memo: the names are worked out here, not read from earlier captures."""
    from l2o.graph import op_names
    monkeypatch.setattr(op_names, "_SHORT_NAMES", {})


def test_op_names_are_the_last_part_of_torchs_name_for_the_callable(fresh_names):
    F = torch.nn.functional
    assert op_name(torch.Tensor.view) == "view"
    assert op_name(F.linear) == "linear"
    assert op_name(torch.add) == "add"
    assert op_name(torch.Tensor.__add__) == "__add__"
    assert op_name(torch.Tensor.T.__get__) == "T"            # a property read
    assert op_name(torch.Tensor.data.__set__) == "data"      # a property write

    def my_op(x):
        return x
    assert op_name(my_op) == "my_op"                        # not torch's: its own name
    getter = property(lambda self: 1).__get__
    assert getter.__name__ == "__get__" and op_name(getter) == "__get__"


class _Counted:
    """A callable that counts how often its name is read."""

    def __init__(self, name):
        self.reads, self._name = 0, name

    @property
    def __name__(self):
        self.reads += 1
        return self._name

    def __call__(self):
        return None


class _Nameless:
    def __call__(self):
        return None

    def __str__(self):
        return "pkg.module.nameless"


def test_op_names_are_memoised_per_callable(fresh_names):
    f = _Counted("probe")
    assert op_name(f) == "probe" and op_name(f) == "probe"
    assert f.reads == 1
    g = _Counted("other")
    assert op_name(g) == "other" and g.reads == 1 and op_name(f) == "probe" and f.reads == 1


def test_a_callable_without_a_name_is_named_by_its_text(fresh_names):
    assert op_name(_Nameless()) == "nameless"


class _Unresolvable:
    """Equal in hash to a torch function, so torch's name lookup compares with it -- and that raises."""

    def __init__(self, name=None):
        if name is not None:
            self.__name__ = name

    def __hash__(self):
        return hash(torch.Tensor.lcm_)

    def __eq__(self, other):
        if isinstance(other, _Unresolvable):
            return other is self
        raise RuntimeError("no comparison")

    def __call__(self):
        return None

    def __str__(self):
        return "pkg.unresolvable"


def test_a_callable_torch_cannot_name_still_gets_a_name(fresh_names):
    from torch.overrides import resolve_name
    with pytest.raises(RuntimeError, match="no comparison"):
        resolve_name(_Unresolvable())
    assert op_name(_Unresolvable("lookup_fails")) == "lookup_fails"
    assert op_name(_Unresolvable()) == "unresolvable"


class _Unmapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return x @ torch.linalg.matrix_exp(self.w)


def test_a_strict_build_refuses_what_it_cannot_structure_and_a_lenient_one_falls_back():
    from l2o.graph import UnsupportedModuleError
    m = nn.Sequential(nn.Linear(3, 3), _Unmapped())
    with pytest.raises(UnsupportedModuleError, match=r"\n  1 \(_Unmapped\): 1\.w -- "):
        build_graph(m, torch.randn(2, 3), strict=True, use_cache=False)
    with pytest.warns(UserWarning, match=r"have no graph structure .* Modules: 1 \(_Unmapped: w\)\."):
        g = build_graph(m, torch.randn(2, 3), use_cache=False)
    assert g.unstructured == ["1.w"]
    # on guessed inputs too: fx leaves the same 9 entries unstructured, so the recorded run is kept
    # (the model was already warned about: once per model and outcome)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = build_graph(m, use_cache=False)
    assert g.capture == "eager" and g.notes == [] and g.unstructured == ["1.w"]


class _TwoScales(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.s = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.fc(x) * torch.cumprod(self.s, 0).sum()


def test_only_tensors_of_two_or_more_entries_are_reported_unstructured():
    from l2o.graph import UnsupportedModuleError
    with pytest.raises(UnsupportedModuleError, match="s -- no graph mapping"):
        build_graph(_TwoScales(2), torch.randn(2, 3), strict=True, use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = build_graph(_TwoScales(1), torch.randn(2, 3), strict=True, use_cache=False)
    # a one-entry tensor (a shared slope, a temperature) has no structure to find: its own node, no report
    assert g.unstructured == [] and (g.entry_kind == EntryKind.FALLBACK).sum() == 1


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.mix(self.mix(self.emb(x))))


def test_tied_and_shared_weights_are_noted_by_name():
    g = build_graph(_Tied(), use_cache=False, strict=True)
    assert g.notes == ["tied/shared weights (entries on their first use's edges, later uses' units merged "
                       "with it): mix.weight, emb.weight"]
    assert build_graph(small(), use_cache=False).notes == []


def test_ops_the_eager_run_could_not_follow_are_noted_whatever_the_inputs_form():
    from l2o.graph import register_module, unregister_module

    def bad(ctx, m, x):
        raise ValueError("bad")
    register_module(_LowRank, bad)
    try:
        m = nn.Sequential(_LowRank(), nn.Linear(4, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for inputs in (torch.randn(1, 3), (torch.randn(1, 3),), {"input": torch.randn(1, 3)}):
                g = build_graph(m, inputs, use_cache=False)
                assert g.notes == ["op not followed: 0 (_LowRank): ValueError: bad"], inputs
    finally:
        unregister_module(_LowRank)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_union_and_its_components_stay_on_the_graphs_device():
    a, b = _two_graphs()
    u = BatchedGraph.union([a.to("cuda"), b.to("cuda")])
    for name in ["edge_run", "node_run", "entry_run", "tensor_id", "edge_index"]:
        assert getattr(u, name).device.type == "cuda", name
    assert torch.equal(u.edge_run.cpu(), BatchedGraph.union([a, b]).edge_run)
    assert u.edge_components() == 2
