"""The parameter graph of a network: the data structure a graph metanetwork reads.

Nodes are neurons / channels / token ids / attention q,k,v units, plus one
``TENSOR`` node per parameter tensor that has no structure we understand.
Every parameter entry lives in exactly one place:

* an **edge** (weights of Linear, Conv, Embedding, attention projections):
  entry ``W[o, i, *k]`` is an edge ``src -> dst`` between the neurons it
  connects, with a categorical ``edge_kind`` and a float ``edge_pos``
  (kernel offset, or spatial position after a flatten);
* a **node slot** (biases, normalisation scales/shifts, fallback tensors):
  entry ``b[o]`` is held by node ``entry_node``, with a categorical
  ``entry_kind``. A node may hold several entries (a conv bias and the
  BatchNorm scale and shift that follow it).

Parameters are laid out in one flat vector: all edge-held tensors first (in
``flat_order``), then all node-held tensors. Entry ``e < num_edges`` of the
flat vector is edge ``e``; entry ``num_edges + j`` is node slot ``j``. So
gathering every parameter into edge/node tensors is one ``torch.cat`` and
scattering updates back is one ``split`` -- no gathers, no Python work per
entry.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Sequence

import torch
from torch import Tensor


class NodeType(IntEnum):
    INPUT = 0    # input neuron / channel / token id of the network (not permutable)
    HIDDEN = 1   # hidden neuron / channel (permutable within its layer)
    OUTPUT = 2   # output neuron of the network (not permutable)
    TENSOR = 3   # one node per unstructured parameter tensor (fallback)


class EdgeKind(IntEnum):
    LINEAR = 0
    CONV = 1
    EMBEDDING = 2
    ATTN_Q = 3
    ATTN_K = 4
    ATTN_V = 5
    ATTN_OUT = 6


class EntryKind(IntEnum):
    BIAS = 0
    NORM_WEIGHT = 1
    NORM_BIAS = 2
    ATTN_BIAS = 3
    FALLBACK = 4


NUM_NODE_TYPES = len(NodeType)
NUM_EDGE_KINDS = len(EdgeKind)
NUM_ENTRY_KINDS = len(EntryKind)


@dataclass
class ParamGraph:
    """Static graph of one architecture. Build with :func:`l2o.build_graph`.

    Shapes: ``N`` nodes, ``E`` edge-held entries, ``M`` node-held entries,
    ``T`` parameter tensors.
    """

    num_nodes: int
    node_type: Tensor        # [N] long, NodeType
    node_io_index: Tensor    # [N] long, position among the network's inputs/outputs; -1 for hidden/tensor nodes
    node_depth: Tensor       # [N] float in [0, 1]: layer depth / max depth
    edge_index: Tensor       # [2, E] long, (src, dst)
    edge_kind: Tensor        # [E] long, EdgeKind
    edge_pos: Tensor         # [E, 2] float: kernel offset (conv) or spatial position (flatten), else 0
    entry_node: Tensor       # [M] long, node holding each node-held entry
    entry_kind: Tensor       # [M] long, EntryKind
    tensor_id: Tensor        # [E + M] long, index (into flat_order) of the tensor each flat entry belongs to
    param_names: list[str]   # names as in model.named_parameters(), in the model's order
    param_shapes: list[torch.Size]
    flat_order: list[int]    # indices into param_names: edge-held tensors first, then node-held
    num_edge_params: int     # how many tensors of flat_order are edge-held
    unstructured: list[str] = field(default_factory=list)  # parameter names placed on TENSOR nodes
    capture: str = ""        # how the model was captured: "eager", "fx", "per-module (...)"
    notes: list[str] = field(default_factory=list)  # what the build noticed (tied weights, failures)

    # ------------------------------------------------------------------ sizes
    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def num_entries(self) -> int:
        return int(self.entry_node.shape[0])

    @property
    def num_params(self) -> int:
        return self.num_edges + self.num_entries

    @property
    def num_tensors(self) -> int:
        return len(self.flat_order)

    @property
    def numels(self) -> list[int]:
        """Entry count of each tensor, in ``flat_order``."""
        return [self.param_shapes[i].numel() for i in self.flat_order]

    @property
    def tensor_slices(self) -> list[slice]:
        """Flat range of each tensor, in ``flat_order`` (cached: the graph is static)."""
        if not hasattr(self, "_tensor_slices"):
            bounds = [0, *itertools.accumulate(self.numels)]
            self._tensor_slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return self._tensor_slices

    @property
    def has_edge_pos(self) -> bool:
        """Whether any edge carries a position (convs, flatten); cached, the graph is static."""
        if not hasattr(self, "_has_edge_pos"):
            self._has_edge_pos = bool(self.edge_pos.numel()) and bool(self.edge_pos.any())
        return self._has_edge_pos

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    def derived(self, key: str, compute):
        """``compute()``, memoised under ``key``: data derived from this static
        graph (dense blocks, degrees, entry counts: :mod:`l2o.graph.blocks`).
        Not carried by :meth:`to`; :meth:`forget_derived` after rewiring."""
        memo = self.__dict__.setdefault("_derived", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def forget_derived(self) -> None:
        self.__dict__.pop("_derived", None)

    # ------------------------------------------------------- gather / scatter
    def gather(self, tensors: Sequence[Tensor]) -> Tensor:
        """Flatten per-parameter tensors (in the model's ``named_parameters``
        order) into the flat ``[E + M]`` vector: edges first, then node slots."""
        if len(tensors) != len(self.param_names):
            raise ValueError(
                f"expected {len(self.param_names)} tensors (one per parameter), got {len(tensors)}")
        return torch.cat([tensors[i].reshape(-1) for i in self.flat_order])

    def scatter(self, flat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`gather`: the flat vector back to parameter-shaped
        views, in the model's ``named_parameters`` order."""
        if flat.shape[0] != self.num_params:
            raise ValueError(f"flat vector has {flat.shape[0]} entries, graph has {self.num_params}")
        out: list[Tensor | None] = [None] * len(self.param_names)
        for i, chunk in zip(self.flat_order, flat.split(self.numels)):
            out[i] = chunk.view(self.param_shapes[i])
        return out  # type: ignore[return-value]

    def split_flat(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(edge part [E, ...], node-slot part [M, ...]) of a flat tensor."""
        return flat[: self.num_edges], flat[self.num_edges:]

    # ------------------------------------------------------------- utilities
    def to(self, device: torch.device | str) -> "ParamGraph":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() and v.shape[0] > 1 and v.stride(0) == 0:
                v = v[:1].to(device).expand(v.shape)   # a constant kept as a stride-0 view
            elif isinstance(v, Tensor):
                v = v.to(device)
            kw[f.name] = v
        out = ParamGraph(**kw)
        if hasattr(self, "_has_edge_pos"):
            out._has_edge_pos = self._has_edge_pos
        return out

    def signature(self) -> tuple:
        """Identifies the architecture: names and shapes of its parameters."""
        return tuple((n, tuple(s)) for n, s in zip(self.param_names, self.param_shapes))

    def fractions(self) -> dict[str, float]:
        """Share of the parameters on edges, on node slots (biases, norms, ...)
        and on per-tensor fallback nodes."""
        total = max(self.num_params, 1)
        fb = int((self.entry_kind == EntryKind.FALLBACK).sum())
        return {"edges": self.num_edges / total, "node_slots": (self.num_entries - fb) / total,
                "fallback": fb / total}

    def edge_components(self) -> int:
        """Number of connected pieces among the nodes that have edges
        (1: the wiring of the whole network is one graph)."""
        if self.num_edges == 0:
            return 0
        src, dst = self.edge_index
        return count_components(self.num_nodes, src, dst)

    def summary(self) -> str:
        counts = torch.bincount(self.node_type, minlength=NUM_NODE_TYPES).tolist()
        kinds = ", ".join(f"{t.name.lower()}={c}" for t, c in zip(NodeType, counts) if c)
        f = self.fractions()
        lines = [
            f"ParamGraph: {self.num_nodes} nodes ({kinds}), {self.num_edges} edges, "
            f"{self.num_entries} node-held entries, {self.num_tensors} tensors, "
            f"{self.num_params} parameters",
            f"  capture: {self.capture or '?'}; parameters on edges {100 * f['edges']:.1f}%, "
            f"node slots {100 * f['node_slots']:.1f}%, fallback {100 * f['fallback']:.1f}%",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.unstructured:
            lines.append("  unstructured (per-tensor fallback): " + ", ".join(self.unstructured))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def to_pyg(self):
        """A ``torch_geometric.data.Data`` view for inspection and plotting."""
        from torch_geometric.data import Data

        return Data(
            num_nodes=self.num_nodes,
            edge_index=self.edge_index,
            edge_kind=self.edge_kind,
            edge_pos=self.edge_pos,
            node_type=self.node_type,
            node_depth=self.node_depth,
            entry_node=self.entry_node,
            entry_kind=self.entry_kind,
        )


def count_components(num_nodes: int, src: Tensor, dst: Tensor) -> int:
    """Number of connected pieces among the nodes the edges ``src -> dst`` touch."""
    parent = torch.arange(num_nodes, device=src.device)
    # label propagation: every node takes the smallest label of its neighbours
    while True:
        a, b = parent[src], parent[dst]
        low = torch.minimum(a, b)
        new = parent.clone()
        new.scatter_reduce_(0, src, low, reduce="amin")
        new.scatter_reduce_(0, dst, low, reduce="amin")
        new = new[new]
        if torch.equal(new, parent):
            break
        parent = new
    used = torch.zeros(num_nodes, dtype=torch.bool, device=src.device)
    used[src] = True
    used[dst] = True
    return int(torch.unique(parent[used]).numel())
