"""Fixtures shared by the test modules."""
import os

import pytest
import torch

from l2o.fast import native

# Under pytest-xdist (make test runs one worker per core) each worker gets its
# share of the cores: torch's default of one thread per core in every worker
# would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
    """Runs a test with the chunked step's fused C kernels off and on
    (``L2O_NATIVE``, the documented override)."""
    monkeypatch.setenv("L2O_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and native.load(8, 8, 16) is None:
        pytest.skip(native.status())
    return request.param


@pytest.fixture
def use_step_path(monkeypatch):
    """``use_step_path("reference" | "chunked")``: the no-grad step the learned
    optimizers built with ``impl="auto"`` take from then on, whatever the
    model's size: the forward, or the chunked step (fused where the kernels
    are enabled and build). Through ``L2O_IMPL``, the documented override of
    what "auto" means (:func:`l2o.fast.select_impl`)."""
    def use(path: str) -> None:
        if path == "reference":
            monkeypatch.setenv("L2O_IMPL", "forward")
        elif path == "chunked":
            fused = native.enabled() and native.load(8, 8, 16) is not None
            monkeypatch.setenv("L2O_IMPL", "fused" if fused else "chunked")
        else:
            raise ValueError(path)
    return use


@pytest.fixture(params=["reference", "chunked"])
def step_path(request, use_step_path):
    """Runs a test once on each no-grad step path."""
    use_step_path(request.param)
    return request.param


def _to_meta_device(model) -> None:
    """``model`` moved to the "meta" device, its parameters swapped (as
    ``nn.Module.to`` does for a real device change), with all-ones gradients."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for p in model.parameters():
        p.grad = torch.ones_like(p)


@pytest.fixture
def to_meta_device():
    """``to_meta_device(model)``: a device change a test can make without a GPU."""
    return _to_meta_device


@pytest.fixture
def step_on_meta_device():
    """``step_on_meta_device(model, opt)``: moves ``model`` to the "meta"
    device (see ``to_meta_device``) and calls ``opt.step()`` once, so a test
    can check that the optimizer followed its model without a GPU."""
    def step(model, opt) -> None:
        _to_meta_device(model)
        try:
            opt.step()
        except (RuntimeError, NotImplementedError):
            pass     # a value was read from a meta tensor
    return step
