"""One round of message passing on a parameter graph, with edge and node updates."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .graph.blocks import add_node_terms_, mean_to_nodes
from .graph.param_graph import ParamGraph


class GMNConv(nn.Module):
    r"""Edge-then-node update on a directed multigraph, in both directions.

    .. math::
        m_{ij} &= \sigma\big(W_e e_{ij} + W_s h_i + W_d h_j + b\big)
                  \qquad\text{(edge } i \to j\text{)}\\
        e'_{ij} &= e_{ij} + m_{ij}\\
        h'_v &= h_v + \phi\Big(h_v,\ \operatorname{mean}_{i \to v} m_{iv},\
                  \operatorname{mean}_{v \to j} m_{vj}\Big)

    Messages are aggregated at both endpoints because a weight's update depends
    on what flows into its output neuron (forward activations) and out of its
    input neuron (back-propagated gradients). The concatenation
    ``[e, h_src, h_dst]`` is never built: ``W_s h`` and ``W_d h`` are computed on
    the few nodes and then gathered (Linear of a concatenation is the sum of
    Linears of the parts), which keeps the per-edge cost at ``O(edge_dim)``.
    Mean aggregation keeps the scale independent of fan-in, so one metanetwork
    serves layers of any width. Every operation is shared across nodes and edges
    and the aggregation is symmetric, so the layer is equivariant to any
    permutation of the nodes.

    The three steps are :meth:`message`, :meth:`aggregate` and :meth:`update`,
    as in PyG's ``MessagePassing``, but this is a plain module, not a
    ``MessagePassing`` subclass: it needs messages at every edge (they are the
    new edge states) and means at both ends, and its aggregation is
    specialised to the graph's structure: the edges of a weight tensor form
    dense blocks (``graph/blocks.py``), reduced by reshape and sum instead of a
    scatter over every edge. ``tests/test_gmn_conv.py`` checks the layer
    against the same math written as a PyG ``MessagePassing`` with
    ``propagate`` (generic scatter means over ``edge_index``), in both flows.
    ``torch_geometric`` is therefore not needed to run the optimizers.
    """

    def __init__(self, node_dim: int, edge_dim: int):
        super().__init__()
        self.edge_lin = nn.Linear(edge_dim, edge_dim)
        self.src_lin = nn.Linear(node_dim, edge_dim, bias=False)
        self.dst_lin = nn.Linear(node_dim, edge_dim, bias=False)
        self.node_mlp = nn.Sequential(
            nn.Linear(node_dim + 2 * edge_dim, node_dim), nn.ReLU(), nn.Linear(node_dim, node_dim))

    def forward(self, h: Tensor, e: Tensor, graph: ParamGraph) -> tuple[Tensor, Tensor]:
        """``(h', e')`` from node states ``h`` [N, node_dim] and edge states ``e`` [E, edge_dim]."""
        m = self.message(e, self.src_lin(h), self.dst_lin(h), graph)
        agg_in = self.aggregate(m, graph, "dst")
        agg_out = self.aggregate(m, graph, "src")
        return self.update((agg_in, agg_out), h), e + m

    def message(self, e: Tensor, src_proj: Tensor, dst_proj: Tensor, graph: ParamGraph) -> Tensor:
        """[E, edge_dim] ``m_ij``, from the node terms ``W_s h`` / ``W_d h`` [N, edge_dim]."""
        # In place on a fresh intermediate: the step is memory-bound on large
        # graphs, every edge-sized allocation costs page faults, and none of
        # these values is needed by autograd (add's backward keeps nothing).
        m = self.edge_lin(e)
        add_node_terms_(m, graph, src_proj, dst_proj)
        return m.relu_()

    def aggregate(self, m: Tensor, graph: ParamGraph, end: str) -> Tensor:
        """[N, edge_dim] the mean of the messages at each node's ``end``
        (``"dst"``: edges into it, ``"src"``: edges out of it; 0 for none)."""
        return mean_to_nodes(m, graph, end)

    def update(self, aggregated: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        """``h'`` from ``(mean of incoming, mean of outgoing)`` messages."""
        agg_in, agg_out = aggregated
        return h + self.node_mlp(torch.cat([h, agg_in, agg_out], dim=1))
