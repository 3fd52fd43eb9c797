"""l2o: graph-metanetwork learned optimizers for PyTorch.

The public names load their module on first use (PEP 562), so ``import l2o``
is cheap and ``import l2o.graph`` loads the graph builder alone, without the
metanetworks, the optimizers or the fast path.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GMNOptimizer": "optim", "MLPOptimizer": "optim",
    "GMNLOpt": "gmn", "MLPLOpt": "mlp_lopt",
    "ParamGraph": "graph", "build_graph": "graph",
    "load_lopt": "checkpoint", "make_lopt": "checkpoint", "save_lopt": "checkpoint",
}
__all__ = [
    "GMNOptimizer", "MLPOptimizer", "GMNLOpt", "MLPLOpt", "ParamGraph", "build_graph",
    "load_lopt", "make_lopt", "save_lopt",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("__"):
        # A submodule used as an attribute (``l2o.optim.X`` after ``import l2o``).
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
