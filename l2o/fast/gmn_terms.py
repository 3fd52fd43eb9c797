"""The node and static terms of the GMN's chunked passes (:mod:`.gmn`).

A pass over a run computes ``W [e; x] + terms`` where the terms come from the
run's end nodes (:class:`NodeTerms`: ``S h[src] + D h[dst] + b``) or from the
edges' kind and position (:class:`StaticEdgeTerms`). On a dense run they are
broadcast along rows and columns (no per-edge gather); scatter runs gather.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph.param_graph import ParamGraph
from .lean import entry_slice
from .plan import DenseRun, ScatterRun


class NodeTerms:
    """``S h[src] + D h[dst] + b`` of one run, written into its ``[D, L]``
    output buffer before the product is accumulated onto it (``addmm_``):
    one pass over the run instead of a product plus two broadcast adds. On
    dense runs the column term (with the bias) is gathered once per column
    table and step, the row term is broadcast along each row."""

    def __init__(self, src_term: Tensor, dst_term: Tensor, bias: Tensor):
        self.src_t, self.dst_t = src_term.t().contiguous(), dst_term.t().contiguous()
        self.bias = bias.unsqueeze(1)
        self._cols: dict[int, Tensor] = {}
        self._rows: dict[int, Tensor] = {}   # per run: a pass of each later round reads them again

    def _col_table(self, run: DenseRun, col_t: Tensor) -> Tensor:
        col = self._cols.get(id(run.col_nodes))
        if col is None:
            col = self._cols[id(run.col_nodes)] = col_t.index_select(1, run.col_nodes).add_(self.bias)
        return col

    def tables(self, run: DenseRun) -> tuple[Tensor, Tensor]:
        """Contiguous row ``[D, groups * rows]`` and column (with the bias)
        ``[D, groups * cols]`` terms of a dense run, for the fused kernels."""
        row_t, col_t = (self.dst_t, self.src_t) if run.row_end == "dst" else (self.src_t, self.dst_t)
        rows = self._rows.get(id(run))
        if rows is None:
            rows = self._rows[id(run)] = run.rows_of(row_t).contiguous()
        return rows, self._col_table(run, col_t)

    def linear(self, out: Tensor, weight: Tensor, inp: Tensor, run: DenseRun | ScatterRun) -> Tensor:
        """``out = weight @ inp + node terms`` (``out`` ``[D, L]``)."""
        if isinstance(run, ScatterRun):
            torch.add(self.src_t.index_select(1, run.src), self.dst_t.index_select(1, run.dst), out=out)
            out += self.bias
        else:
            d = out.shape[0]
            row_t, col_t = (self.dst_t, self.src_t) if run.row_end == "dst" else (self.src_t, self.dst_t)
            col = self._col_table(run, col_t)
            torch.add(col.view(d, run.groups, 1, run.cols),
                      run.rows_of(row_t).reshape(d, run.groups, run.rows, 1),
                      out=out.view(d, run.groups, run.rows, run.cols))
        return out.addmm_(weight, inp)


def sum_to_ends_(m: Tensor, run: DenseRun | ScatterRun, acc_src: Tensor, acc_dst: Tensor) -> None:
    """Add one run's messages ``[D, L]`` onto both end nodes (``acc_* [D, N]``)."""
    if isinstance(run, ScatterRun):
        acc_src.index_add_(1, run.src, m)
        acc_dst.index_add_(1, run.dst, m)
        return
    d = m.shape[0]
    acc_row, acc_col = (acc_dst, acc_src) if run.row_end == "dst" else (acc_src, acc_dst)
    m4 = m.view(d, run.groups, run.rows, run.cols)
    run.add_to_rows_(acc_row, m4.sum(3).view(d, -1))
    acc_col.index_add_(1, run.col_nodes, m4.sum(2).view(d, -1))


class StaticEdgeTerms:
    """``E_kind[kind] + W_p pos + b`` of the edge encoder, per run; computed
    once per block per step when kind and position depend on the column only."""

    def __init__(self, lopt, graph: ParamGraph, bias: Tensor):
        self.lopt, self.graph, self.bias, self._cache = lopt, graph, bias, {}

    def _slices(self, run) -> tuple[Tensor, Tensor]:
        return (entry_slice(self.graph, "edge_kind", run.start, run.stop),
                entry_slice(self.graph, "edge_pos", run.start, run.stop))

    def _compute(self, kind: Tensor, pos: Tensor) -> Tensor:
        term = self.lopt.edge_kind(kind) + self.bias
        if bool(pos.any()):
            term = term + self.lopt.edge_pos(pos)
        return term.t()

    def table(self, run: DenseRun) -> tuple[Tensor, int, int]:
        """For the fused kernels: a contiguous table and the (feature, row)
        strides at which edge ``(i, j)`` of ``run`` finds its term: ``[D, cols]``
        with row stride 0 when the terms depend on the column only."""
        if run.static_cols is None:
            term = self._compute(*self._slices(run)).contiguous()
            return term, run.stop - run.start, run.cols
        key = id(run.static_cols[0])
        if key not in self._cache:
            self._cache[key] = self._compute(*run.static_cols)
        return self._cache[key].contiguous(), run.cols, 0

    def linear(self, out: Tensor, weight: Tensor, inp: Tensor, run: DenseRun | ScatterRun) -> Tensor:
        """``out = weight @ inp + static terms`` (``out`` ``[D, L]``)."""
        if isinstance(run, ScatterRun):
            out.copy_(self._compute(run.edge_kind, run.edge_pos))
        elif run.static_cols is None:  # varies within a row: per-edge terms
            out.copy_(self._compute(*self._slices(run)))
        else:
            key = id(run.static_cols[0])
            if key not in self._cache:
                self._cache[key] = self._compute(*run.static_cols)
            d = out.shape[0]
            out.view(d, run.groups * run.rows, run.cols).copy_(self._cache[key].unsqueeze(1))
        return out.addmm_(weight, inp)
