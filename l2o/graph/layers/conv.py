"""Conv1d / 2d / 3d (and their transposes): every kernel entry is an edge.

``W[o, i, ky, kx]`` connects input channel ``g * in_per_group + i`` (``g`` the
group of output channel ``o``) to output channel ``o``; its ``edge_pos`` is
the kernel offset from the centre scaled to [-1, 1] (Conv1d: ``(0, dx)``;
Conv3d: ``(dy, dx)``, ``edge_pos`` being 2-D, so taps at different depths
share a position, as the pixels of a flattened 3-D map do).
So a depthwise conv has ``k`` parallel edges per channel, one per tap.
Strides, padding and dilation change no parameter, so they are not encoded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import Val, channel_nodes, depth_of, spatial_positions


def kernel_offsets(kernel_size: tuple[int, ...]) -> Tensor:
    """[prod(kernel), 2] offsets from the kernel centre, each axis in [-1, 1]:
    the same normalised grid as positions in a flattened feature map."""
    if len(kernel_size) not in (1, 2, 3):
        raise NotImplementedError(f"kernels of {len(kernel_size)} spatial dims")
    return spatial_positions(tuple(kernel_size))


def map_conv(state, mod: nn.modules.conv._ConvNd, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    return conv_core(state, mod.weight, tuple(mod.weight.shape), mod.bias, x, mod.groups,
                     bool(getattr(mod, "transposed", False)))


def conv_core(state, weight, shape: tuple[int, ...], bias, x, groups: int, transposed: bool) -> Val:
    """Edges of a convolution with kernel ``weight`` read in ``shape`` (its
    own shape, or an in-order reshape of it: a functional call on
    ``conv.weight.squeeze(1).unsqueeze(1)`` or a Linear's ``W[o, i, 1]``)."""
    a, b = (int(d) for d in shape[:2])   # (out, in/g) for conv, (in, out/g) for transposed
    ks = tuple(int(d) for d in shape[2:])
    in_ch, out_ch = (a, b * groups) if transposed else (b * groups, a)
    in_nodes = channel_nodes(state, x, in_ch)
    depth = depth_of(x) + 1
    out = state.new_nodes(out_ch, NodeType.HIDDEN, depth)
    K = math.prod(ks)
    r0 = torch.arange(a).view(a, 1)
    r1 = torch.arange(b).view(1, b)
    per_group_a = a // groups
    if not transposed:
        src2 = in_nodes[(r0 // per_group_a) * b + r1]          # [O, I/g]
        dst2 = out.view(a, 1).expand(a, b)
    else:
        src2 = in_nodes.view(a, 1).expand(a, b)
        dst2 = out[(r0 // per_group_a) * b + r1]               # [I, O/g]
    state.add_edges(weight, (a, b, K), src2.unsqueeze(-1), dst2.unsqueeze(-1), EdgeKind.CONV,
                    kernel_offsets(ks).view(1, 1, K, 2))
    if bias is not None:
        state.add_entries(bias, out, EntryKind.BIAS)
    return Val(own_nodes=out, depth=depth, fdim="chan")
