"""Contract of the dense-block aggregation (l2o/graph/blocks.py) on graphs
whose blocks are detected from the written edges, of the HF layers
(l2o/graph/layers/hf.py), the 3-D experts (l2o/graph/layers/moe.py) and the
drawing (l2o/graph/draw.py), pinned against plain references: scatters and
bincounts over the written ``edge_index``, hand-counted graphs."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import l2o
from graph_helpers import build, kinds, not_followed, part
from l2o.graph import build_graph
from l2o.graph import blocks
from l2o.graph.blocks import (EdgeBlock, ScatterBlock, add_node_terms_, edge_blocks, edge_degree, entry_count,
                              mean_to_nodes, sum_to_nodes, use_dense_blocks)
from l2o.graph.param_graph import ParamGraph
from test_graph_layers_contract import Conv1D, MoEExperts


# ------------------------------------------------------------------ blocks.py
class Mixed(nn.Module):
    """One weight of each block layout: a grouped transposed conv (rows fixed to the source, 2 groups),
    a grouped conv (rows fixed to the destination, taps among the columns), a HF Conv1D (stored
    transposed: rows fixed to the source), 3-D experts (blocks of E * 2I rows, and of E * H rows in E
    groups), a one-unit head without bias (its inputs have one outgoing edge each; its output unit
    holds no entry and has no outgoing edge)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 4, 3, groups=2)
        self.conv = nn.Conv1d(4, 6, 3, groups=2)
        self.hf = Conv1D(6, 5)
        self.moe = MoEExperts(2, 5, 3)
        self.head = nn.Linear(5, 1, bias=False)

    def forward(self, x):
        h = self.conv(torch.relu(self.up(x))).mean(-1)
        return self.head(self.moe(torch.relu(self.hf(h))))


# (start, stop, groups, rows, cols, row_end) of each edge-held tensor, in flat order
MIXED_BLOCKS = [(0, 24, 2, 4, 6, "src"), (24, 60, 2, 6, 6, "dst"), (60, 90, 1, 6, 5, "src"),
                (90, 150, 1, 12, 5, "dst"), (150, 180, 2, 10, 3, "dst"), (180, 185, 1, 1, 5, "dst")]


def _written(g) -> ParamGraph:
    """A plain ParamGraph with the same (written) tensors: its blocks come from detect_block."""
    return ParamGraph(**{f.name: getattr(g, f.name) for f in dataclasses.fields(ParamGraph)})


def _mixed(scramble=False):
    torch.manual_seed(0)
    g = build(Mixed(), torch.randn(2, 4, 5))
    p = _written(copy.copy(g))             # (g itself left unwritten)
    if scramble:                  # two sources of hf.weight swapped across rows: no block pattern left
        p.edge_index = p.edge_index.clone()
        p.edge_index[0, [64, 65]] = p.edge_index[0, [65, 64]]
    return g, p


def _block_tuple(b):
    if isinstance(b, ScatterBlock):
        return (b.start, b.stop)
    return (b.start, b.stop, b.groups, b.rows, b.cols, b.row_end)


def test_blocks_of_every_layout_are_found_in_the_written_edges_with_their_nodes():
    g, p = _mixed()
    assert [p.param_names[i] for i in p.flat_order[:p.num_edge_params]] == [
        "up.weight", "conv.weight", "hf.weight", "moe.gate_up_proj", "moe.down_proj", "head.weight"]
    found = edge_blocks(p)
    assert [_block_tuple(b) for b in found] == MIXED_BLOCKS
    assert edge_blocks(p) is found                       # cached on the graph
    src, dst = p.edge_index
    for b in found:                                      # each block's node tables against the written edges
        fixed, free = (dst, src) if b.row_end == "dst" else (src, dst)
        per = b.rows // b.groups
        r = fixed[b.start:b.stop].view(b.rows, b.cols)
        c = free[b.start:b.stop].view(b.groups, per, b.cols)
        assert torch.equal(b.row_nodes, r[:, 0]) and torch.equal(r, b.row_nodes.view(-1, 1).expand_as(r))
        assert torch.equal(b.col_nodes.view(b.groups, 1, b.cols).expand_as(c), c)
    # the same blocks as the factored graph derives without writing anything
    assert [_block_tuple(b) for b in edge_blocks(g)] == MIXED_BLOCKS
    assert not g.is_written("edge_index")


def test_a_tensor_without_a_block_pattern_is_a_scatter_between_blocks():
    _, p = _mixed(scramble=True)
    found = edge_blocks(p)
    assert [_block_tuple(b) for b in found] == MIXED_BLOCKS[:2] + [(60, 90)] + MIXED_BLOCKS[3:]
    assert isinstance(found[2], ScatterBlock) and all(isinstance(b, EdgeBlock) for b in found[3:])


def test_a_block_whose_destination_rows_do_not_group_is_tried_with_rows_fixed_to_the_source():
    """One edge per row: fixed to either end. Sources a, a, b cannot be column tables of equal groups
    (a group of 2 rows, then 1); with the rows fixed to the source, each distinct destination is
    its own group's one column."""
    from l2o.graph.blocks import detect_block
    src, dst = torch.tensor([0, 0, 1]), torch.tensor([5, 6, 7])
    b = detect_block(src, dst, 3)
    assert _block_tuple(b) == (0, 3, 3, 3, 1, "src")
    assert b.row_nodes.tolist() == [0, 0, 1] and b.col_nodes.tolist() == [5, 6, 7]


def _reference_sum(m, p, end):
    return torch.zeros(p.num_nodes, m.shape[1], dtype=m.dtype).index_add_(0, p.edge_index[0 if end == "src" else 1], m)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("scramble", [False, True])
def test_sums_means_and_node_terms_equal_a_plain_scatter_and_gather(dense, scramble, monkeypatch):
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 0 if dense else 10**12)
    found = []
    real = blocks._find_edge_blocks
    monkeypatch.setattr(blocks, "_find_edge_blocks", lambda graph: found.append(1) or real(graph))
    _, p = _mixed(scramble)
    assert use_dense_blocks(p) == dense
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(p.num_edges, 3, generator=gen, dtype=torch.float64)
    src, dst = p.edge_index
    for end, idx in (("src", src), ("dst", dst)):
        want = _reference_sum(m, p, end)
        got = sum_to_nodes(m, p, end)
        assert got.shape == (p.num_nodes, 3) and got.dtype == torch.float64
        torch.testing.assert_close(got, want)
        deg = torch.bincount(idx, minlength=p.num_nodes)
        assert bool((deg == 0).any())                    # nodes without such an edge: mean 0, not nan
        assert end == "dst" or bool((deg == 1).any())    # the head's inputs: one outgoing edge, the mean is it
        torch.testing.assert_close(mean_to_nodes(m, p, end), want / deg.clamp(min=1).unsqueeze(1).double())
    s_term = torch.randn(p.num_nodes, 3, generator=gen, dtype=torch.float64)
    d_term = torch.randn(p.num_nodes, 3, generator=gen, dtype=torch.float64)
    z = m.clone()
    out = add_node_terms_(z, p, s_term, d_term)
    assert out is z                                      # in place
    torch.testing.assert_close(z, m + s_term[src] + d_term[dst])
    # the blocks are found once (then cached) on the dense path, never below the threshold
    assert found == ([1] if dense else [])


def test_degrees_and_entry_counts_are_bincounts_over_every_node():
    g, p = _mixed()
    src, dst = p.edge_index
    n = p.num_nodes
    want = {"src": torch.bincount(src, minlength=n), "dst": torch.bincount(dst, minlength=n)}
    assert want["src"][-1] == 0 and want["dst"][0] == 0      # the last node has no outgoing edge
    for graph in (p, g):                                      # from the written edges, from the factors
        for end in ("src", "dst", "src"):
            d = edge_degree(graph, end)
            assert d.shape == (n,) and torch.equal(d, want[end])
        assert edge_degree(graph, "dst") is edge_degree(graph, "dst")     # cached per end
    assert not g.is_written("edge_index")
    counts = torch.bincount(p.entry_node, minlength=n)
    assert counts[-1] == 0 and counts.shape == (n,)
    assert torch.equal(entry_count(p), counts) and entry_count(p) is entry_count(p)
    # a plain graph whose last nodes hold no edge and no entry: the counts still cover them
    extra = dataclasses.replace(p, num_nodes=n + 3,
                                node_type=torch.cat([p.node_type, p.node_type[-1:].repeat(3)]),
                                node_io_index=torch.cat([p.node_io_index, torch.full((3,), -1)]),
                                node_depth=torch.cat([p.node_depth, torch.ones(3)]))
    assert torch.equal(edge_degree(extra, "src"), torch.cat([want["src"], torch.zeros(3, dtype=torch.long)]))
    assert torch.equal(edge_degree(extra, "dst"), torch.cat([want["dst"], torch.zeros(3, dtype=torch.long)]))
    assert torch.equal(entry_count(extra), torch.cat([counts, torch.zeros(3, dtype=torch.long)]))


def test_graphs_of_50000_edges_or_more_take_the_dense_path():
    def with_edges(e):
        return ParamGraph(1, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1),
                          torch.zeros(2, e, dtype=torch.long), torch.zeros(e, dtype=torch.long), torch.zeros(e, 2),
                          torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          torch.zeros(e, dtype=torch.long), ["w"], [torch.Size([e])], [0], 1)
    assert blocks.DENSE_BLOCK_MIN_EDGES == 50_000
    assert use_dense_blocks(with_edges(50_000)) and not use_dense_blocks(with_edges(49_999))


def test_an_edge_held_scalar_is_summed_by_a_scatter(monkeypatch):
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 0)
    long = dict(dtype=torch.long)
    g = ParamGraph(2, torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([0.0, 1.0]),
                   torch.tensor([[0], [1]]), torch.zeros(1, **long), torch.zeros(1, 2), torch.zeros(0, **long),
                   torch.zeros(0, **long), torch.zeros(1, **long), ["s"], [torch.Size([])], [0], 1)
    assert [_block_tuple(b) for b in edge_blocks(g)] == [(0, 1)]
    m = torch.tensor([[2.0, 3.0]])
    assert torch.equal(sum_to_nodes(m, g, "dst"), torch.tensor([[0.0, 0.0], [2.0, 3.0]]))
    assert torch.equal(sum_to_nodes(m, g, "src"), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


# ------------------------------------------------------------------ draw.py
def test_the_legend_is_centred_just_above_the_plot(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from l2o.graph import draw_graph
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    draw_graph(build(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(1, 3)),
               str(tmp_path / "g.png"))
    [fig] = saved
    FigureCanvasAgg(fig).draw()
    [ax] = fig.axes
    box, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
    # anchored at (0.5, 1.07) in axes coordinates by its lower centre (plus the default border
    # padding of half the font size, 8 pt)
    assert (legend.x0 + legend.x1) / 2 == pytest.approx((box.x0 + box.x1) / 2, abs=1.0)
    assert legend.y0 == pytest.approx(box.y0 + 1.07 * box.height + 0.5 * 8 * fig.dpi / 72, abs=1.0)


# ------------------------------------------------------------------ layers/hf.py: RMSNorm-style layers
class BiasedRMSNorm(nn.Module):
    """An RMSNorm-style layer (recognised by its class name) with a weight and a bias."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + self.bias


BiasedRMSNorm.__name__ = "OlmoLayerNorm"


def _both_captures(model, x):
    """The eager graph and the fx graph (with shapes) of ``model``."""
    return {"eager": build(model, x), "fx": build_graph(model, (x,), capture="fx", use_cache=False)}


def test_an_rms_norm_recognised_by_name_puts_weight_and_bias_on_the_units_it_normalises():
    from l2o.graph.param_graph import EntryKind
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), BiasedRMSNorm(3), nn.Linear(3, 2))
    for capture, g in _both_captures(model, torch.randn(2, 4)).items():
        assert g.unstructured == [] and not_followed(g) == [], capture
        units = part(g, "0.weight")[1][:, 0]
        assert torch.equal(part(g, "1.weight"), units) and torch.equal(part(g, "1.bias"), units), capture
        assert (kinds(g, "1.weight") == int(EntryKind.NORM_WEIGHT)).all(), capture
        assert (kinds(g, "1.bias") == int(EntryKind.NORM_BIAS)).all(), capture
        assert torch.equal(part(g, "2.weight")[0][0], units) and g.num_nodes == 4 + 3 + 2, capture


def test_an_rms_norm_as_the_first_layer_holds_its_entries_on_the_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(BiasedRMSNorm(3), nn.Linear(3, 2))
    for capture, g in _both_captures(model, torch.randn(2, 3)).items():
        nodes = part(g, "0.weight")
        assert g.num_nodes == 5 and (g.node_type[nodes] == 0).all(), capture      # INPUT
        assert torch.equal(part(g, "0.bias"), nodes) and torch.equal(part(g, "1.weight")[0][0], nodes), capture


class NormOverLength(nn.Module):
    """A conv map [B, 4, 3] normalised over its last dim (length 3, not the 4 channels): the norm's
    units are 3 new ones; the head reads them, twice when ``cat`` (a feature concatenation)."""

    def __init__(self, cat=False):
        super().__init__()
        self.cat = cat
        self.conv, self.norm, self.head = nn.Conv1d(2, 4, 3), BiasedRMSNorm(3), nn.Linear(6 if cat else 3, 2)

    def forward(self, x):
        y = self.norm(self.conv(x))
        return self.head(torch.cat([y, y], dim=2) if self.cat else y)


@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("cat", [False, True])
def test_an_rms_norm_over_another_dim_than_its_inputs_units_gets_units_of_its_own(shapes, cat):
    """(fx capture: the eager one reads the conv map along its last dim as 3 columns, each the
    largest of the 4 channel units, and the norm maps onto those)"""
    from l2o.graph.param_graph import NodeType
    torch.manual_seed(0)
    model, x = NormOverLength(cat), torch.randn(2, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, (x,) if shapes else None, capture="fx", use_cache=False)
    assert g.unstructured == [] and not_followed(g) == []
    conv_units = part(g, "conv.weight")[1][:, 0, 0]
    nodes = part(g, "norm.weight")
    assert torch.equal(part(g, "norm.bias"), nodes)
    assert nodes.unique().numel() == 3 and not bool(torch.isin(nodes, conv_units).any())
    assert (g.node_type[nodes] == int(NodeType.HIDDEN)).all()
    # at the conv's depth (normalised by the deepest, the head's: 2)
    assert torch.allclose(g.node_depth[nodes], torch.full((3,), 0.5))
    assert torch.allclose(g.node_depth[conv_units], torch.full((4,), 0.5))
    head_src = part(g, "head.weight")[0][0]
    assert torch.equal(head_src, torch.cat([nodes, nodes]) if cat else nodes)
    assert g.num_nodes == 2 + 4 + 3 + 2


def _norm_class(name, params=("weight",), child=False, weight_shape=(3,), buffer=False):
    def init(self):
        nn.Module.__init__(self)
        for p in params:
            if buffer and p == "weight":
                self.register_buffer("weight", torch.ones(weight_shape))
            else:
                setattr(self, p, nn.Parameter(torch.ones(weight_shape if p == "weight" else (3,))))
        if child:
            self.inner = nn.ReLU()
    return type(name, (nn.Module,), {"__init__": init, "forward": lambda self, x: self.weight * x})()


def test_rms_norms_are_recognised_by_class_name_and_a_lone_1d_weight():
    from l2o.graph.layers import hf, mapper_for
    for name in sorted(hf.NORM_NAMES) + ["MyRMSNorm", "RMSNorm"]:
        assert hf.is_rms_norm(_norm_class(name)), name
        assert hf.is_rms_norm(_norm_class(name, ("weight", "bias"))), name
        assert mapper_for(_norm_class(name)) is hf.map_rms_norm, name
    assert hf.NORM_NAMES == {"T5LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "GemmaRMSNorm",
                             "MixtralRMSNorm", "PhiRMSNorm", "Phi3RMSNorm", "OlmoLayerNorm", "MT5LayerNorm",
                             "LongT5LayerNorm", "UMT5LayerNorm"}
    for m in (_norm_class("MyLayerNorm"), _norm_class("RMSNormish"), _norm_class("Myrmsnorm"),
              _norm_class("MyRMSNorm", ("weight", "scale")), _norm_class("MyRMSNorm", ("bias",)),
              _norm_class("MyRMSNorm", child=True), _norm_class("MyRMSNorm", weight_shape=(3, 3)),
              _norm_class("MyRMSNorm", buffer=True)):
        assert not hf.is_rms_norm(m), type(m).__name__


def test_hf_conv1d_is_recognised_by_class_name_and_a_2d_weight():
    from l2o.graph.layers import hf
    assert hf.is_conv1d(Conv1D(3, 4))
    for m in (_norm_class("Conv1d", weight_shape=(3, 4)), _norm_class("Conv1D", weight_shape=(3,)),
              _norm_class("Conv1D", weight_shape=(3, 4, 1)), _norm_class("Conv1D", weight_shape=(3, 4), buffer=True),
              _norm_class("Conv1D", ("bias",))):
        assert not hf.is_conv1d(m), type(m).__name__


# ------------------------------------------------------------------ layers/moe.py: which modules are 3-D experts
class Experts(nn.Module):
    """Parameters of the given shapes (names as HF's experts modules), attributes as given."""

    def __init__(self, shapes: dict, child=None, **attrs):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape)))
        if child is not None:
            self.act = child
        for k, v in attrs.items():
            setattr(self, k, v)


def test_experts_are_recognised_by_their_parameters_shapes_and_layout_flags():
    from l2o.graph.layers import mapper_for
    from l2o.graph.layers.moe import expert_layout, is_moe_experts, map_moe_experts
    E, I, H = 2, 3, 5
    gated = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
    gated_t = {"gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H)}
    plain = {"up_proj": (E, I, H), "down_proj": (E, H, I)}
    biases = {"gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, H)}
    found = {
        "gated": (Experts(gated), (E, I, H)),
        "gated, activation child": (Experts(gated, child=nn.SiLU()), (E, I, H)),
        "gated, flags false": (Experts(gated, is_transposed=False, has_post_expert_norm=False), (E, I, H)),
        "gated, transposed": (Experts(gated_t, is_transposed=True), (E, I, H)),
        "gated, biases": (Experts({**gated, **biases}), (E, I, H)),
        "not gated": (Experts(plain), (E, I, H)),
        "not gated, bias": (Experts({**plain, "up_proj_bias": (E, I), "down_proj_bias": (E, H)}), (E, I, H)),
        "not gated, transposed": (Experts({"up_proj": (E, H, I), "down_proj": (E, I, H)}, is_transposed=True),
                                  (E, I, H)),
    }
    for what, (m, layout) in found.items():
        assert expert_layout(m) == layout and is_moe_experts(m), what
        assert mapper_for(m) is map_moe_experts, what
    refused = {
        "post-expert norm": Experts(gated, has_post_expert_norm=True),
        "a child with parameters": Experts(gated, child=nn.Linear(2, 2)),
        "no parameters": Experts({}),
        "an extra parameter": Experts({**gated, "scale": (E,)}),
        "no down projection": Experts({"gate_up_proj": (E, 2 * I, H)}),
        "no up projection": Experts({"down_proj": (E, H, I)}),
        "2-D up projection": Experts({"gate_up_proj": (2 * I, H), "down_proj": (E, H, I)}),
        "2-D down projection": Experts({"gate_up_proj": (E, 2 * I, H), "down_proj": (H, I)}),
        "odd gated rows": Experts({"gate_up_proj": (E, 2 * I + 1, H), "down_proj": (E, H, I)}),
        "down projection of another width": Experts({"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, 2 * I)}),
        "down projection transposed only": Experts({"gate_up_proj": (E, 2 * I, H), "down_proj": (E, I, H)}),
        "transposed flag on untransposed shapes": Experts(gated, is_transposed=True),
        "untransposed flag on transposed shapes": Experts(gated_t),
        "up bias of another shape": Experts({**gated, "gate_up_proj_bias": (E, I)}),
        "plain up bias of another shape": Experts({**plain, "up_proj_bias": (E, 2 * I)}),
        "down bias of another shape": Experts({**gated, "down_proj_bias": (E, I)}),
        "down bias transposed": Experts({**gated, "down_proj_bias": (H, E)}),
    }
    for what, m in refused.items():
        assert expert_layout(m) is None and not is_moe_experts(m), what


class ExpertsOverLength(nn.Module):
    """3-D experts applied along the last dim (length 5) of a conv map with 4 channels: their input
    has 5 units of its own, not the conv's 4."""

    def __init__(self):
        super().__init__()
        self.conv, self.moe, self.head = nn.Conv1d(2, 4, 3), MoEExperts(E=2, H=5, I=3), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.moe(self.conv(x)))


def test_experts_whose_input_has_other_units_read_fresh_units_at_its_depth():
    from l2o.graph.param_graph import NodeType
    torch.manual_seed(0)
    g = build_graph(ExpertsOverLength(), (torch.randn(2, 2, 7),), capture="fx", use_cache=False)
    assert g.unstructured == [] and not_followed(g) == []
    conv_units = part(g, "conv.weight")[1][:, 0, 0]
    src, dst = part(g, "moe.gate_up_proj")                 # [E, 2I, H]
    ins = src[0, 0]
    assert torch.equal(src, ins.view(1, 1, 5).expand(2, 6, 5))
    assert ins.unique().numel() == 5 and not bool(torch.isin(ins, conv_units).any())
    assert (g.node_type[ins] == int(NodeType.HIDDEN)).all()
    # depths (normalised by the deepest, the head's: 4): conv and the experts' input 1, units 2, output 3
    assert torch.allclose(g.node_depth[ins], torch.full((5,), 0.25))
    assert torch.allclose(g.node_depth[conv_units], torch.full((4,), 0.25))
    assert torch.allclose(g.node_depth[dst[:, :, 0]], torch.full((2, 6), 0.5))
    assert g.num_nodes == 2 + 4 + 5 + 2 * 3 + 5 + 2


@pytest.mark.parametrize("width", [0, 3])
def test_a_weight_with_rows_but_no_columns_takes_a_step(width):
    """``nn.Linear(0, 3)`` has a ``[3, 0]`` weight: no column to read a block
    from (``detect_block`` read column 0 of it and the first step raised
    IndexError); it steps like any other weight, here beside a real one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(4, width)
    opt = l2o.GMNOptimizer(model, example_inputs=(x,))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    after = list(model.parameters())
    assert after[0].shape == (3, width)
    assert all(torch.isfinite(p).all() for p in after)
    assert not torch.equal(after[2], before[2])      # the real weight moved
