"""nn.Linear: ``W[o, i]`` is an edge from input neuron ``i`` to a new neuron ``o``.

The bias is node-held (BIAS) on the output neurons. An input whose node list
is shorter than ``in_features`` but divides it is a flattened conv map: see
:func:`l2o.graph.values.input_columns` (channel-level nodes, spatial position
as ``edge_pos``).
"""
from __future__ import annotations

from torch import nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import Val, depth_of, input_columns


def linear_core(state, weight, bias, x, kind: EdgeKind = EdgeKind.LINEAR) -> Val:
    out_f, in_f = weight.shape
    src_cols, col_pos = input_columns(state, x, in_f)
    depth = depth_of(x) + 1
    out = state.new_nodes(out_f, NodeType.HIDDEN, depth)
    # W[o, i]: source depends on the column, destination on the row
    pos = col_pos.view(1, in_f, 2) if col_pos is not None else None
    state.add_edges(weight, (out_f, in_f), src_cols.view(1, in_f), out.view(out_f, 1), kind, pos)
    if bias is not None:
        state.add_entries(bias, out, EntryKind.BIAS)
    return Val(own_nodes=out, depth=depth, fdim="last")


def map_linear(state, mod: nn.Linear, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    return linear_core(state, mod.weight, mod.bias, x)
