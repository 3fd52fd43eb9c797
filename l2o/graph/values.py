"""What the builder knows about each fx value while walking the graph.

A tensor value carries the list of graph nodes standing for its feature /
channel dimension ("its neurons"). Nothing else about the tensor is tracked:
batch, sequence and spatial dims are invisible to the parameter graph, so
ops that only touch them pass the node list through unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .param_graph import NodeType


@dataclass
class LazyNodes:
    """Nodes created on first use, sized by the first consumer.

    A network input of shape ``[B, 3, 32, 32]`` has 3 neurons if a conv reads
    it but 3072 if it is flattened into a Linear; without shape information
    only the consumer knows, so creation waits for it.
    """
    kind: NodeType
    group: int            # orders INPUT nodes for node_io_index (placeholder position)
    depth: int = 0
    nodes: Tensor | None = None


@dataclass
class Val:
    """A tensor value: its feature nodes (or a lazy promise of them)."""
    own_nodes: Tensor | None = None
    lazy: LazyNodes | None = None
    depth: int = 0
    # Which dim the nodes index: 'last' (Linear/Embedding/attention outputs),
    # 'chan' (dim 1: conv maps), None (unknown). Only used to tell a feature
    # concatenation from a batch/sequence/spatial one.
    fdim: str | None = None
    # Spatial shape folded into the feature dim by a flatten of a conv map
    # (e.g. (H, W)); None if not flattened or unknown.
    spatial: tuple[int, ...] | None = None

    @property
    def nodes(self) -> Tensor | None:
        return self.lazy.nodes if self.lazy is not None else self.own_nodes

    def passthrough(self, **changes) -> "Val":
        return replace(self, **changes)


@dataclass
class TupleVal:
    """A tuple/list output of a leaf (e.g. MultiheadAttention's (out, weights))."""
    items: list[Any]
    fill: Any = None   # value of any index beyond ``items`` (pieces of a non-feature split)


@dataclass
class ParamRef:
    """A parameter fetched with ``get_attr`` (bare ``nn.Parameter`` use)."""
    index: int


def resolve(state, val: Any, n: int) -> Tensor:
    """The node list of ``val``, materialising lazy nodes with ``n`` entries.

    A value with no node bookkeeping (computed from constants, or coming out
    of an opaque module) gets fresh HIDDEN nodes: we know nothing of the
    neurons, but the consumer's weights still need endpoints.
    """
    if isinstance(val, Val):
        if val.nodes is not None:
            return val.nodes
        if val.lazy is not None:
            lz = val.lazy
            lz.nodes = state.new_nodes(n, lz.kind, lz.depth, input_group=lz.group)
            return lz.nodes
    return state.new_nodes(n, NodeType.HIDDEN, val.depth if isinstance(val, Val) else 0)


def _guess_spatial(rep: int) -> tuple[int, ...]:
    side = math.isqrt(rep)
    return (side, side) if side * side == rep and rep > 1 else (rep,)


def spatial_positions(spatial: tuple[int, ...]) -> Tensor:
    """[prod(spatial), 2] normalised (y, x) in [-1, 1]; 1-D maps give (0, x)."""
    def axis(n: int) -> Tensor:
        return torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)
    if len(spatial) == 1:
        x = axis(spatial[0])
        return torch.stack([torch.zeros_like(x), x], dim=1)
    if len(spatial) == 2:
        h, w = spatial
        y, x = torch.meshgrid(axis(h), axis(w), indexing="ij")
        return torch.stack([y.reshape(-1), x.reshape(-1)], dim=1)
    # 3-D maps: keep the two innermost axes' positions (edge_pos is 2-D)
    lead = math.prod(spatial[:-2])
    return spatial_positions(spatial[-2:]).repeat(lead, 1)


def input_columns(state, val: Any, n: int) -> tuple[Tensor, Tensor | None]:
    """Source node of each of the ``n`` input columns of a Linear.

    Returns (nodes [n], positions [n, 2] or None). When the value has fewer
    nodes than columns and divides them (a flattened C x H x W map), each
    column maps to channel ``col // (H*W)`` and carries its spatial position:
    we keep channel-level nodes rather than one node per (channel, pixel), so
    the graph stays small and permuting channels stays a node permutation.
    """
    nodes = resolve(state, val, n)
    c = int(nodes.shape[0])
    if c == n:
        return nodes, None
    if c > 0 and n % c == 0:
        rep = n // c
        spatial = val.spatial if isinstance(val, Val) and val.spatial and math.prod(val.spatial) == rep \
            else _guess_spatial(rep)
        pos = spatial_positions(spatial).repeat(c, 1)
        return nodes.repeat_interleave(rep), pos
    # Sizes do not line up (an op we cannot follow changed the width):
    # treat the columns as unknown neurons rather than guess a wrong wiring.
    return state.new_nodes(n, NodeType.HIDDEN, val.depth if isinstance(val, Val) else 0), None


def channel_nodes(state, val: Any, n: int) -> Tensor:
    """Node list of exactly ``n`` channels (conv / norm inputs)."""
    nodes = resolve(state, val, n)
    if int(nodes.shape[0]) == n:
        return nodes
    return state.new_nodes(n, NodeType.HIDDEN, val.depth if isinstance(val, Val) else 0)


def depth_of(*vals: Any) -> int:
    return max([v.depth for v in vals if isinstance(v, Val)] + [0])
