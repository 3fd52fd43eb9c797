"""Fault injection for tests: force a failure to exercise a recovery path end to end.

Not configuration: nothing here is read from a config file, a flag or a
checkpoint, and nothing is active unless a test turns it on::

    from l2o.meta import faults
    with faults.nan_meta_loss(steps=[1]):
        meta_train.main([...])      # outer step 1's meta-loss is NaN: the update is skipped

The state is per process (a run under torchrun cannot be reached from a test).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

_nan_steps: frozenset[int] = frozenset()


@contextlib.contextmanager
def nan_meta_loss(steps: Iterable[int]) -> Iterator[None]:
    """Within the block, every estimator reports a NaN meta-loss for each run at
    the given outer steps (the step must then be skipped and counted)."""
    global _nan_steps
    saved, _nan_steps = _nan_steps, frozenset(int(s) for s in steps)
    try:
        yield
    finally:
        _nan_steps = saved


def forced_nan(outer_step: int) -> bool:
    """Whether a test asked for a NaN meta-loss at ``outer_step``."""
    return outer_step in _nan_steps
