"""The per-step meta-loss term (l2o.meta.inner.meta_term) and its config key."""
from __future__ import annotations

import math

import pytest
import torch

from l2o.meta import config as C
from l2o.meta.inner import meta_term


def _grad(objective: str, loss: float, init: float, floor: float = 0.0) -> float:
    x = torch.tensor(loss, dtype=torch.float64, requires_grad=True)
    meta_term(x, init, objective, floor).backward()
    return float(x.grad)


def test_objectives_compute_their_formulas():
    x = torch.tensor(0.25, dtype=torch.float64)
    assert float(meta_term(x, 2.0, "norm")) == pytest.approx(0.125)
    assert float(meta_term(x, 2.0, "raw")) == pytest.approx(0.25)
    assert float(meta_term(x, 2.0, "log")) == pytest.approx(math.log(0.25))
    assert float(meta_term(x, 2.0, "log", 1e-2)) == pytest.approx(math.log(0.25 + 0.02))


def test_log_floor_stops_rewarding_progress_on_a_solved_task():
    # without the floor, d log L / dL = 1/L grows without bound as L -> 0: a solved
    # task dominates the meta-gradient; with it the slope is capped near 1/(f L0)
    init = 2.0
    assert _grad("log", 1e-6, init) == pytest.approx(1e6)
    assert _grad("log", 1e-6, init, 1e-3) == pytest.approx(1 / (1e-6 + 2e-3))
    # far above the floor it is the plain log objective (10% progress weighs alike)
    assert _grad("log", 1.0, init, 1e-3) == pytest.approx(_grad("log", 1.0, init), rel=3e-3)


def test_meta_log_floor_is_checked_and_defaults_to_plain_log():
    assert C.MetaConfig().meta_log_floor == 0.0
    assert C.MetaConfig(meta_log_floor=1e-3).meta_log_floor == 1e-3
    with pytest.raises(C.ConfigError, match="meta_log_floor"):
        C.MetaConfig(meta_log_floor=-1.0)
