"""A ParamGraph whose per-edge tensors are built only when read.

Every weight's edges are a broadcast of small tensors: a Linear's sources
depend on the column only, its destinations on the row only (``[1, in]`` and
``[out, 1]``). :func:`build_graph` keeps them in that form (one
:class:`EdgeChunk` per edge-held tensor, node ids final) and returns a
:class:`FactoredGraph`: the same :class:`~l2o.graph.ParamGraph`, whose
``edge_index``, ``edge_kind``, ``edge_pos`` and ``tensor_id`` -- 32 bytes per
parameter, 4 GB for GPT-2 small -- are written the first time they are read
(then kept), with exactly the values an eager build writes.

What the chunked optimizer step needs from them is derived from the factors
instead, without writing anything per entry:

* :meth:`FactoredGraph.factored_edge_blocks`: the dense blocks
  (:mod:`l2o.graph.blocks`), equal to what ``_detect`` finds in the written
  ``edge_index``;
* :meth:`FactoredGraph.factored_degree`: in/out degrees per node;
* :meth:`FactoredGraph.column_static`: a block's per-column kinds and positions;
* :meth:`FactoredGraph.run_lengths`: run-length codes of the per-entry tensors
  (for :func:`l2o.fast.lean.lean_graph`);
* :meth:`FactoredGraph.entry_slice`: a range of one of them.

Assigning one of the four attributes (tests rewire graphs) writes the other
three and drops the factors, so the graph stays consistent.
``tests/test_graph_factored.py`` checks each derivation against the written
tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .param_graph import ParamGraph, _components

HEAVY = ("edge_index", "edge_kind", "edge_pos", "tensor_id")


@dataclass
class EdgeChunk:
    """Edges of one weight: entry ``j`` (row-major over ``shape``) of flat
    range ``[start, stop)`` goes ``src[j] -> dst[j]`` with kind ``kind[j]``
    and position ``pos[j]``, each broadcast to ``shape`` (``pos`` to
    ``shape + (2,)``; None means (0, 0)). No dimension of ``src``, ``dst``,
    ``kind`` or ``pos`` has stride 0 and size > 1 (:func:`compact`)."""
    start: int
    stop: int
    shape: tuple[int, ...]
    src: Tensor
    dst: Tensor
    kind: Tensor | int
    pos: Tensor | None

    def to(self, device) -> "EdgeChunk":
        def mv(t):
            return t.to(device) if isinstance(t, Tensor) else t
        return EdgeChunk(self.start, self.stop, self.shape, mv(self.src), mv(self.dst), mv(self.kind),
                         mv(self.pos))


@dataclass
class EdgeFactors:
    chunks: list[EdgeChunk]
    num_edges: int
    one_kind: int | None          # every edge has this kind (edge_kind is a stride-0 view)
    any_pos: bool                 # some chunk has positions (else edge_pos is a stride-0 zero view)
    pos_dtype: torch.dtype        # the default dtype when the graph was built

    def to(self, device) -> "EdgeFactors":
        return EdgeFactors([c.to(device) for c in self.chunks], self.num_edges, self.one_kind, self.any_pos,
                           self.pos_dtype)


def compact(t: Tensor) -> Tensor:
    """``t`` with every broadcast (stride 0, size > 1) dimension cut to size 1:
    ``compact(t).expand(t.shape)`` equals ``t``."""
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _padded(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def _row_split(shape: tuple[int, ...], rows: int) -> int | None:
    """``d`` with ``prod(shape[:d]) == rows`` (the first such), or None."""
    p = 1
    for d in range(len(shape) + 1):
        if p == rows:
            return d
        if d < len(shape):
            p *= shape[d]
    return None


class _RowView:
    """A tensor broadcast to ``shape (+ tail)`` and seen as a ``[rows, cols]``
    matrix (rows = the first ``d`` dims), kept in its base's size: full row
    ``i`` is base row ``index[i]`` expanded over the column dims."""

    def __init__(self, t: Tensor, shape: tuple[int, ...], d: int, tail: tuple[int, ...] = ()):
        full = tuple(shape) + tail
        b = _padded(t, len(full))
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


def _expand(t: Tensor | int, shape: tuple[int, ...], device) -> Tensor:
    if isinstance(t, Tensor):
        return t.expand(shape)
    return torch.full((1,), int(t), dtype=torch.long, device=device).expand(shape)


class FactoredGraph(ParamGraph):
    """See the module docstring. Built by :meth:`GraphState.finish`; behaves
    as a :class:`ParamGraph` in every respect."""

    # --------------------------------------------------------------- fields
    @property
    def _factors(self) -> EdgeFactors | None:
        return self.__dict__.get("_edge_factors")

    @property
    def num_edges(self) -> int:
        f = self._factors
        return f.num_edges if f is not None else int(self.__dict__["edge_index"].shape[1])

    @property
    def device(self) -> torch.device:
        return self.node_type.device

    def _materialize(self, name: str) -> Tensor:
        f = self._factors
        E, dev = f.num_edges, self.node_type.device
        if name == "tensor_id":
            numels = self.numels
            out = torch.empty(sum(numels), dtype=torch.long, device=dev)
            a = 0
            for k, size in enumerate(numels):
                out[a:a + size].fill_(k)
                a += size
            return out
        if name == "edge_index":
            out = torch.empty(2, E, dtype=torch.long, device=dev)
            for c in f.chunks:
                out[0, c.start:c.stop].view(c.shape).copy_(c.src.expand(c.shape))
                out[1, c.start:c.stop].view(c.shape).copy_(c.dst.expand(c.shape))
            return out
        if name == "edge_kind":
            if f.one_kind is not None:
                return torch.full((1,), f.one_kind, dtype=torch.long, device=dev).expand(E)
            out = torch.empty(E, dtype=torch.long, device=dev)
            for c in f.chunks:
                if isinstance(c.kind, Tensor):
                    out[c.start:c.stop].view(c.shape).copy_(c.kind.expand(c.shape))
                else:
                    out[c.start:c.stop].fill_(int(c.kind))
            return out
        assert name == "edge_pos"
        if not f.any_pos:
            return torch.zeros(1, 2, dtype=f.pos_dtype, device=dev).expand(E, 2)
        out = torch.empty(E, 2, dtype=f.pos_dtype, device=dev)
        for c in f.chunks:
            if c.pos is not None:
                out[c.start:c.stop].view(c.shape + (2,)).copy_(c.pos.expand(c.shape + (2,)))
            else:
                out[c.start:c.stop].zero_()
        return out

    def _written(self) -> None:
        """Write every per-entry tensor and forget the factors."""
        if self._factors is None:
            return
        for name in HEAVY:
            if name not in self.__dict__:
                self.__dict__[name] = self._materialize(name)
        del self.__dict__["_edge_factors"]

    def entry_slice(self, name: str, s: int, e: int) -> Tensor:
        """``getattr(self, name)[s:e]`` (``[:, s:e]`` for ``edge_index``),
        writing only the chunks that overlap the range."""
        f = self._factors
        if f is None or name not in HEAVY or name in self.__dict__ or name == "tensor_id" \
                or (name == "edge_kind" and f.one_kind is not None) or (name == "edge_pos" and not f.any_pos):
            t = getattr(self, name)
            return t[:, s:e] if name == "edge_index" else t[s:e]
        parts = []
        for c in f.chunks:
            lo, hi = max(s, c.start), min(e, c.stop)
            if lo >= hi:
                continue
            if name == "edge_index":
                full = torch.stack([c.src.expand(c.shape).reshape(-1), c.dst.expand(c.shape).reshape(-1)])
                parts.append(full[:, lo - c.start:hi - c.start])
            elif name == "edge_kind":
                kind = _expand(c.kind, c.shape, self.device).reshape(-1)
                parts.append(kind[lo - c.start:hi - c.start].to(torch.long))
            else:
                pos = c.pos.expand(c.shape + (2,)).reshape(-1, 2).to(f.pos_dtype) if c.pos is not None \
                    else torch.zeros(c.stop - c.start, 2, dtype=f.pos_dtype, device=self.device)
                parts.append(pos[lo - c.start:hi - c.start])
        if name == "edge_index":
            return torch.cat(parts, dim=1) if parts else torch.zeros(2, 0, dtype=torch.long, device=self.device)
        if parts:
            return torch.cat(parts)
        return torch.zeros((0, 2) if name == "edge_pos" else (0,), dtype=f.pos_dtype if name == "edge_pos" else torch.long,
                           device=self.device)

    # ------------------------------------------------- derived, from factors
    def factored_edge_blocks(self) -> list | None:
        """The dense blocks of :func:`l2o.graph.blocks.edge_blocks`, from the
        factors (None when the graph has none)."""
        from .blocks import EdgeBlock, ScatterBlock, _detect

        f = self._factors
        if f is None:
            return None
        blocks = []
        for k, c in enumerate(f.chunks):
            shape = self.param_shapes[self.flat_order[k]]
            rows = shape[0] if len(shape) else 0
            n = c.stop - c.start
            d = _row_split(c.shape, rows) if n > 0 and rows > 0 and n % rows == 0 else None
            if d is None:
                # the general case, on this chunk's written edges
                src = c.src.expand(c.shape).reshape(-1)
                dst = c.dst.expand(c.shape).reshape(-1)
                found = _detect(src, dst, rows)
            else:
                found = _detect_factored(c, rows, d)
                if found is not None:
                    found = EdgeBlock(0, n, *found)
            if found is None:
                blocks.append(ScatterBlock(c.start, c.stop))
            else:
                found.start, found.stop = c.start, c.stop
                blocks.append(found)
        return blocks

    def factored_degree(self, end: str) -> Tensor | None:
        """``bincount(edge_index[end])`` from the dense blocks."""
        from .blocks import EdgeBlock, edge_blocks

        f = self._factors
        if f is None:
            return None
        deg = torch.zeros(self.num_nodes, dtype=torch.long, device=self.device)
        for b in edge_blocks(self):
            if not isinstance(b, EdgeBlock):
                idx = self.entry_slice("edge_index", b.start, b.stop)[0 if end == "src" else 1]
                deg += torch.bincount(idx, minlength=self.num_nodes)
            elif b.row_end == end:
                deg.index_add_(0, b.row_nodes, torch.full_like(b.row_nodes, b.cols))
            else:
                deg.index_add_(0, b.col_nodes, torch.full_like(b.col_nodes, b.rows // b.groups))
        return deg

    def column_static(self, b) -> tuple[Tensor, Tensor] | None | bool:
        """``(edge_kind [cols], edge_pos [cols, 2])`` of dense block ``b`` when
        they depend on the column only, else None; False when the factors
        cannot say (the caller then reads the written slices)."""
        f = self._factors
        if f is None:
            return False
        c = next((c for c in f.chunks if c.start == b.start and c.stop == b.stop), None)
        d = _row_split(c.shape, b.rows) if c is not None and b.stop > b.start else None
        if d is None:
            return False
        dev = self.device
        if isinstance(c.kind, Tensor):
            kv = _RowView(c.kind, c.shape, d)
            if not kv.rows_equal(kv.index, kv.index[:1].expand_as(kv.index)):
                return None
            kind = kv.expand_rows(kv.index[:1]).reshape(-1).to(torch.long)
        else:
            kind = torch.full((b.cols,), int(c.kind), dtype=torch.long, device=dev)
        if c.pos is not None:
            pv = _RowView(c.pos, c.shape, d, (2,))
            if not pv.rows_equal(pv.index, pv.index[:1].expand_as(pv.index)):
                return None
            pos = pv.expand_rows(pv.index[:1]).reshape(b.cols, 2).to(f.pos_dtype)
        else:
            pos = torch.zeros(b.cols, 2, dtype=f.pos_dtype, device=dev)
        return kind.clone(), pos.clone()

    def run_lengths(self, name: str) -> tuple[Tensor, Tensor] | None | bool:
        """``torch.unique_consecutive(getattr(self, name), return_counts=True,
        dim=0)`` for ``tensor_id``, ``edge_kind`` and ``edge_pos``, from the
        factors; None when the tensor is a stride-0 constant view; False when
        the factors cannot say."""
        f = self._factors
        if f is None or name not in HEAVY or name == "edge_index" or name in self.__dict__:
            return False
        dev = self.device
        if name == "tensor_id":
            numels = torch.tensor(self.numels, dtype=torch.long)
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

    def edge_components(self) -> int:
        """:meth:`ParamGraph.edge_components` over a smaller edge set with the
        same connectivity: in a dense block every row node of a group meets
        every column node of that group, so each group becomes a star on its
        first column node."""
        from .blocks import EdgeBlock, edge_blocks

        if self._factors is None or self.num_edges == 0:
            return super().edge_components()
        src, dst = [], []
        for b in edge_blocks(self):
            if not isinstance(b, EdgeBlock):
                e = self.entry_slice("edge_index", b.start, b.stop)
                src.append(e[0])
                dst.append(e[1])
                continue
            per_group = b.rows // b.groups
            cols = b.col_nodes.view(b.groups, b.cols)
            hub = cols[:, :1]
            src += [hub.expand(b.groups, per_group).reshape(-1), hub.expand(b.groups, b.cols).reshape(-1)]
            dst += [b.row_nodes, cols.reshape(-1)]
        return _components(self.num_nodes, torch.cat(src), torch.cat(dst))

    # ------------------------------------------------------------ utilities
    def to(self, device) -> ParamGraph:
        f = self._factors
        if f is None:
            return ParamGraph.to(self, device)
        device = torch.device(device)
        same = device == self.device or (device.index is None and device.type == self.device.type)
        out = object.__new__(FactoredGraph)
        for fl in fields(ParamGraph):
            if fl.name in HEAVY:
                if same and fl.name in self.__dict__:
                    out.__dict__[fl.name] = self.__dict__[fl.name]
                continue
            v = getattr(self, fl.name)
            out.__dict__[fl.name] = v.to(device) if isinstance(v, Tensor) else v
        out.__dict__["_edge_factors"] = f if same else f.to(device)
        if "_has_edge_pos" in self.__dict__:
            out._has_edge_pos = self._has_edge_pos
        return out


def _heavy_property(name: str) -> property:
    def get(self):
        v = self.__dict__.get(name)
        if v is None:
            v = self.__dict__[name] = self._materialize(name)
        return v

    def set_(self, value):
        self._written()
        self.__dict__[name] = value
    return property(get, set_)


for _name in HEAVY:
    setattr(FactoredGraph, _name, _heavy_property(_name))


def _detect_factored(c: EdgeChunk, rows: int, d: int):
    """``blocks._detect`` on the chunk's broadcast ``src``/``dst`` seen as
    ``[rows, cols]``, computed on their bases: ``(groups, rows, cols, row_end,
    row_nodes, col_nodes)`` or None."""
    n = c.stop - c.start
    cols = n // rows
    for row_end, r_t, c_t in (("dst", c.dst, c.src), ("src", c.src, c.dst)):
        r = _RowView(r_t, c.shape, d)
        if not bool((r.base == r.base[:, :1]).all()):
            continue
        cv = _RowView(c_t, c.shape, d)
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
