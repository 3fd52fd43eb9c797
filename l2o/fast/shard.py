"""How a sharded chunked step splits the flat entries over ranks
(:class:`l2o.optim_sharded.ShardedGMNOptimizer`)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .plan import ChunkPlan


@dataclass
class Shard:
    """The flat entries ``[lo, hi)`` one rank owns in a sharded step: their
    statistics are the rank's ``m`` ``[num_momenta, hi - lo]`` and ``v``;
    ``all_reduce`` sums a tensor over the ranks in place (per-tensor sums,
    node aggregates)."""
    lo: int
    hi: int
    all_reduce: Callable[[Tensor], None]

    def clip(self, s: int, e: int) -> tuple[int, int]:
        return max(s, self.lo), min(e, self.hi)


def owned_runs(plan: ChunkPlan, shard: Shard) -> list:
    """The edge runs inside ``[shard.lo, shard.hi)`` (a shard's edge bounds must fall on run bounds)."""
    runs = []
    for run in plan.edge_runs:
        if run.start >= shard.lo and run.stop <= shard.hi:
            runs.append(run)
        elif run.start < shard.hi and run.stop > shard.lo:
            raise ValueError(f"shard [{shard.lo}, {shard.hi}) cuts the edge run [{run.start}, {run.stop})")
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


def _nearest(sorted_values: list[int], target: int) -> int:
    i = bisect.bisect_left(sorted_values, target)
    if i == len(sorted_values) or (i > 0 and target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i
