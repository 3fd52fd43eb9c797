"""nn.TransformerEncoderLayer / nn.TransformerEncoder, mapped as leaves.

fx cannot trace these (their forward takes a fused fast path with
data-dependent checks), so the block is rebuilt from its parts:
self-attention (see ``attention.py``), ``linear1 -> linear2`` feed-forward,
``norm1`` / ``norm2``, and the two residual additions, which merge the
residual stream neurons with the attention output and the FF output
neurons. ``norm_first`` changes where the norms sit, not the resulting
graph: both residual branches merge into the same stream nodes.
"""
from __future__ import annotations

from torch import nn

from ..values import Val, channel_nodes, depth_of
from .attention import mha_core
from .linear import linear_core
from .norm import map_layer_norm


def _residual(state, stream: Val, branch: Val) -> Val:
    state.merge(stream.nodes, branch.nodes)
    return Val(own_nodes=stream.nodes, depth=max(stream.depth, branch.depth), fdim="last")


def _norm(state, mod, x: Val) -> Val:
    return map_layer_norm(state, mod, "", [x], {})


def encoder_layer_core(state, mod: nn.TransformerEncoderLayer, x) -> Val:
    E = mod.self_attn.embed_dim
    x = Val(own_nodes=channel_nodes(state, x, E), depth=depth_of(x), fdim="last")

    def sa(v: Val) -> Val:
        return mha_core(state, mod.self_attn, v, v, v)

    def ff(v: Val) -> Val:
        return linear_core(state, mod.linear2.weight, mod.linear2.bias,
                           linear_core(state, mod.linear1.weight, mod.linear1.bias, v))

    if mod.norm_first:
        x = _residual(state, x, sa(_norm(state, mod.norm1, x)))
        x = _residual(state, x, ff(_norm(state, mod.norm2, x)))
    else:
        x = _norm(state, mod.norm1, _residual(state, x, sa(x)))
        x = _norm(state, mod.norm2, _residual(state, x, ff(x)))
    return x


def map_encoder_layer(state, mod, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("src")
    return encoder_layer_core(state, mod, x)


def map_encoder(state, mod: nn.TransformerEncoder, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("src")
    for layer in mod.layers:
        x = encoder_layer_core(state, layer, x)
    if mod.norm is not None:
        x = _norm(state, mod.norm, x)
    return x
