"""How a sharded chunked step splits the entries over ranks
(:class:`l2o.optim.ShardedGMNOptimizer`): one flat range per rank (every rank
holding the whole model, DDP / ZeRO-1 style) or, with FSDP2, the rows each
rank holds of every tensor."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from .plan import ChunkPlan


@dataclass
class Shard:
    """The entries one rank owns in a sharded step: of tensor ``k`` (flat
    order) the flat range ``spans[k] = (lo, hi)`` (empty where ``lo == hi``).
    Their statistics are the rank's ``m`` ``[num_momenta, size]`` and ``v``
    ``[size]``, the spans one after another in tensor order.
    ``local_params``: a step's ``params[k]`` / ``grads[k]`` hold only the
    owned entries (FSDP2's local shards), else the whole tensor.
    ``all_reduce`` sums a tensor over the ranks in place (per-tensor sums,
    node aggregates)."""
    spans: list[tuple[int, int]]
    all_reduce: Callable[[Tensor], None]
    local_params: bool = False
    state_starts: list[int] = field(init=False)
    size: int = field(init=False)

    def __post_init__(self):
        self.state_starts, self.size = [], 0
        for lo, hi in self.spans:
            if hi < lo:
                raise ValueError(f"a shard's span must not be reversed, got [{lo}, {hi})")
            self.state_starts.append(self.size)
            self.size += hi - lo

    @classmethod
    def flat_range(cls, lo: int, hi: int, plan: ChunkPlan, all_reduce: Callable[[Tensor], None]) -> Shard:
        """The entries ``[lo, hi)`` of the flat vector, tensor by tensor (the
        state then holds entry ``i`` at ``i - lo``)."""
        spans = []
        for sl in plan.tensor_slices:
            s = min(max(sl.start, lo), sl.stop)
            spans.append((s, max(s, min(sl.stop, hi))))
        return cls(spans, all_reduce)

    def clip(self, k: int, s: int, e: int) -> tuple[int, int]:
        """The owned part of entries ``[s, e)`` of tensor ``k`` (``e <= s`` when none)."""
        lo, hi = self.spans[k]
        return max(s, lo), min(e, hi)

    def state_index(self, k: int, s: int) -> int:
        """Where owned entry ``s`` of tensor ``k`` sits in the rank's statistics."""
        return self.state_starts[k] + s - self.spans[k][0]


def param_starts(plan: ChunkPlan, shard: Shard | None) -> list[int]:
    """The flat index of each step's ``params[k]``'s first entry: the tensor's
    own, or the owned span's where a shard's parameters are its local rows."""
    if shard is not None and shard.local_params:
        return [lo for lo, _ in shard.spans]
    return [sl.start for sl in plan.tensor_slices]


def owned_runs(plan: ChunkPlan, shard: Shard) -> list:
    """The edge runs inside the shard's spans (a span's bounds must fall on run bounds)."""
    runs = []
    for run in plan.edge_runs:
        lo, hi = shard.spans[run.tensor]
        if run.start >= lo and run.stop <= hi:
            runs.append(run)
        elif run.start < hi and run.stop > lo:
            raise ValueError(f"shard [{lo}, {hi}) cuts the edge run [{run.start}, {run.stop})")
    return runs


def shard_bounds(plan: ChunkPlan, world: int) -> list[int]:
    """``world + 1`` flat positions splitting the entries into ``world`` nearly
    equal ranges whose bounds fall on edge runs' bounds (any position among
    the node-held entries)."""
    cuts = sorted({0, plan.num_edges, *(r.start for r in plan.edge_runs)}
                  | set(range(plan.num_edges, plan.num_params + 1)))
    bounds = [0]
    for r in range(1, world):
        target = plan.num_params * r // world
        bounds.append(max(bounds[-1], cuts[_nearest(cuts, target)]))
    bounds.append(plan.num_params)
    return bounds


def row_shard_spans(tensor_slices: list[slice], shapes: list[tuple[int, ...]],
                    world: int) -> list[list[tuple[int, int]]]:
    """Per rank, per tensor (flat order: ``tensor_slices[k]``, ``shapes[k]``), the flat range of the
    rows along dim 0 that FSDP2's ``fully_shard`` gives that rank: the
    pieces of ``torch.chunk(param, world, dim=0)``, ``ceil(rows / world)``
    rows each, the last ranks' shorter or empty."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for sl, shape in zip(tensor_slices, shapes):
        rows = shape[0]
        per_row = (sl.stop - sl.start) // max(rows, 1)
        chunk = -(-rows // world)
        for r in range(world):
            r0, r1 = min(r * chunk, rows), min((r + 1) * chunk, rows)
            spans[r].append((sl.start + r0 * per_row, sl.start + r1 * per_row))
    return spans


def _nearest(sorted_values: list[int], target: int) -> int:
    i = bisect.bisect_left(sorted_values, target)
    if i == len(sorted_values) or (i > 0 and target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i
