"""Fixtures shared by the test modules."""
import pytest

from l2o import fast


@pytest.fixture
def use_step_path(monkeypatch):
    """``use_step_path("reference" | "chunked")``: the no-grad step the learned
    optimizers take from then on, whatever the model's size."""
    def use(path: str) -> None:
        chunked = {"reference": False, "chunked": True}[path]
        monkeypatch.setattr(fast, "FAST_MIN_PARAMS", 0 if chunked else 10**12)
        monkeypatch.setattr(fast, "FAST_MIN_PARAMS_PER_TENSOR", 0)
    return use


@pytest.fixture(params=["reference", "chunked"])
def step_path(request, use_step_path):
    """Runs a test once on each no-grad step path."""
    use_step_path(request.param)
    return request.param
