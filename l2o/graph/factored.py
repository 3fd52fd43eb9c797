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

(:mod:`l2o.graph.factored_derive`; the factors themselves:
:mod:`l2o.graph.edge_factors`):

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

from dataclasses import fields

import torch
from torch import Tensor

from . import factored_derive
from .edge_factors import HEAVY, EdgeChunk, EdgeFactors, compact
from .param_graph import ParamGraph

# where a FactoredGraph keeps its factors (a copy of the graph without them drops this key)
FACTORS_ATTR = "_edge_factors"

__all__ = ["FACTORS_ATTR", "HEAVY", "EdgeChunk", "EdgeFactors", "FactoredGraph", "compact"]


def _expand(t: Tensor | int, shape: tuple[int, ...], device) -> Tensor:
    if isinstance(t, Tensor):
        return t.expand(shape)
    return torch.full((1,), int(t), dtype=torch.long, device=device).expand(shape)



class FactoredGraph(ParamGraph):
    """See the module docstring. Built by :meth:`GraphState.finish`; behaves
    as a :class:`ParamGraph` in every respect."""

    # --------------------------------------------------------------- fields
    @classmethod
    def assemble(cls, factors: EdgeFactors, has_edge_pos: bool, **values) -> "FactoredGraph":
        """A graph with ``values`` for every ParamGraph field but the
        per-edge ones (:data:`HEAVY`), which ``factors`` stand for."""
        graph = object.__new__(cls)
        graph.__dict__.update(values, _has_edge_pos=has_edge_pos)
        graph.__dict__[FACTORS_ATTR] = factors
        return graph

    @property
    def edge_factors(self) -> EdgeFactors | None:
        """The factors, or None once the per-edge tensors are written."""
        return self.__dict__.get(FACTORS_ATTR)

    def is_written(self, name: str) -> bool:
        """Whether per-edge tensor ``name`` (one of :data:`HEAVY`) is written."""
        return name in self.__dict__

    @property
    def num_edges(self) -> int:
        f = self.edge_factors
        return f.num_edges if f is not None else int(self.__dict__["edge_index"].shape[1])

    @property
    def device(self) -> torch.device:
        return self.node_type.device
    def _materialize(self, name: str) -> Tensor:
        f = self.edge_factors
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
        if self.edge_factors is None:
            return
        for name in HEAVY:
            if name not in self.__dict__:
                self.__dict__[name] = self._materialize(name)
        del self.__dict__[FACTORS_ATTR]

    def entry_slice(self, name: str, s: int, e: int) -> Tensor:
        """``getattr(self, name)[s:e]`` (``[:, s:e]`` for ``edge_index``),
        writing only the chunks that overlap the range."""
        f = self.edge_factors
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
        return factored_derive.factored_edge_blocks(self)

    def factored_degree(self, end: str) -> Tensor | None:
        """``bincount(edge_index[end])`` from the dense blocks."""
        return factored_derive.factored_degree(self, end)

    def column_static(self, b) -> tuple[Tensor, Tensor] | None | bool:
        """:func:`l2o.graph.factored_derive.column_static`."""
        return factored_derive.column_static(self, b)

    def run_lengths(self, name: str) -> tuple[Tensor, Tensor] | None | bool:
        """:func:`l2o.graph.factored_derive.run_lengths`."""
        return factored_derive.run_lengths(self, name)

    def edge_components(self) -> int:
        n = factored_derive.factored_edge_components(self)
        return super().edge_components() if n is None else n

    # ------------------------------------------------------------ utilities
    def to(self, device) -> ParamGraph:
        f = self.edge_factors
        if f is None:
            return ParamGraph.to(self, device)
        device = torch.device(device)
        same = device == self.device or (device.index is None and device.type == self.device.type)
        values = {}
        for fl in fields(ParamGraph):
            if fl.name in HEAVY:
                if same and fl.name in self.__dict__:
                    values[fl.name] = self.__dict__[fl.name]
                continue
            v = getattr(self, fl.name)
            values[fl.name] = v.to(device) if isinstance(v, Tensor) else v
        return FactoredGraph.assemble(f if same else f.to(device), self.has_edge_pos, **values)


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
