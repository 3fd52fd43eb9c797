"""What the chunked optimizer step needs from a factored graph's edges,
derived from the factors without writing anything per edge: the dense
blocks, node degrees, per-column kinds and positions, run-length codes, and
the connected pieces. :class:`l2o.graph.factored.FactoredGraph`'s methods of
the same names call these; each equals what the written tensors give
(``tests/test_graph_factored.py``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import EdgeBlock, ScatterBlock, detect_block, edge_blocks, row_counts
from .edge_factors import HEAVY, EdgeChunk
from .param_graph import count_components


def padded(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def row_split(shape: tuple[int, ...], rows: int) -> int | None:
    """``d`` with ``prod(shape[:d]) == rows`` (the first such), or None."""
    p = 1
    for d in range(len(shape) + 1):
        if p == rows:
            return d
        if d < len(shape):
            p *= shape[d]
    return None


class RowView:
    """A tensor broadcast to ``shape (+ tail)`` and seen as a ``[rows, cols]``
    matrix (rows = the first ``d`` dims), kept in its base's size: full row
    ``i`` is base row ``index[i]`` expanded over the column dims."""

    def __init__(self, t: Tensor, shape: tuple[int, ...], d: int, tail: tuple[int, ...] = ()):
        full = tuple(shape) + tail
        b = padded(t, len(full))
        self.rows_shape = tuple(b.shape[:d])
        self.col_base = tuple(b.shape[d:])
        self.col_full = full[d:]
        nb = math.prod(self.rows_shape)
        self.base = b.reshape(nb, -1)
        self.index = torch.arange(nb, device=t.device).view(self.rows_shape).expand(shape[:d]).reshape(-1)

    def expand_rows(self, base_rows: Tensor) -> Tensor:
        """The full column tables of these base rows, ``[len(base_rows), cols]``
        (``cols`` counting a tail)."""
        k = base_rows.numel()
        return self.base[base_rows].view((k,) + self.col_base).expand((k,) + self.col_full).reshape(k, -1)

    def rows_equal(self, base_rows_a: Tensor, base_rows_b: Tensor) -> bool:
        """Whether full rows with these base rows (pairwise) are equal."""
        differ = base_rows_a != base_rows_b
        if not bool(differ.any()):
            return True
        pairs = torch.unique(torch.stack([base_rows_a[differ], base_rows_b[differ]]), dim=1)
        return bool((self.base[pairs[0]] == self.base[pairs[1]]).all())


def factored_edge_blocks(graph) -> list | None:
    """The dense blocks of :func:`l2o.graph.blocks.edge_blocks`, from the
    factors (None when the graph has none)."""
    f = graph.edge_factors
    if f is None:
        return None
    blocks = []
    for k, c in enumerate(f.chunks):
        found = None
        for rows in row_counts(graph.param_shapes[graph.flat_order[k]]):
            found = _chunk_block(c, rows)
            if found is not None:
                break
        if found is None:
            blocks.append(ScatterBlock(c.start, c.stop))
        else:
            found.start, found.stop = c.start, c.stop
            blocks.append(found)
    return blocks


def _chunk_block(c: EdgeChunk, rows: int) -> EdgeBlock | None:
    """The dense block of chunk ``c`` seen as ``[rows, cols]``, or None."""
    n = c.stop - c.start
    d = row_split(c.shape, rows) if n > 0 and rows > 0 and n % rows == 0 else None
    if d is None:
        # the general case, on this chunk's written edges
        return detect_block(c.src.expand(c.shape).reshape(-1), c.dst.expand(c.shape).reshape(-1), rows)
    found = detect_factored(c, rows, d)
    return EdgeBlock(0, n, *found) if found is not None else None


def factored_degree(graph, end: str) -> Tensor | None:
    """``bincount(edge_index[end])`` from the dense blocks."""
    f = graph.edge_factors
    if f is None:
        return None
    deg = torch.zeros(graph.num_nodes, dtype=torch.long, device=graph.device)
    for b in edge_blocks(graph):
        if not isinstance(b, EdgeBlock):
            idx = graph.entry_slice("edge_index", b.start, b.stop)[0 if end == "src" else 1]
            deg += torch.bincount(idx, minlength=graph.num_nodes)
        elif b.row_end == end:
            deg.index_add_(0, b.row_nodes, torch.full_like(b.row_nodes, b.cols))
        else:
            deg.index_add_(0, b.col_nodes, torch.full_like(b.col_nodes, b.rows // b.groups))
    return deg


def column_static(graph, b) -> tuple[Tensor, Tensor] | None | bool:
    """``(edge_kind [cols], edge_pos [cols, 2])`` of dense block ``b`` when
    they depend on the column only, else None; False when the factors
    cannot say (the caller then reads the written slices)."""
    f = graph.edge_factors
    if f is None:
        return False
    c = next((c for c in f.chunks if c.start == b.start and c.stop == b.stop), None)
    d = row_split(c.shape, b.rows) if c is not None and b.stop > b.start else None
    if d is None:
        return False
    dev = graph.device
    if isinstance(c.kind, Tensor):
        kv = RowView(c.kind, c.shape, d)
        if not kv.rows_equal(kv.index, kv.index[:1].expand_as(kv.index)):
            return None
        kind = kv.expand_rows(kv.index[:1]).reshape(-1).to(torch.long)
    else:
        kind = torch.full((b.cols,), int(c.kind), dtype=torch.long, device=dev)
    if c.pos is not None:
        pv = RowView(c.pos, c.shape, d, (2,))
        if not pv.rows_equal(pv.index, pv.index[:1].expand_as(pv.index)):
            return None
        pos = pv.expand_rows(pv.index[:1]).reshape(b.cols, 2).to(f.pos_dtype)
    else:
        pos = torch.zeros(b.cols, 2, dtype=f.pos_dtype, device=dev)
    return kind.clone(), pos.clone()


def run_lengths(graph, name: str) -> tuple[Tensor, Tensor] | None | bool:
    """``torch.unique_consecutive(getattr(self, name), return_counts=True,
    dim=0)`` for ``tensor_id``, ``edge_kind`` and ``edge_pos``, from the
    factors; None when the tensor is a stride-0 constant view; False when
    the factors cannot say."""
    f = graph.edge_factors
    if f is None or name not in HEAVY or name == "edge_index" or graph.is_written(name):
        return False
    dev = graph.device
    if name == "tensor_id":
        numels = torch.tensor(graph.numels, dtype=torch.long)
        keep = numels > 0
        return torch.arange(len(numels))[keep].to(dev), numels[keep].to(dev)
    if (name == "edge_kind" and f.one_kind is not None) or (name == "edge_pos" and not f.any_pos):
        return None
    values, counts = [], []
    for c in f.chunks:
        n = c.stop - c.start
        if n == 0:
            continue
        if name == "edge_kind" and not isinstance(c.kind, Tensor):
            values.append(torch.tensor([int(c.kind)], dtype=torch.long, device=dev))
            counts.append(torch.tensor([n], device=dev))
        elif name == "edge_pos" and c.pos is None:
            values.append(torch.zeros(1, 2, dtype=f.pos_dtype, device=dev))
            counts.append(torch.tensor([n], device=dev))
        else:
            t = (c.kind.expand(c.shape).reshape(-1).to(torch.long) if name == "edge_kind"
                 else c.pos.expand(c.shape + (2,)).reshape(-1, 2).to(f.pos_dtype))
            v, cnt = torch.unique_consecutive(t, return_counts=True, dim=0)
            values.append(v)
            counts.append(cnt)
    if not values:
        return False
    v, cnt = torch.cat(values), torch.cat(counts)
    merged, inverse = torch.unique_consecutive(v, return_inverse=True, dim=0)
    return merged, torch.zeros(merged.shape[0], dtype=cnt.dtype, device=dev).index_add_(0, inverse, cnt)


def factored_edge_components(graph) -> int | None:
    """:meth:`ParamGraph.edge_components` over a smaller edge set with the
    same connectivity: in a dense block every row node of a group meets
    every column node of that group, so each group becomes a star on its
    first column node."""
    if graph.edge_factors is None or graph.num_edges == 0:
        return None
    src, dst = [], []
    for b in edge_blocks(graph):
        if not isinstance(b, EdgeBlock):
            e = graph.entry_slice("edge_index", b.start, b.stop)
            src.append(e[0])
            dst.append(e[1])
            continue
        per_group = b.rows // b.groups
        cols = b.col_nodes.view(b.groups, b.cols)
        hub = cols[:, :1]
        src += [hub.expand(b.groups, per_group).reshape(-1), hub.expand(b.groups, b.cols).reshape(-1)]
        dst += [b.row_nodes, cols.reshape(-1)]
    return count_components(graph.num_nodes, torch.cat(src), torch.cat(dst))


def detect_factored(c: EdgeChunk, rows: int, d: int):
    """``blocks.detect_block`` on the chunk's broadcast ``src``/``dst`` seen as
    ``[rows, cols]``, computed on their bases: ``(groups, rows, cols, row_end,
    row_nodes, col_nodes)`` or None."""
    n = c.stop - c.start
    cols = n // rows
    for row_end, r_t, c_t in (("dst", c.dst, c.src), ("src", c.src, c.dst)):
        r = RowView(r_t, c.shape, d)
        if not bool((r.base == r.base[:, :1]).all()):
            continue
        cv = RowView(c_t, c.shape, d)
        idx = cv.index
        # first full row whose column table differs from row 0's
        differs_base = (cv.base != cv.base[idx[0]]).any(1)
        differs = differs_base[idx].nonzero()
        per_group = int(differs[0]) if differs.numel() else rows
        if rows % per_group:
            continue
        g = rows // per_group
        lead = idx.view(g, per_group)[:, :1].expand(g, per_group).reshape(-1)
        if not cv.rows_equal(idx, lead):
            continue
        row_nodes = r.base[r.index, 0].clone()
        col_nodes = cv.expand_rows(idx[::per_group]).reshape(-1).clone()
        assert col_nodes.numel() == g * cols
        return g, rows, cols, row_end, row_nodes, col_nodes
    return None
