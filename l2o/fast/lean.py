"""A ParamGraph that keeps its per-entry index tensors compact.

A built :class:`~l2o.graph.ParamGraph` holds ``edge_index`` ([2, E] int64),
``edge_kind`` and ``tensor_id`` per entry: 32 bytes per parameter, more than
the optimizer's statistics (20). The chunked step never reads them per entry
once its plan is built (dense blocks carry their row and column node tables,
:mod:`l2o.graph.blocks`), so an optimizer on that path keeps a
:class:`LeanGraph` instead: the same graph, with

* ``edge_index`` rebuilt from the dense blocks' node tables (only the edges
  of scatter blocks are stored);
* ``edge_kind``, ``edge_pos``, ``tensor_id``, ``entry_node``, ``entry_kind``
  run-length encoded where that is at least 8x smaller, else kept.

Reading one of these attributes rebuilds the full tensor (correct, but
model-sized and not cached); :meth:`LeanGraph.entry_slice` rebuilds a range.
``to(device)`` returns a full ParamGraph (the forward, used on GPUs, reads
the index tensors). ``tests/test_memory.py`` checks every attribute against
the original graph.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import fields

import torch
from torch import Tensor

from ..graph.blocks import EdgeBlock, edge_blocks, edge_degree, entry_count
from ..graph.factored import FACTORS_ATTR, FactoredGraph
from ..graph.param_graph import ParamGraph

_COMPACT = ("edge_kind", "edge_pos", "tensor_id", "entry_node", "entry_kind")
# compress a per-entry tensor only where its runs take under 1/8 of its size
_MIN_GAIN = 8


class _RunLength:
    """A tensor along dim 0 as consecutive runs of equal rows."""

    def __init__(self, values: Tensor, counts: Tensor, like: Tensor):
        self.values, self.counts, self.dtype, self.shape = values, counts, like.dtype, like.shape
        self.ends = counts.cumsum(0)

    @classmethod
    def from_runs(cls, values: Tensor, counts: Tensor, dtype: torch.dtype, shape: torch.Size) -> "_RunLength | None":
        """From runs already found (a factored graph's), with :meth:`encode`'s rule."""
        if shape[0] == 0 or values.numel() * _MIN_GAIN > math.prod(shape):
            return None
        out = object.__new__(cls)
        out.values, out.counts, out.dtype, out.shape = values, counts, dtype, shape
        out.ends = counts.cumsum(0)
        return out

    @classmethod
    def encode(cls, t: Tensor) -> "_RunLength | None":
        if t.shape[0] == 0:
            return None
        if t.dim() and t.shape[0] > 1 and t.stride(0) == 0:   # a constant kept as a stride-0 view: tiny already
            return None
        values, counts = torch.unique_consecutive(t, return_counts=True, dim=0)
        if values.numel() * _MIN_GAIN > t.numel():
            return None
        # clones: unique_consecutive's outputs keep a storage of the input's size
        return cls(values.clone(), counts.clone(), t)

    def full(self) -> Tensor:
        return torch.repeat_interleave(self.values, self.counts, dim=0, output_size=self.shape[0])

    def slice(self, s: int, e: int) -> Tensor:
        if e <= s:
            return self.values[:0]
        first = int(torch.searchsorted(self.ends, torch.tensor(s, device=self.ends.device), right=True))
        last = int(torch.searchsorted(self.ends, torch.tensor(e - 1, device=self.ends.device), right=True))
        counts = self.counts[first:last + 1].clone()
        start_of_first = int(self.ends[first] - self.counts[first])
        counts[0] -= s - start_of_first
        counts[-1] -= int(self.ends[last]) - e
        return torch.repeat_interleave(self.values[first:last + 1], counts, dim=0, output_size=e - s)


class LeanGraph(ParamGraph):
    """See the module docstring; build with :func:`lean_graph`."""

    # ``_lean`` maps an attribute to a _RunLength; ``_scatter_edges`` holds the
    # [2, len] edges of each scatter block by its start
    @property
    def num_edges(self) -> int:
        return self._num_edges

    @property
    def num_entries(self) -> int:
        return self._num_entries

    @property
    def device(self) -> torch.device:
        return self.node_type.device

    @property
    def edge_index(self) -> Tensor:
        parts = []
        for b in edge_blocks(self):
            if isinstance(b, EdgeBlock):
                per_group = b.rows // b.groups
                row = b.row_nodes.repeat_interleave(b.cols)
                col = b.col_nodes.view(b.groups, 1, b.cols).expand(b.groups, per_group, b.cols).reshape(-1)
                parts.append(torch.stack([col, row] if b.row_end == "dst" else [row, col]))
            else:
                parts.append(self._scatter_edges[b.start])
        if not parts:
            return torch.zeros(2, 0, dtype=torch.long, device=self.node_type.device)
        return torch.cat(parts, dim=1)

    def entry_slice(self, name: str, s: int, e: int) -> Tensor:
        """``getattr(self, name)[s:e]`` without rebuilding the whole tensor."""
        if name == "edge_index":
            starts = [b.start for b in edge_blocks(self)]
            i = bisect.bisect_right(starts, s) - 1
            b = edge_blocks(self)[i]
            if not isinstance(b, EdgeBlock):
                return self._scatter_edges[b.start][:, s - b.start:e - b.start]
            return self.edge_index[:, s:e]  # dense blocks: rare (plan building on a lean graph)
        rl = self._lean.get(name)
        return rl.slice(s, e) if rl is not None else self.__dict__[name][s:e]


def _lean_property(name: str) -> property:
    def get(self) -> Tensor:
        rl = self._lean.get(name)
        return rl.full() if rl is not None else self.__dict__[name]
    return property(get)


for _name in _COMPACT:
    setattr(LeanGraph, _name, _lean_property(_name))


def entry_slice(graph: ParamGraph, name: str, s: int, e: int) -> Tensor:
    """``getattr(graph, name)[s:e]``, cheap on a :class:`LeanGraph` too."""
    if isinstance(graph, (LeanGraph, FactoredGraph)):
        return graph.entry_slice(name, s, e)
    return getattr(graph, name)[..., s:e] if name == "edge_index" else getattr(graph, name)[s:e]


def lean_graph(graph: ParamGraph) -> ParamGraph:
    """``graph`` as a :class:`LeanGraph` (the graph's own caches the chunked
    step needs -- blocks, degrees, entry counts -- carried over; build the
    step's plan before, from ``graph``), or ``graph`` itself when it is one already."""
    if isinstance(graph, LeanGraph):
        return graph
    blocks = edge_blocks(graph)
    for end in ("src", "dst"):
        edge_degree(graph, end)
    entry_count(graph)
    graph.tensor_slices, graph.has_edge_pos  # noqa: B018  (cached on first use)
    out = object.__new__(LeanGraph)
    heavy = {"edge_index", *_COMPACT, FACTORS_ATTR}
    out.__dict__.update({k: v for k, v in graph.__dict__.items() if k not in heavy})
    out._num_edges, out._num_entries = graph.num_edges, graph.num_entries
    out._scatter_edges = {b.start: entry_slice(graph, "edge_index", b.start, b.stop).clone()
                          for b in blocks if not isinstance(b, EdgeBlock)}
    out._lean = {}
    factored = isinstance(graph, FactoredGraph) and graph.edge_factors is not None
    for name in _COMPACT:
        runs = graph.run_lengths(name) if factored else False
        if runs is not False:   # from the factors: the per-entry tensor is never written
            if runs is None:    # a stride-0 constant view: tiny already
                out.__dict__[name] = getattr(graph, name)
                continue
            shape = torch.Size([graph.num_params if name == "tensor_id" else graph.num_edges]
                               + ([2] if name == "edge_pos" else []))
            dtype = graph.edge_factors.pos_dtype if name == "edge_pos" else torch.long
            rl = _RunLength.from_runs(runs[0], runs[1], dtype, shape)
            if rl is not None:
                out._lean[name] = rl
            else:
                out.__dict__[name] = getattr(graph, name)
            continue
        t = getattr(graph, name)
        rl = _RunLength.encode(t)
        if rl is not None:
            out._lean[name] = rl
        else:
            out.__dict__[name] = t
    return out


def materialized(graph: ParamGraph) -> ParamGraph:
    """A plain ParamGraph with every field of ``graph`` (for tests)."""
    return ParamGraph(**{f.name: getattr(graph, f.name) for f in fields(ParamGraph)})
