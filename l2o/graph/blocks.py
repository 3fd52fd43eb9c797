"""Dense-block aggregation over a ParamGraph's edges.

The edges of one weight tensor are a dense bipartite block: entry
``W[r, c]`` (rows = first dim, columns = the rest flattened, kernel taps
included; failing that, rows = the first two dims, ...: :func:`row_counts`)
connects a node fixed by its row to a node fixed by its column (within its
group, for grouped convolutions or MoE experts). Summing edge messages onto
nodes is then a reshape and a ``sum`` over the block -- a streaming reduction
-- followed by an ``index_add`` of only ``rows`` or ``columns`` vectors,
instead of a scatter over every edge (measured 4-5x faster on CPU for
800k edges; no atomics on GPU).

The block pattern is *detected* from ``edge_index`` (never assumed from the
layer kind), so any edge layout stays correct: a tensor that does not match
is aggregated with a plain scatter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .param_graph import ParamGraph


@dataclass
class EdgeBlock:
    start: int
    stop: int
    groups: int        # G: rows split into G groups sharing a column-node table
    rows: int          # R (rows per group = R // G)
    cols: int          # C
    row_end: str       # "dst" or "src": which edge end is fixed by the row
    row_nodes: Tensor  # [R] node of each row
    col_nodes: Tensor  # [G * C] node of each column in each group


@dataclass
class ScatterBlock:
    start: int
    stop: int


def detect_block(src: Tensor, dst: Tensor, rows: int) -> EdgeBlock | None:
    n = src.numel()
    if rows <= 0 or n == 0 or n % rows:   # an empty weight ([3, 0]) has no column to read: a scatter block
        return None
    cols = n // rows
    for row_end, r_idx, c_idx in (("dst", dst, src), ("src", src, dst)):
        r = r_idx.view(rows, cols)
        if not bool((r == r[:, :1]).all()):
            continue
        c = c_idx.view(rows, cols)
        # rows of one group share a column-node table: the group size is the
        # first row whose table differs from row 0's
        differs = (c != c[:1]).any(1).nonzero()
        per_group = int(differs[0]) if differs.numel() else rows
        if rows % per_group:
            continue
        g = rows // per_group
        cg = c.view(g, per_group, cols)
        if bool((cg == cg[:, :1]).all()):
            return EdgeBlock(0, n, g, rows, cols, row_end, r[:, 0].clone(), cg[:, 0].reshape(-1).clone())
    return None


def row_counts(shape) -> list[int]:
    """The row counts a weight's block is tried with, in order: its first dim,
    then the product of its first two, ... (a 3-D MoE expert weight
    ``[E, 2I, H]`` is a block of ``E * 2I`` rows, each fixed to one expert unit)."""
    counts, p = [], 1
    for d in shape[:-1] if len(shape) > 1 else shape:
        p *= int(d)
        counts.append(p)
    return counts


def edge_blocks(graph: ParamGraph) -> list[EdgeBlock | ScatterBlock]:
    """One entry per edge-held tensor, in flat order (cached on the graph)."""
    return graph.derived("edge_blocks", lambda: _find_edge_blocks(graph))


def _find_edge_blocks(graph: ParamGraph) -> list[EdgeBlock | ScatterBlock]:
    factored = getattr(graph, "factored_edge_blocks", None)
    blocks = factored() if factored is not None else None
    if blocks is not None:  # a graph built by build_graph: from its factors, nothing per edge read
        return blocks
    blocks = []
    start = 0
    src_all, dst_all = graph.edge_index[0], graph.edge_index[1]
    for k in range(graph.num_edge_params):
        shape = graph.param_shapes[graph.flat_order[k]]
        stop = start + shape.numel()
        found = None
        for rows in row_counts(shape):
            found = detect_block(src_all[start:stop], dst_all[start:stop], rows)
            if found is not None:
                break
        if found is None:
            blocks.append(ScatterBlock(start, stop))
        else:
            found.start, found.stop = start, stop
            blocks.append(found)
        start = stop
    return blocks


def edge_degree(graph: ParamGraph, end: str) -> Tensor:
    """[N] number of edges whose ``end`` ("src"/"dst") is each node (cached)."""
    def compute():
        factored = getattr(graph, "factored_degree", None)
        deg = factored(end) if factored is not None else None
        if deg is None:
            deg = torch.bincount(graph.edge_index[0 if end == "src" else 1], minlength=graph.num_nodes)
        return deg
    return graph.derived(f"degree_{end}", compute)


def entry_count(graph: ParamGraph) -> Tensor:
    """[N] number of node-held entries on each node (cached)."""
    return graph.derived("entry_count", lambda: torch.bincount(graph.entry_node, minlength=graph.num_nodes))


def sum_to_nodes(m: Tensor, graph: ParamGraph, end: str) -> Tensor:
    """[N, D] sum of edge rows ``m`` [E, D] onto each edge's ``end`` node."""
    out = m.new_zeros(graph.num_nodes, m.shape[1])
    idx_all = graph.edge_index[0 if end == "src" else 1]
    if not use_dense_blocks(graph):
        return out.index_add_(0, idx_all, m)
    for b in edge_blocks(graph):
        chunk = m[b.start:b.stop]
        if isinstance(b, ScatterBlock):
            out.index_add_(0, idx_all[b.start:b.stop], chunk)
        elif b.row_end == end:
            out.index_add_(0, b.row_nodes, chunk.view(b.rows, b.cols, -1).sum(1))
        else:
            per_group = chunk.view(b.groups, b.rows // b.groups, b.cols, -1).sum(1)
            out.index_add_(0, b.col_nodes, per_group.reshape(b.groups * b.cols, -1))
    return out


def mean_to_nodes(m: Tensor, graph: ParamGraph, end: str) -> Tensor:
    """Mean of incoming edge rows per node (zero where a node has no such edge)."""
    deg = edge_degree(graph, end).clamp(min=1).to(m.dtype).unsqueeze(1)
    return sum_to_nodes(m, graph, end) / deg


# Below this many edges the per-block Python loop costs more than the gathers
# and scatters it replaces (small models are dominated by per-op overhead).
DENSE_BLOCK_MIN_EDGES = 50_000


def use_dense_blocks(graph: ParamGraph) -> bool:
    return graph.num_edges >= DENSE_BLOCK_MIN_EDGES


def add_node_terms_(z: Tensor, graph: ParamGraph, src_term: Tensor, dst_term: Tensor) -> Tensor:
    """``z += src_term[src] + dst_term[dst]`` for edge rows ``z`` [E, D], in place.

    On a dense block the node terms are broadcast over the block's rows and
    columns, so no edge-sized gathered copy is ever built.
    """
    if not use_dense_blocks(graph):
        z += src_term.index_select(0, graph.edge_index[0])
        z += dst_term.index_select(0, graph.edge_index[1])
        return z
    d = z.shape[1]
    for b in edge_blocks(graph):
        zb = z[b.start:b.stop]
        if isinstance(b, ScatterBlock):
            zb += src_term.index_select(0, graph.edge_index[0, b.start:b.stop])
            zb += dst_term.index_select(0, graph.edge_index[1, b.start:b.stop])
            continue
        row_term, col_term = (dst_term, src_term) if b.row_end == "dst" else (src_term, dst_term)
        zb = zb.view(b.groups, b.rows // b.groups, b.cols, d)
        zb += row_term.index_select(0, b.row_nodes).view(b.groups, b.rows // b.groups, 1, d)
        zb += col_term.index_select(0, b.col_nodes).view(b.groups, 1, b.cols, d)
    return z
