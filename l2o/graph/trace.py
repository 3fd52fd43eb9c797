"""torch.fx tracing that never gives up on the whole model.

Known layer kinds stay leaves (their mappers read the module directly). When
symbolic tracing fails inside a submodule (data-dependent control flow,
``len(x)``, ...), that submodule is made a leaf and tracing is retried, so
the rest of the model keeps its structure. Only a failure in the root's own
forward returns no graph.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from .eval_mode import eval_mode
from .layers import LEAF_TYPES, mapper_for


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaves: set[str]):
        super().__init__()
        self.extra_leaves = extra_leaves
        self._stack: list[str] = []
        self.fail_path: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.extra_leaves or isinstance(m, LEAF_TYPES) or mapper_for(m) is not None
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args, kwargs):
        self._stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # innermost module whose forward raised: the one to make opaque
            if self.fail_path is None:
                self.fail_path = list(self._stack)
            raise
        finally:
            self._stack.pop()


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"fx could not trace it ({type(e).__name__}: {first[:160]})"


def trace(module: nn.Module) -> tuple[fx.Graph | None, dict[str, str], str | None]:
    """Returns (graph or None, {submodule made opaque: reason}, root failure reason)."""
    opaque: dict[str, str] = {}
    for _ in range(sum(1 for _ in module.modules()) + 1):
        tracer = _Tracer(set(opaque))
        try:
            return tracer.trace(module), opaque, None
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
            path = tracer.fail_path
            if not path or path[-1] in opaque:
                return None, opaque, _reason(e)
            opaque[path[-1]] = _reason(e)
    return None, opaque, "fx tracing did not converge"


def propagate_shapes(module: nn.Module, graph: fx.Graph, example_inputs) -> str | None:
    """Annotate ``graph`` nodes with ``tensor_meta`` by running the example.

    Runs in eval mode and without grad so BatchNorm statistics and autograd
    state of the user's model are untouched; every submodule's own
    train/eval flag is restored afterwards (a frozen BatchNorm kept in eval
    mode inside a training model stays in eval mode). Returns None on
    success, else why it failed (the builder then infers shapes from layer
    sizes instead).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        gm = fx.GraphModule(module, graph)
        with eval_mode(module):
            ShapeProp(gm).propagate(*example_inputs)
        return None
    except Exception as e:  # any failure of the user's forward on the example
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:300]}"
