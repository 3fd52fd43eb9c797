"""nn.Embedding and nn.EmbeddingBag (a bag's sum / mean / max of the same
rows): one INPUT node per token id, one HIDDEN node per embedding dim;
``weight[t, d]`` is the edge ``t -> d`` (EdgeKind.EMBEDDING).

Token nodes come from the index tensor's lazy nodes when it is a network
input, else (e.g. position ids made with ``arange``) a fresh set of INPUT
nodes numbered after the real inputs.
"""
from __future__ import annotations

from torch import nn

from ..param_graph import EdgeKind, NodeType
from ..values import Val, depth_of


def embedding_core(state, weight, x) -> Val:
    T, D = weight.shape
    tokens = None
    if isinstance(x, Val):
        if x.nodes is None and x.lazy is not None:
            lz = x.lazy
            lz.nodes = state.new_nodes(T, NodeType.INPUT, lz.depth, input_group=lz.group)
        if x.nodes is not None and int(x.nodes.shape[0]) == T:
            tokens = x.nodes
    if tokens is None:
        tokens = state.new_nodes(T, NodeType.INPUT, 0)
    depth = depth_of(x) + 1
    out = state.new_nodes(D, NodeType.HIDDEN, depth)
    state.add_edges(weight, (T, D), tokens.view(T, 1), out.view(1, D), EdgeKind.EMBEDDING)
    return Val(own_nodes=out, depth=depth, fdim="last")


def map_embedding(state, mod: nn.Embedding | nn.EmbeddingBag, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    return embedding_core(state, mod.weight, x)
