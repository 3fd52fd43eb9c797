"""What a meta-gradient estimator is: the protocol TBPTT, ES and PES implement.

Like learned_optimization's gradient estimators, an estimator is an object
configured once (the config, the task pool, the device, the size of the
meta-batch over all processes) and asked once per outer step::

    estimate = estimator.estimate(lopt, runs, outer_step)

It unrolls each inner run of this process ``cfg.unroll`` steps, adds its
estimate of ``d mean_i(meta_loss_i) / d weights`` to the ``.grad`` of the
metanetwork's trainable weights (each run divided by ``global_batch``, so a
sum over processes is the mean), and returns an :class:`Estimate`: the runs'
meta-losses and how each run continues (:func:`l2o.meta.inner.advance`). The
runs themselves are not modified. Implementations: :mod:`.tbptt`,
:mod:`.es`, :mod:`.pes`; the registry by config name is
:data:`l2o.meta.outer.ESTIMATORS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from . import faults
from .config import MetaConfig
from .inner import InnerRun, UnrollResult
from .tasks_pool import TaskPool


@dataclass
class Estimate:
    loss_sum: float                 # sum over this process's runs of each run's meta-loss
    results: list[UnrollResult]     # one per run, in order: where each run goes next
    nonfinite: bool                 # a run's meta-loss was not finite: the caller skips the update


@runtime_checkable
class GradientEstimator(Protocol):
    name: ClassVar[str]             # the config's ``estimator`` value

    def estimate(self, lopt: nn.Module, runs: Sequence[InnerRun], outer_step: int) -> Estimate:
        """Add this process's share of the meta-gradient to ``lopt``'s ``.grad``."""
        ...


@dataclass
class EstimatorSetup:
    """What every estimator is built from (the fields of its constructor)."""
    cfg: MetaConfig
    pool: TaskPool
    device: torch.device | str
    global_batch: int               # the meta-batch over all processes (divides every run's term)


def meta_loss_value(result: UnrollResult, outer_step: int) -> float:
    """A run's meta-loss as a float (NaN where a test forces it: :mod:`.faults`)."""
    if faults.forced_nan(outer_step):
        return float("nan")
    return float(result.meta_loss.detach())
