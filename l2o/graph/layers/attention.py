"""nn.MultiheadAttention: q, k and v units are nodes; projections are edges.

With embed dim ``E`` and ``H`` heads of size ``E/H``:

* ``in_proj_weight`` rows ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)`` create the q,
  k and v nodes (3E new HIDDEN nodes); row ``r``, column ``c`` is an edge
  from input neuron ``c`` (of query / key / value respectively) to unit
  ``r`` (ATTN_Q / ATTN_K / ATTN_V). Separate ``q/k/v_proj_weight`` (when
  kdim/vdim differ from E) map the same way, one tensor each.
* ``in_proj_bias`` (and ``bias_k`` / ``bias_v``) are ATTN_BIAS entries on
  the q/k/v nodes.
* attention output channel ``h*E/H + j`` is a mix of v unit ``(h, j)`` over
  positions, so ``out_proj.weight[o, c]`` is the edge ``v_c -> out_o``
  (ATTN_OUT) onto E new nodes, with ``out_proj.bias`` as BIAS entries.

Permuting heads, or units within a head (jointly for q and k), permutes
these nodes, so the graph is isomorphic. The graph does not encode which q
pairs with which k: it admits more permutations than the function does,
which keeps a GMN equivariant to all true symmetries.
"""
from __future__ import annotations

import torch
from torch import nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import TupleVal, Val, channel_nodes, depth_of


def _proj(state, weight, src_nodes, dst_nodes, kind):
    out_f, in_f = weight.shape
    state.add_edges(weight, (out_f, in_f), src_nodes.view(1, in_f), dst_nodes.view(out_f, 1), kind)


def mha_core(state, mod: nn.MultiheadAttention, query, key, value) -> Val:
    E = mod.embed_dim
    key = query if key is None else key
    value = key if value is None else value
    q_in = channel_nodes(state, query, E)
    k_in = q_in if key is query else channel_nodes(state, key, mod.kdim)
    v_in = k_in if value is key else channel_nodes(state, value, mod.vdim)
    depth = depth_of(query, key, value) + 1
    qkv = state.new_nodes(3 * E, NodeType.HIDDEN, depth)
    q, k, v = qkv.split(E)
    if mod.in_proj_weight is not None:
        # rows [q | k | v] as a (3, E, E) block: block b reads input set b
        src = torch.stack([q_in, k_in, v_in]).view(3, 1, E)
        kind = torch.tensor([int(EdgeKind.ATTN_Q), int(EdgeKind.ATTN_K),
                             int(EdgeKind.ATTN_V)]).view(3, 1, 1)
        state.add_edges(mod.in_proj_weight, (3, E, E), src, qkv.view(3, E, 1), kind)
    else:
        _proj(state, mod.q_proj_weight, q_in, q, EdgeKind.ATTN_Q)
        _proj(state, mod.k_proj_weight, k_in, k, EdgeKind.ATTN_K)
        _proj(state, mod.v_proj_weight, v_in, v, EdgeKind.ATTN_V)
    if mod.in_proj_bias is not None:
        state.add_entries(mod.in_proj_bias, qkv, EntryKind.ATTN_BIAS)
    if mod.bias_k is not None:
        state.add_entries(mod.bias_k, k, EntryKind.ATTN_BIAS)
    if mod.bias_v is not None:
        state.add_entries(mod.bias_v, v, EntryKind.ATTN_BIAS)
    out = state.new_nodes(E, NodeType.HIDDEN, depth + 1)
    _proj(state, mod.out_proj.weight, v, out, EdgeKind.ATTN_OUT)
    if mod.out_proj.bias is not None:
        state.add_entries(mod.out_proj.bias, out, EntryKind.BIAS)
    return Val(own_nodes=out, depth=depth + 1, fdim="last")


def map_mha(state, mod: nn.MultiheadAttention, qualname: str, args, kwargs):
    names = ("query", "key", "value")
    q, k, v = (args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names))
    # (attn_output, attn_weights): the weights carry no feature neurons
    return TupleVal([mha_core(state, mod, q, k, v), None])
