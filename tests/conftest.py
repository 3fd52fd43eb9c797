"""Fixtures shared by the test modules."""
import pytest

from l2o import fast
from l2o.fast import native


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """The fused kernels are built into a fresh directory once per test
    session (a stale user cache must not decide whether they build)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("L2O_CACHE", str(tmp_path_factory.mktemp("l2o_cache")))
    native.forget()
    yield
    mp.undo()
    native.forget()


@pytest.fixture(params=["torch", "native"])
def kernels(request, monkeypatch):
    """Runs a test with the chunked step's fused C kernels off and on."""
    monkeypatch.setenv("L2O_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and native.load(8, 8, 16) is None:
        pytest.skip(native.status())
    return request.param


@pytest.fixture
def use_step_path(monkeypatch):
    """``use_step_path("reference" | "chunked")``: the no-grad step the learned
    optimizers take from then on, whatever the model's size."""
    def use(path: str) -> None:
        chunked = {"reference": False, "chunked": True}[path]
        for name in ("FAST_MIN_PARAMS", "FUSED_MIN_PARAMS"):
            monkeypatch.setattr(fast, name, 0 if chunked else 10**12)
        for name in ("FAST_MIN_PARAMS_PER_TENSOR", "FUSED_MIN_PARAMS_PER_TENSOR"):
            monkeypatch.setattr(fast, name, 0)
    return use


@pytest.fixture(params=["reference", "chunked"])
def step_path(request, use_step_path):
    """Runs a test once on each no-grad step path."""
    use_step_path(request.param)
    return request.param
