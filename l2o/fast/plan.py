"""How the chunked no-grad step walks a graph's flat entries.

A :class:`ChunkPlan` cuts the flat parameter vector into runs of at most
``chunk`` entries that never cross a tensor boundary (per-tensor statistics
and weights apply to a whole run) and, on the edge part, never cut a row of a
dense block (so the neuron fixed by the row is the same across a run's
columns). Everything one run needs -- its node ids, its column positions --
is sliced once here, so the per-step loops do no index arithmetic.

Cache sizes, not FLOPs, set the chunk: on CPU the metanetwork's edge-sized
intermediates are memory-bound, and a run of ~64k entries keeps every
intermediate of one run in cache (bench/fast_step.py measures the result).
The fused GMN keeps no run-sized intermediate, and takes longer runs
(:data:`l2o.fast.backend.CHUNKED`), longest over dense blocks (``dense_chunk``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph.blocks import EdgeBlock, edge_blocks
from ..graph.param_graph import ParamGraph
from .lean import entry_slice

DEFAULT_CHUNK = 65_536


@dataclass
class DenseRun:
    """Rows ``[groups, rows, cols]`` of one dense block (``groups`` > 1 only
    when a run covers several whole groups of a grouped convolution)."""
    start: int
    stop: int
    tensor: int
    groups: int
    rows: int
    cols: int
    row_end: str          # "dst" or "src": which end of an edge its row fixes
    row_nodes: Tensor     # [groups * rows]
    col_nodes: Tensor     # [groups * cols]
    # (edge_kind [cols], edge_pos [cols, 2]) when they depend on the column only
    static_cols: tuple[Tensor, Tensor] | None
    row_range: tuple[int, int] | None = None  # row_nodes as a range of node ids, when they are one (the usual case)

    def __post_init__(self):
        n = self.row_nodes.numel()
        first = int(self.row_nodes[0]) if n else 0
        if n and bool((self.row_nodes == torch.arange(first, first + n, device=self.row_nodes.device)).all()):
            self.row_range = (first, first + n)

    def rows_of(self, node_table: Tensor) -> Tensor:
        """``node_table[:, row_nodes]``: a view when the rows are a range of nodes."""
        if self.row_range is not None:
            return node_table[:, self.row_range[0]:self.row_range[1]]
        return node_table.index_select(1, self.row_nodes)

    def add_to_rows_(self, acc: Tensor, values: Tensor) -> None:
        """``acc[:, row_nodes] += values``."""
        if self.row_range is not None:
            acc[:, self.row_range[0]:self.row_range[1]] += values
        else:
            acc.index_add_(1, self.row_nodes, values)


@dataclass
class ScatterRun:
    """Edges with no block pattern: per-edge gathers and scatters."""
    start: int
    stop: int
    tensor: int
    src: Tensor
    dst: Tensor
    edge_kind: Tensor
    edge_pos: Tensor


@dataclass
class Run:
    """Any flat range within one tensor (for the statistics pass)."""
    start: int
    stop: int
    tensor: int


def _column_static(graph: ParamGraph, b: EdgeBlock) -> tuple[Tensor, Tensor] | None:
    factored = getattr(graph, "column_static", None)
    found = factored(b) if factored is not None else False
    if found is not False:   # from a built graph's factors: no per-edge slice written
        return found
    kind = entry_slice(graph, "edge_kind", b.start, b.stop).view(b.rows, b.cols)
    pos = entry_slice(graph, "edge_pos", b.start, b.stop).view(b.rows, b.cols, -1)
    if bool((kind == kind[:1]).all()) and bool((pos == pos[:1]).all()):
        return kind[0].clone(), pos[0].clone()
    return None


def _dense_runs(graph: ParamGraph, b: EdgeBlock, tensor: int, chunk: int, cuts: list[int]) -> list[DenseRun]:
    runs = []
    per_group = b.rows // b.groups
    col_nodes = b.col_nodes.view(b.groups, b.cols)
    static = _column_static(graph, b)
    rows_per_run = max(1, chunk // b.cols)
    cut_rows = []
    for c in _inside(cuts, b.start, b.stop):
        if (c - b.start) % b.cols:
            raise ValueError(f"a run bound at flat entry {c} cuts a row of tensor {tensor}'s edge block "
                             f"({b.rows} rows of {b.cols})")
        cut_rows.append((c - b.start) // b.cols)
    if rows_per_run >= per_group and not cut_rows:   # whole groups per run
        groups_per_run = rows_per_run // per_group
        for g0 in range(0, b.groups, groups_per_run):
            g1 = min(b.groups, g0 + groups_per_run)
            start = b.start + g0 * per_group * b.cols
            runs.append(DenseRun(start, start + (g1 - g0) * per_group * b.cols, tensor, g1 - g0, per_group, b.cols,
                                 b.row_end, b.row_nodes[g0 * per_group:g1 * per_group],
                                 col_nodes[g0:g1].reshape(-1), static))
        return runs
    for g in range(b.groups):        # several runs per group, sharing one column table
        group_cols = col_nodes[g]
        for row0, row1 in _pieces(g * per_group, (g + 1) * per_group, rows_per_run, cut_rows):
            start = b.start + row0 * b.cols
            runs.append(DenseRun(start, start + (row1 - row0) * b.cols, tensor, 1, row1 - row0, b.cols, b.row_end,
                                 b.row_nodes[row0:row1], group_cols, static))
    return runs


def _inside(cuts: list[int], start: int, stop: int) -> list[int]:
    """The sorted ``cuts`` strictly inside ``(start, stop)``."""
    return cuts[bisect.bisect_right(cuts, start):bisect.bisect_left(cuts, stop)]


def _pieces(start: int, stop: int, chunk: int, cuts: list[int]):
    """``[start, stop)`` in pieces of at most ``chunk``, also cut at ``cuts`` (sorted)."""
    for s, e in zip([start, *_inside(cuts, start, stop)], [*_inside(cuts, start, stop), stop]):
        for a in range(s, e, chunk):
            yield a, min(e, a + chunk)


class ChunkPlan:
    """Runs of at most ``chunk`` entries (default ``DEFAULT_CHUNK``) over one
    graph's flat vector, and the run-sized workspaces of the steps that walk
    them. ``dense_chunk`` (default ``chunk``) bounds instead the dense edge
    runs and the statistics runs over edges, which the fused kernels walk
    without a run-sized workspace: longer runs there mean fewer calls.
    Owned by the step that uses it (:class:`l2o.fast.backend.ChunkedBackend`),
    never cached on the graph. ``cuts``: flat positions where runs must
    also end (a sharded step's span bounds); one inside a row of a dense
    block is a ``ValueError``."""

    def __init__(self, graph: ParamGraph, chunk: int | None = None, dense_chunk: int | None = None,
                 cuts: tuple[int, ...] | list[int] = ()):
        chunk = DEFAULT_CHUNK if chunk is None else chunk
        dense_chunk = chunk if dense_chunk is None else dense_chunk
        if chunk < 1 or dense_chunk < 1:
            raise ValueError(f"chunk and dense_chunk must be positive, got {chunk} and {dense_chunk}")
        self.chunk, self.dense_chunk = int(chunk), int(dense_chunk)
        cuts = sorted(set(cuts))
        self.num_edges = graph.num_edges
        self.num_params = graph.num_params
        self.num_tensors = graph.num_tensors
        self.tensor_slices = graph.tensor_slices
        self.stat_runs = [Run(s, e, k) for k, t in enumerate(self.tensor_slices)
                          for s, e in _pieces(t.start, t.stop, dense_chunk if t.stop <= graph.num_edges else chunk, cuts)]
        self.stat_run_tensor = torch.tensor([r.tensor for r in self.stat_runs], device=graph.device)
        self.tensor_counts = torch.tensor([t.stop - t.start for t in self.tensor_slices], device=graph.device,
                                          dtype=torch.float32).clamp(min=1)
        self.edge_runs: list[DenseRun | ScatterRun] = []
        for k, b in enumerate(edge_blocks(graph)):
            if isinstance(b, EdgeBlock):
                self.edge_runs += _dense_runs(graph, b, k, dense_chunk, cuts)
            else:
                # copies: a run must not keep the graph's whole index tensors alive (lean.py)
                self.edge_runs += [ScatterRun(s, e, k, *entry_slice(graph, "edge_index", s, e).clone(),
                                              entry_slice(graph, "edge_kind", s, e).clone(),
                                              entry_slice(graph, "edge_pos", s, e).clone())
                                   for s, e in _pieces(b.start, b.stop, chunk, cuts)]
        self._buffers: dict[tuple, Tensor] = {}

    def fixed(self, name: str, shape: tuple[int, ...], device: torch.device,
              dtype: torch.dtype = torch.float32) -> Tensor:
        """A reusable buffer of exactly ``shape`` and ``dtype``."""
        key = (name, shape, device, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, device=device, dtype=dtype)
        return self._buffers[key]

    def scratch(self, name: str, rows: int, length: int, device: torch.device) -> Tensor:
        """A contiguous ``[rows, length]`` float32 view of a workspace that is
        reused (fresh large allocations cost page faults on every step), grown
        to the longest run that asks for it: a step's first pass sizes it."""
        key = (name, device)
        need = rows * length
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = self._buffers[key] = torch.empty(need, device=device)
        return buf[: rows * length].view(rows, length)
