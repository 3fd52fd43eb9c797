"""The graph metanetwork learned optimizer.

Reads a :class:`~l2o.graph.ParamGraph` with per-entry features on it and emits
one (direction, log-magnitude) pair per parameter entry:

1. **Encode.** Edges: ``e = σ(W_f x_e + W_p pos_e + E_kind[kind_e] + U_e t)``.
   Nodes: ``h = E_type[type_v] + W_z depth_v + W_io io(v) + U_n t +
   mean_{k held by v}(W_x x_k + E_entry[kind_k])`` -- biases and normalisation
   parameters enter through the node that holds them. ``io(v)`` is a fixed
   sinusoidal code of the position of an input/output neuron (zero for hidden
   ones, which stay interchangeable); ``t`` are the time features (one row per
   run on a :class:`~l2o.graph.batch.BatchedGraph`).
2. **Propagate.** ``num_layers`` rounds of :class:`~l2o.gmn_conv.GMNConv`.
3. **Read out.** Each edge: ``MLP(e, x_e, h_src, h_dst, t)``; each node-held
   entry: ``MLP(x_k, h_v, kind_k, t)``, both factored so no concatenation of
   edge-sized tensors is built.

No feature depends on a hidden node's index, so the whole map is equivariant to
the permutations of hidden neurons that leave the network's function unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .features import NUM_ENTRY_FEATURES, NUM_TIME_FEATURES
from .gmn_conv import GMNConv
from .graph.batch import per_run, run_index
from .graph.blocks import add_node_terms_, entry_count
from .graph.param_graph import NUM_EDGE_KINDS, NUM_ENTRY_KINDS, NUM_NODE_TYPES, NodeType, ParamGraph
from .lopt import LearnedOptimizer, small_init_

_IO_FREQS = 4


def io_encoding(io_index: Tensor, node_type: Tensor) -> Tensor:
    """[N, 2*_IO_FREQS] sinusoidal code of an input/output neuron's position;
    zero on hidden and tensor nodes so they carry no index information."""
    pos = io_index.clamp(min=0).float().unsqueeze(1)
    freqs = torch.pi / (2.0 ** torch.arange(_IO_FREQS, device=pos.device, dtype=torch.float32) * 4.0)
    code = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=1)
    is_io = (node_type == NodeType.INPUT) | (node_type == NodeType.OUTPUT)
    return code * is_io.unsqueeze(1)


class GMNLOpt(LearnedOptimizer):
    kind = "gmn"

    def __init__(self, node_dim: int = 32, edge_dim: int = 8, hidden: int = 16, num_layers: int = 2,
                 **kwargs):
        super().__init__(**kwargs)
        self.node_dim, self.edge_dim, self.hidden, self.num_layers = node_dim, edge_dim, hidden, num_layers
        nf, nt = NUM_ENTRY_FEATURES, NUM_TIME_FEATURES

        self.edge_feat = nn.Linear(nf, edge_dim)
        self.edge_pos = nn.Linear(2, edge_dim, bias=False)
        self.edge_kind = nn.Embedding(NUM_EDGE_KINDS, edge_dim)
        self.edge_time = nn.Linear(nt, edge_dim, bias=False)

        self.node_type = nn.Embedding(NUM_NODE_TYPES, node_dim)
        self.node_depth = nn.Linear(1, node_dim, bias=False)
        self.node_io = nn.Linear(2 * _IO_FREQS, node_dim, bias=False)
        self.node_time = nn.Linear(nt, node_dim, bias=False)
        self.entry_in = nn.Linear(nf, node_dim)
        self.entry_in_kind = nn.Embedding(NUM_ENTRY_KINDS, node_dim)

        self.convs = nn.ModuleList(GMNConv(node_dim, edge_dim) for _ in range(num_layers))

        self.edge_out_e = nn.Linear(edge_dim, hidden)
        self.edge_out_x = nn.Linear(nf, hidden, bias=False)
        self.edge_out_src = nn.Linear(node_dim, hidden, bias=False)
        self.edge_out_dst = nn.Linear(node_dim, hidden, bias=False)
        self.edge_out_time = nn.Linear(nt, hidden, bias=False)
        self.edge_head = small_init_(nn.Linear(hidden, 2))

        self.entry_out_x = nn.Linear(nf, hidden)
        self.entry_out_h = nn.Linear(node_dim, hidden, bias=False)
        self.entry_out_kind = nn.Embedding(NUM_ENTRY_KINDS, hidden)
        self.entry_out_time = nn.Linear(nt, hidden, bias=False)
        self.entry_head = small_init_(nn.Linear(hidden, 2))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "node_dim": self.node_dim, "edge_dim": self.edge_dim,
                "hidden": self.hidden, "num_layers": self.num_layers}

    # ------------------------------------------------------------- encoders
    def encode_edges(self, g: ParamGraph, x_edge: Tensor, t: Tensor) -> Tensor:
        # in-place sums on fresh intermediates: see GMNConv.message
        e = self.edge_feat(x_edge)
        e += self.edge_kind(g.edge_kind)
        if g.has_edge_pos:  # all-zero positions (MLPs) contribute nothing
            e += self.edge_pos(g.edge_pos)
        e += per_run(self.edge_time(t), run_index(g, "edge"))
        return e.relu_()

    def encode_nodes(self, g: ParamGraph, x_entry: Tensor, t: Tensor) -> Tensor:
        h = (self.node_type(g.node_type) + self.node_depth(g.node_depth.unsqueeze(1))
             + self.node_io(io_encoding(g.node_io_index, g.node_type)) + per_run(self.node_time(t), run_index(g, "node")))
        if x_entry.shape[0]:
            held = self.entry_in(x_entry) + self.entry_in_kind(g.entry_kind)
            sums = h.new_zeros(g.num_nodes, self.node_dim).index_add_(0, g.entry_node, held)
            counts = entry_count(g).clamp(min=1)
            h = h + sums / counts.unsqueeze(1).to(h.dtype)
        return h

    # -------------------------------------------------------------- predict
    def predict(self, graph: ParamGraph, x: Tensor, t: Tensor) -> Tensor:
        x_edge, x_entry = graph.split_flat(x)
        e = self.encode_edges(graph, x_edge, t)
        h = self.encode_nodes(graph, x_entry, t)
        for conv in self.convs:
            h, e = conv(h, e, graph)

        z_edge = self.edge_out_e(e)
        z_edge += self.edge_out_x(x_edge)
        add_node_terms_(z_edge, graph, self.edge_out_src(h), self.edge_out_dst(h))
        z_edge += per_run(self.edge_out_time(t), run_index(graph, "edge"))
        z_edge.relu_()
        return torch.cat([self.edge_head(z_edge), self.readout_entries(graph, x_entry, h, t)], dim=0)

    def readout_entries(self, graph: ParamGraph, x_entry: Tensor, h: Tensor, t: Tensor) -> Tensor:
        """[M, 2] outputs of the node-held entries from their features and final node states."""
        z_entry = F.relu(self.entry_out_x(x_entry) + self.entry_out_h(h).index_select(0, graph.entry_node)
                         + self.entry_out_kind(graph.entry_kind)
                         + per_run(self.entry_out_time(t), run_index(graph, "entry")))
        return self.entry_head(z_entry)
