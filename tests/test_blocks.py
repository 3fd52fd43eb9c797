"""Dense-block aggregation (l2o/graph/blocks.py) equals the plain scatter/gather."""
import pytest
import torch
from torch import nn
from torch_geometric.utils import scatter

import l2o
from l2o.graph import blocks
from l2o.graph.blocks import EdgeBlock, ScatterBlock, add_node_terms_, edge_blocks, sum_to_nodes

MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), None),
    "grouped_conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=8),
                                             nn.Flatten(), nn.Linear(8 * 4, 3)), (torch.randn(2, 4, 8),)),
    "embedding_transformer": (lambda: nn.Sequential(nn.Embedding(11, 16),
                                                    nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)),
                              (torch.randint(0, 11, (2, 5)),)),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)),
                       (torch.randn(2, 4, 5, 5),)),
}


@pytest.fixture
def dense_always(monkeypatch):
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 0)


@pytest.mark.parametrize("name", MODELS)
def test_blocks_are_detected_and_sums_match_scatter(name, dense_always):
    torch.manual_seed(0)
    make, example = MODELS[name]
    graph = l2o.build_graph(make(), example)
    found = edge_blocks(graph)
    assert len(found) == graph.num_edge_params
    assert all(isinstance(b, EdgeBlock) for b in found)  # every standard layer is a dense block
    m = torch.randn(graph.num_edges, 3)
    for end, row in (("src", 0), ("dst", 1)):
        expected = scatter(m, graph.edge_index[row], 0, dim_size=graph.num_nodes, reduce="sum")
        torch.testing.assert_close(sum_to_nodes(m, graph, end), expected)
    src_term, dst_term = torch.randn(graph.num_nodes, 3), torch.randn(graph.num_nodes, 3)
    expected = m + src_term[graph.edge_index[0]] + dst_term[graph.edge_index[1]]
    torch.testing.assert_close(add_node_terms_(m.clone(), graph, src_term, dst_term), expected)


def test_irregular_edges_fall_back_to_scatter(dense_always):
    graph = l2o.build_graph(nn.Sequential(nn.Linear(4, 3)))
    # scramble the destinations: no block pattern left
    graph.edge_index = graph.edge_index.clone()
    graph.edge_index[1] = graph.edge_index[1][torch.randperm(graph.num_edges, generator=torch.Generator().manual_seed(0))]
    graph.forget_derived()
    assert isinstance(edge_blocks(graph)[0], ScatterBlock)
    m = torch.randn(graph.num_edges, 2)
    expected = scatter(m, graph.edge_index[1], 0, dim_size=graph.num_nodes, reduce="sum")
    torch.testing.assert_close(sum_to_nodes(m, graph, "dst"), expected)


def test_gmn_output_identical_on_both_paths(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    graph = l2o.build_graph(model, (torch.randn(1, 2, 5, 5),))
    lopt = l2o.GMNLOpt()
    with torch.no_grad():
        lopt.edge_head.weight.normal_()
    flat = graph.gather([p.detach() for p in model.parameters()])
    grad = torch.randn_like(flat)
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 10**12)
    sparse_out, _ = lopt(graph, flat, grad, lopt.init_state(flat))
    monkeypatch.setattr(blocks, "DENSE_BLOCK_MIN_EDGES", 0)
    dense_out, _ = lopt(graph, flat, grad, lopt.init_state(flat))
    torch.testing.assert_close(dense_out, sparse_out, rtol=1e-5, atol=1e-7)
