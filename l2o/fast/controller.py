"""The step-size controller (``LearnedOptimizer.adapt``) of the chunked steps.

Its per-tensor sums over the statistics before the step (``<g, m>``,
``<g, g>``, ``<m, m>``, ``sum(v)``) come from the statistics pass
(:func:`.features.tensor_sums`), which reads those entries anyway; this
module turns them into ``state["log_lr"]`` and scales each tensor's updates.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..lopt import LearnedOptimizer
from .features import DirectApply, Sink, direct_target


def controlled_sink(lopt: LearnedOptimizer, before: dict[str, Tensor], state: dict[str, Tensor], sums: Tensor,
                    sink: Sink, write: list[bool] | None = None) -> Sink:
    """Sets ``state["log_lr"]`` from the controller's ``sums`` ``[4, T]``
    (:meth:`LearnedOptimizer.advance_log_lr`, which reads the clock and
    ``log_lr`` of ``before``, the state as the step began; every rank of a
    sharded step holds the same all-reduced sums, so the same multipliers)
    and returns ``sink`` with each tensor's update scaled by its multiplier.
    Tensors ``write`` leaves alone keep their multiplier."""
    log_lr = lopt.advance_log_lr(before, sums)
    if write is not None:
        keep = ~torch.tensor(write, device=log_lr.device)
        log_lr[keep] = before["log_lr"][keep] if "log_lr" in before else 0.0
    state["log_lr"] = log_lr
    return ScaledSink(sink, log_lr.exp().tolist())


class ScaledSink:
    """``sink`` with each tensor ``k``'s updates multiplied by ``multiplier[k]``."""

    def __init__(self, sink: Sink, multiplier: list[float]):
        self.sink, self.multiplier = sink, multiplier

    def __call__(self, k: int, s: int, e: int, u: Tensor) -> None:
        self.sink(k, s, e, u.mul_(self.multiplier[k]))

    def direct(self, k: int, s: int, e: int) -> DirectApply | None:
        return direct_target(self.sink, k, s, e, self.multiplier[k])
