"""GMNConv is the PyG message-passing layer it documents: checked against the
same math run through ``MessagePassing.propagate`` (generic scatter means over
``edge_index``), on the gather/scatter path and on the dense-block
specialisation (``l2o/graph/blocks.py``) that the layer runs on large graphs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import l2o
import tasks
from l2o.gmn_conv import GMNConv
from l2o.graph import blocks
from l2o.graph.blocks import EdgeBlock, ScatterBlock, edge_blocks

torch_geometric = pytest.importorskip("torch_geometric")
from torch_geometric.nn import MessagePassing  # noqa: E402


class PyGRound(MessagePassing):
    """``GMNConv``'s message, mean-aggregated by PyG at the edges' targets
    (``flow="source_to_target"``: ``mean_{i -> v} m_iv``) or sources
    (``"target_to_source"``: ``mean_{v -> j} m_vj``)."""

    def __init__(self, conv: GMNConv, flow: str):
        super().__init__(aggr="mean", flow=flow)
        self.conv = conv

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        """[N, D] the aggregated messages."""
        return self.propagate(edge_index, h=h, e=e, size=(h.shape[0], h.shape[0]))

    def edge_messages(self, h: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        """[E, D] the messages themselves (the edge states' increments)."""
        return self.edge_updater(edge_index, h=h, e=e, size=(h.shape[0], h.shape[0]))

    def message(self, h_i: Tensor, h_j: Tensor, e: Tensor) -> Tensor:
        # PyG's h_j is the node a message comes from, h_i the one it goes to
        src, dst = (h_j, h_i) if self.flow == "source_to_target" else (h_i, h_j)
        return torch.relu(self.conv.edge_lin(e) + self.conv.src_lin(src) + self.conv.dst_lin(dst))

    def edge_update(self, h_i: Tensor, h_j: Tensor, e: Tensor) -> Tensor:
        return self.message(h_i, h_j, e)


def pyg_forward(conv: GMNConv, h: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
    into, out_of = PyGRound(conv, "source_to_target"), PyGRound(conv, "target_to_source")
    m = into.edge_messages(h, e, edge_index)
    return conv.update((into(h, e, edge_index), out_of(h, e, edge_index)), h), e + m


def _graphs():
    for family in ("mlp", "cnn", "transformer", "rnn"):
        task = tasks.sample_task(family, 1, "train")
        yield family, l2o.build_graph(task.init(0), task.example_inputs())
    graph = l2o.build_graph(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), use_cache=False)
    graph.edge_index = graph.edge_index.clone()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    graph.edge_index[1, :12] = graph.edge_index[1, :12][perm]   # no block pattern left in the first layer
    yield "irregular", graph


GRAPHS = dict(_graphs())


@pytest.mark.parametrize("aggregation", ["gather_scatter", "dense_blocks"])
@pytest.mark.parametrize("name", GRAPHS)
def test_gmn_conv_equals_its_pyg_propagate_form(name, aggregation, monkeypatch):
    graph = GRAPHS[name]
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 0 if aggregation == "dense_blocks" else 10**12)
    if aggregation == "dense_blocks":
        kinds = {type(b) for b in edge_blocks(graph)}
        assert EdgeBlock in kinds and (name != "irregular" or ScatterBlock in kinds)
    torch.manual_seed(0)
    # in float64, so the different summation orders leave far less than any mistake would
    conv = GMNConv(node_dim=12, edge_dim=6).double()
    h = torch.randn(graph.num_nodes, 12, dtype=torch.float64, requires_grad=True)
    e = torch.randn(graph.num_edges, 6, dtype=torch.float64, requires_grad=True)

    got = conv(h, e, graph)
    ref = pyg_forward(conv, h, e, graph.edge_index)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # and the meta-gradients that flow through it
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in got]
    inputs = [h, e, *conv.parameters()]
    grads_got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, got)), inputs)
    grads_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), inputs)
    for a, b in zip(grads_got, grads_ref):
        torch.testing.assert_close(a, b)


def test_gmn_conv_is_not_a_pyg_layer_in_name_only():
    """A plain module: running the optimizers needs no torch_geometric."""
    assert not isinstance(GMNConv(4, 2), MessagePassing)
    assert [n for n, _ in GMNConv(4, 2).named_parameters()] == [
        "edge_lin.weight", "edge_lin.bias", "src_lin.weight", "dst_lin.weight",
        "node_mlp.0.weight", "node_mlp.0.bias", "node_mlp.2.weight", "node_mlp.2.bias"]


def test_the_optimizers_and_meta_training_run_without_torch_geometric():
    """torch_geometric is required only where it does work (``ParamGraph.to_pyg``)."""
    code = "\n".join([
        "import sys",
        "sys.modules['torch_geometric'] = None   # any import of it raises ImportError",
        "import torch, l2o, meta_train",
        "from torch import nn",
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
        "for opt in (l2o.GMNOptimizer(model), l2o.MLPOptimizer(model)):",
        "    model(torch.randn(3, 4)).sum().backward()",
        "    opt.step()",
        "lopt = l2o.GMNLOpt()",
        "graph = l2o.build_graph(model)",
        "flat = graph.gather([p.detach() for p in model.parameters()])",
        "update, _ = lopt(graph, flat, torch.randn_like(flat), lopt.init_state(flat))",
        "update.sum().backward()",
        "assert not any(m.startswith('torch_geometric.') for m in sys.modules)",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
