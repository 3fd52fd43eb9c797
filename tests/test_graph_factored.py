"""build_graph keeps a weight's edges factored (l2o/graph/factored.py): what is
derived from the factors equals what the original code derives from the
written per-edge tensors, and the optimizer steps identically either way."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from l2o.fast import plan as plan_mod
from l2o.fast.lean import LeanGraph, entry_slice, lean_graph, materialized
from l2o.graph import blocks as blocks_mod
from l2o.graph.factored import HEAVY, FactoredGraph
from l2o.graph.param_graph import ParamGraph


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.pos = nn.Parameter(torch.randn(6, 8))
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 13, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h, _ = self.rnn(self.emb(x) + self.pos[: x.shape[1]])
        return self.out(h)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)), None


def _mixtral():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
        vocab_size=30, max_position_embeddings=16, num_local_experts=3, num_experts_per_tok=2)), None


def _experts(**layout):
    """A hand-made 3-D experts module (tests/test_graph_moe_tied.py) in one of HF's layouts."""
    from test_graph_moe_tied import MoENet
    return MoENet(**layout), (torch.randn(2, 5),)


MODELS = {
    "mlp": lambda: (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), None),
    "grouped_conv_flatten": lambda: (nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(),
                                                   nn.Conv1d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4, 3)),
                                     (torch.randn(2, 4, 8),)),
    "conv_transpose": lambda: (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)),
                               (torch.randn(2, 4, 5, 5),)),
    "conv_bn_flatten": lambda: (nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(6 * 4 * 4, 3)), (torch.randn(2, 3, 6, 6),)),
    "mha_transformer": lambda: (nn.Sequential(nn.Embedding(11, 16),
                                              nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)),
                                (torch.randint(0, 11, (2, 5)),)),
    "lstm_proj": lambda: (nn.LSTM(5, 7, num_layers=2, proj_size=3, bidirectional=True), (torch.randn(4, 2, 5),)),
    "tied_gru_lm": lambda: (TiedLM(), (torch.randint(0, 13, (2, 6)),)),
    "hf_gpt2": _gpt2,
    # MoE experts [E, 2I, H] / [E, H, I]: dense blocks of E*2I rows / E groups of H rows
    "hf_mixtral": _mixtral,
    "experts_interleaved_transposed": lambda: _experts(transposed=True, concatenated=False, bias=True),
    "experts_no_gate": lambda: _experts(gated=False),
}


def _build(name):
    torch.manual_seed(0)
    model, example = MODELS[name]()
    return model, l2o.build_graph(model, example, use_cache=False)


@pytest.mark.parametrize("name", MODELS)
def test_factored_derivations_equal_the_written_graph(name):
    _, g = _build(name)
    _compare(g)


def _hand_built() -> FactoredGraph:
    """Edge chunks no standard layer makes: a chunk shape whose rows do not
    line up with the weight's, full-size (unfactored) endpoint tensors with a
    grouped pattern, irregular edges, per-entry kinds and positions."""
    from l2o.graph.param_graph import EdgeKind, NodeType
    from l2o.graph.state import GraphState

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(4, 6))
            self.c = nn.Parameter(torch.randn(5, 3))
            self.d = nn.Parameter(torch.randn(4, 2, 3))

    m = Bag()
    st = GraphState(m)
    x = st.new_nodes(12, NodeType.INPUT, 0, input_group=0)
    h = st.new_nodes(8, NodeType.HIDDEN, 1)
    # a: rows 6, chunk (2, 12): row-constant destination, columns x[0:4] per row -> a block found the slow way
    dst = h[:6].view(6, 1).expand(6, 4).reshape(2, 12)
    src = x[:4].view(1, 4).expand(6, 4).reshape(2, 12)
    st.add_edges(m.a, (2, 12), src, dst, EdgeKind.LINEAR,
                 torch.linspace(-1, 1, 24).view(2, 12, 1).expand(2, 12, 2))
    # b: full-size endpoints, 2 groups of 2 rows sharing a column table
    rows = h[:4].view(4, 1).expand(4, 6).clone()
    cols = torch.stack([x[:6], x[6:12]]).repeat_interleave(2, 0)
    kind = torch.tensor([int(EdgeKind.ATTN_Q), int(EdgeKind.ATTN_K)]).repeat(3).view(1, 6).expand(4, 6).clone()
    st.add_edges(m.b, (4, 6), cols, rows, kind)
    # c: irregular
    g = torch.Generator().manual_seed(0)
    st.add_edges(m.c, (5, 3), torch.randint(0, 12, (5, 3), generator=g), torch.randint(12, 20, (5, 3), generator=g),
                 EdgeKind.CONV, torch.rand(5, 3, 2, generator=g))
    # d: rows 4, chunk (4, 2, 3): kind varies by row -> block, not column-static
    st.add_edges(m.d, (4, 2, 3), x[:6].view(1, 2, 3), h[4:8].view(4, 1, 1),
                 torch.tensor([0, 1, 0, 1]).view(4, 1, 1))
    st.mark_outputs(h[6:].tolist())
    graph = st.finish([], [])
    assert isinstance(graph, FactoredGraph)
    return graph


def test_factored_derivations_on_unusual_chunks():
    g = _hand_built()
    kinds = [type(b).__name__ for b in blocks_mod.edge_blocks(copy.copy(g))]
    assert kinds == ["EdgeBlock", "EdgeBlock", "ScatterBlock", "EdgeBlock"], kinds
    _compare(g)


def _compare(g):
    assert isinstance(g, FactoredGraph) and not any(n in g.__dict__ for n in HEAVY)
    full = materialized(copy.copy(g))       # a plain ParamGraph with every tensor written (g left alone)
    assert type(full) is ParamGraph and full.num_edges == g.num_edges
    assert not any(n in g.__dict__ for n in HEAVY)
    # the written tensors are consistent with the flat layout
    for k, sl in enumerate(full.tensor_slices):
        assert bool((full.tensor_id[sl] == k).all())
    # dense blocks, degrees, per-column kinds and positions
    fb, db = blocks_mod.edge_blocks(g), blocks_mod.edge_blocks(full)
    assert len(fb) == len(db) == g.num_edge_params
    for a, b in zip(fb, db):
        assert type(a) is type(b) and (a.start, a.stop) == (b.start, b.stop)
        if isinstance(a, blocks_mod.EdgeBlock):
            assert (a.groups, a.rows, a.cols, a.row_end) == (b.groups, b.rows, b.cols, b.row_end)
            assert torch.equal(a.row_nodes, b.row_nodes) and torch.equal(a.col_nodes, b.col_nodes)
            sa, sb = plan_mod._column_static(g, a), plan_mod._column_static(full, b)
            assert (sa is None) == (sb is None)
            if sa is not None:
                assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
                assert sa[1].dtype == sb[1].dtype
    for end in ("src", "dst"):
        assert torch.equal(blocks_mod.edge_degree(g, end), blocks_mod.edge_degree(full, end))
    assert g.edge_components() == full.edge_components()
    assert g.has_edge_pos == (bool(full.edge_pos.numel()) and bool(full.edge_pos.any()))
    # ranges, also across tensor boundaries
    n = g.num_edges
    for s, e in ((0, n), (1, max(1, n // 3)), (n // 3, n - 1), (n // 2, n)):
        for field in ("edge_index", "edge_kind", "edge_pos"):
            want = full.edge_index[:, s:e] if field == "edge_index" else getattr(full, field)[s:e]
            assert torch.equal(entry_slice(g, field, s, e), want), (field, s, e)
    # nothing above wrote a per-edge tensor of g
    assert not any(k in g.__dict__ for k in ("edge_index", "tensor_id"))
    # lean copies from the factors and from the written tensors hold the same
    lf, lm = lean_graph(g), lean_graph(full)
    for field in ("edge_index", "edge_kind", "edge_pos", "tensor_id", "entry_node", "entry_kind"):
        assert torch.equal(getattr(lf, field), getattr(full, field)), field
        assert set(lf._lean) == set(lm._lean)
    for field, rl in lm._lean.items():
        assert torch.equal(lf._lean[field].values, rl.values) and torch.equal(lf._lean[field].counts, rl.counts)
    # reading an attribute writes it with the values of the eager build
    for field in HEAVY:
        assert torch.equal(getattr(g, field), getattr(full, field))


def test_assigning_an_index_tensor_drops_the_factors():
    _, g = _build("mlp")
    e = g.edge_index.clone()
    e[1] = e[1].flip(0)
    g.edge_index = e
    assert g.edge_factors is None and torch.equal(g.edge_index, e)
    assert g.num_edges == e.shape[1] and g.tensor_id.shape[0] == g.num_params
    assert isinstance(blocks_mod.edge_blocks(g)[0], blocks_mod.ScatterBlock)


def test_to_keeps_the_factors_and_copies_carry_them():
    _, g = _build("conv_bn_flatten")
    for h in (g.to("cpu"), copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        assert isinstance(h, FactoredGraph) and h.edge_factors is not None
        for field in HEAVY:
            assert torch.equal(getattr(h, field), getattr(g, field))


def _train(model, graph_of, steps=3):
    torch.manual_seed(1)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = l2o.GMNOptimizer(model, weights=None)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("path", ["chunked", "reference"])
def test_optimizer_steps_identically_on_a_written_graph(path, use_step_path, monkeypatch):
    """GMNOptimizer on the factored graph and on the same graph with every
    tensor written: bit-identical parameters after three steps."""
    use_step_path(path)
    monkeypatch.setattr(blocks_mod, "DENSE_BLOCK_MIN_EDGES", 0)
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.ReLU(), nn.Linear(96, 10))  # noqa: E731
    models = [make() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    a, opt_a = _train(models[0], None)
    import l2o.graph as graph_pkg
    real = graph_pkg.build_graph
    monkeypatch.setattr(graph_pkg, "build_graph", lambda *args, **kw: materialized(real(*args, **kw)))
    b, opt_b = _train(models[1], None)
    assert type(opt_b.graph) is not FactoredGraph
    if path == "chunked":
        assert isinstance(opt_a.graph, LeanGraph) and isinstance(opt_b.graph, LeanGraph)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_optimizer_on_a_large_model_writes_no_per_edge_tensor(monkeypatch):
    """The chunked optimizer's construction reads only the factors."""
    import l2o.graph.factored as factored
    written = []
    real = factored.FactoredGraph._materialize
    monkeypatch.setattr(factored.FactoredGraph, "_materialize",
                        lambda self, name: written.append(name) or real(self, name))
    model = nn.Sequential(nn.Embedding(300, 64), nn.Flatten(), nn.Linear(64 * 4, 256), nn.ReLU(),
                          nn.Linear(256, 300))
    opt = l2o.GMNOptimizer(model, weights=None, example_inputs=(torch.randint(0, 300, (2, 4)),))
    assert isinstance(opt.graph, LeanGraph)
    x = torch.randint(0, 300, (8, 4))
    opt.zero_grad()
    F.cross_entropy(model(x), x[:, 0]).backward()
    opt.step()
    # edge_kind/edge_pos may be written as stride-0 constant views (no memory); nothing else
    assert set(written) <= {"edge_kind", "edge_pos"}, written
