"""Normalisation layers add no nodes: scale and shift are node-held entries
(NORM_WEIGHT / NORM_BIAS) on the neurons they normalise.

BatchNorm / InstanceNorm / GroupNorm act per channel (dim 1); LayerNorm and
RMSNorm per entry of ``normalized_shape``: when that shape is ``(C, H, W)``
with ``C`` the channel nodes, entry ``(c, h, w)`` sits on channel ``c``; when
it ends with the feature dim, entry ``(..., f)`` sits on feature ``f``.
"""
from __future__ import annotations

import math

from torch import nn

from ..param_graph import EntryKind, NodeType
from ..values import Val, channel_nodes, depth_of, resolve


def _result(x, nodes):
    if isinstance(x, Val) and x.nodes is not None and x.nodes is nodes:
        return x
    return Val(own_nodes=nodes, depth=depth_of(x), fdim=x.fdim if isinstance(x, Val) else None)


def _place(state, mod, nodes_per_entry):
    if getattr(mod, "weight", None) is not None:
        state.add_entries(mod.weight, nodes_per_entry, EntryKind.NORM_WEIGHT)
    if getattr(mod, "bias", None) is not None:
        state.add_entries(mod.bias, nodes_per_entry, EntryKind.NORM_BIAS)


def map_channel_norm(state, mod, qualname: str, args, kwargs):
    """BatchNorm1d/2d, InstanceNorm1d/2d, GroupNorm: one entry per channel."""
    x = args[0] if args else kwargs.get("input")
    c = mod.num_channels if isinstance(mod, nn.GroupNorm) else mod.num_features
    nodes = channel_nodes(state, x, c)
    _place(state, mod, nodes)
    return _result(x, nodes)


def map_layer_norm(state, mod, qualname: str, args, kwargs):
    """LayerNorm / RMSNorm over ``normalized_shape``."""
    x = args[0] if args else kwargs.get("input")
    shape = tuple(mod.normalized_shape)
    nodes = resolve(state, x, shape[-1])
    n = int(nodes.shape[0])
    total = math.prod(shape)
    if len(shape) == 1 and n == shape[0]:
        per_entry = nodes
    elif n == shape[0]:
        per_entry = nodes.repeat_interleave(total // n)   # (C, H, W) over channel nodes
    elif n == shape[-1]:
        per_entry = nodes.repeat(total // n)              # (..., F) over feature nodes
    else:
        # entries on units of their own (e.g. (H, W) of a [B, C, H, W] map); the input's units pass
        # on, but for a flattened map's (fewer than its width), the output gets the new units
        fresh = state.new_nodes(shape[-1], NodeType.HIDDEN, depth_of(x))
        per_entry = fresh.repeat(total // shape[-1])
        if isinstance(x, Val) and x.spatial:
            nodes = fresh
    _place(state, mod, per_entry)
    return _result(x, nodes)
