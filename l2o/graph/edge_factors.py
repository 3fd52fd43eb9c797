"""The factored form of a weight's edges: small tensors that broadcast to
every edge of the weight (:class:`EdgeChunk`), one per edge-held tensor
(:class:`EdgeFactors`). Kept by :class:`l2o.graph.factored.FactoredGraph`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# the per-edge (per-entry) tensors a FactoredGraph writes only when read
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
