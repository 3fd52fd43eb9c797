"""``build_graph``: capture a model and map it to a ParamGraph.

Capture, in order: (1) an eager run on example inputs recorded at the torch
function level (:mod:`l2o.graph.capture`; follows any Python control flow) --
inputs are ``example_inputs``, or made up (:mod:`l2o.graph.example_inputs`:
for Hugging Face models from their config); (2) ``torch.fx`` symbolic trace
and (3) module-by-module mapping of what fx cannot trace
(:mod:`l2o.graph.fx_walk`). Without ``example_inputs`` for a plain module,
the eager run on guessed inputs is kept unless fx structures more. What
stays unstructured is reported once (:mod:`l2o.graph.report`) and placed on
per-tensor fallback nodes; built graphs are cached per model.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from .capture import record
from .example_inputs import example_inputs_for
from .fx_walk import walk_module
from .layers import feature_dim_for, keep_whole, mapper_for
from .param_graph import ParamGraph
from .report import report_unstructured
from .state import NOT_FOLLOWED, GraphState

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget built graphs (after registering a mapper)."""
    _CACHE.clear()


def _check(graph: ParamGraph) -> None:
    """Every parameter entry in exactly one place."""
    order = sorted(graph.flat_order)
    assert order == list(range(len(graph.param_names))), "a parameter tensor is missing or placed twice"
    assert graph.num_params == sum(s.numel() for s in graph.param_shapes)
    assert graph.num_edges == sum(graph.numels[: graph.num_edge_params])
    factors = getattr(graph, "edge_factors", None)
    if factors is not None:
        # the edge chunks tile the edge range in flat order (tensor_id, written
        # on demand from the same numels, then holds by construction)
        bounds = [0, *itertools.accumulate(graph.numels[: graph.num_edge_params])]
        assert [(c.start, c.stop) for c in factors.chunks] == list(zip(bounds[:-1], bounds[1:]))
        return
    assert graph.tensor_id.shape[0] == graph.num_params
    # tensor_id is piecewise constant: check each piece's first and last entry
    # (a full bincount over 10M entries would cost more than the rest of the check)
    numels = torch.tensor(graph.numels, dtype=torch.long)
    ends = torch.cumsum(numels, 0)
    nonempty = numels > 0
    ids = torch.arange(graph.num_tensors)[nonempty]
    assert torch.equal(graph.tensor_id[(ends - numels)[nonempty]], ids)
    assert torch.equal(graph.tensor_id[ends[nonempty] - 1], ids)
    # node ranges are checked per chunk while assembling (state.finish)


_UNCACHEABLE = object()


def _inputs_key(example_inputs):
    """Cache key part for ``example_inputs``: shapes and dtypes of its tensors (None if not given)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        if not all(isinstance(t, torch.Tensor) for t in example_inputs.values()):
            return _UNCACHEABLE
        return tuple((k, tuple(t.shape), str(t.dtype)) for k, t in example_inputs.items())
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in items):
        return _UNCACHEABLE
    return tuple((tuple(t.shape), str(t.dtype)) for t in items)


def build_graph(model: nn.Module, example_inputs=None, strict: bool = False, *,
                use_cache: bool = True, capture: str = "auto") -> ParamGraph:
    """The parameter graph of ``model`` (see :mod:`l2o.graph` for the rules).

    ``example_inputs`` (a tensor or tuple) is only used for shape
    propagation, which gives exact spatial positions after a flatten; without
    it they are inferred from layer sizes (square maps assumed). Results are
    cached per model and rebuilt when its parameter names/shapes, ``strict`` or
    the shapes/dtypes of ``example_inputs`` change (not cached when
    ``example_inputs`` holds anything but tensors).
    ``strict=True`` raises :class:`UnsupportedModuleError` instead of placing
    unstructured parameters on fallback nodes.
    ``capture``: ``"auto"`` (see the module docstring), ``"eager"`` (record
    a run on ``example_inputs``, or on made-up inputs; raises if the forward
    fails) or ``"fx"`` (symbolic trace, then module by module).
    ``example_inputs`` may also be a dict of keyword arguments.
    """
    if capture not in ("auto", "eager", "fx"):
        raise ValueError(f"capture must be 'auto', 'eager' or 'fx', not {capture!r}")
    signature = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    inputs_key = _inputs_key(example_inputs)
    if inputs_key is _UNCACHEABLE:
        use_cache = False
    signature = (signature, (inputs_key, capture))
    if use_cache:
        hit = _CACHE.get(model)
        if hit is not None and hit[1] == strict and (
                hit[0] == signature or (inputs_key is None and capture == "auto"
                                       and hit[0][1][0] is not None and hit[0][0] == signature[0])):
            # (built with example_inputs and asked again without, e.g. by the
            # optimizer: the graph from the recorded run is the better one)
            return hit[2]
    # The build is bound by memory (page faults writing ~40 bytes per edge)
    # and many small ops, not arithmetic; intra-op threads only add wake-up
    # latency and contention (ResNet-18 on a busy 2-core box: 0.7 s with one
    # thread, 1.5-2.5 s with two), so build single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # parametrized weights: one computed tensor per build (see state._alias_parametrized)
        with parametrize.cached():
            graph = _build(model, example_inputs, strict, capture)
    finally:
        torch.set_num_threads(threads)
    if use_cache:
        _CACHE[model] = (signature, strict, graph)
    return graph


def _unclaimed_numel(state: GraphState) -> int:
    return sum(state.param_shapes[i].numel() for i in state.unclaimed())


def _fx(model, example_inputs) -> GraphState:
    state = GraphState(model)
    walk_module(state, model, "", None, example_inputs if _is_tensors(example_inputs) else None, top=True)
    state.capture = "fx" if "<root>" not in state.opaque else "per-module (fx failed on the root)"
    return state


def _eager(model, inputs) -> GraphState:
    state = GraphState(model)
    state.notes = [NOT_FOLLOWED + n
                   for n in record(state, model, inputs, mapper_for, feature_dim_for, keep_whole)]
    state.capture = "eager"
    state.opaque = {}
    return state


def _is_tensors(x) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, (tuple, list)) and
                                          all(isinstance(t, torch.Tensor) for t in x))


def _build(model: nn.Module, example_inputs, strict: bool, capture: str = "auto") -> ParamGraph:
    inputs, made_up = example_inputs, False
    if inputs is None and capture != "fx":
        inputs, made_up = example_inputs_for(model), True
    state, failure = None, None
    if capture == "eager":
        if inputs is None:
            raise ValueError("build_graph(capture='eager') needs example_inputs for this model")
        state = _eager(model, inputs)
    if state is None and capture != "fx" and inputs is not None:
        try:
            state = _eager(model, inputs)
        except Exception as e:  # the user's forward raised on the inputs
            failure = f"eager capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    if state is None:
        state = _fx(model, example_inputs)
        if failure:
            state.notes.append(failure)
    elif made_up and capture == "auto" and (state.unclaimed() or state.errors_noted()):
        # a run on guessed inputs may miss a branch: keep fx's result if it structures more
        other = _fx(model, None)
        if _unclaimed_numel(other) < _unclaimed_numel(state):
            # name the capture kept: fx failing on the root leaves per-module mapping, not fx
            other.notes.append(f"eager run on guessed inputs {_describe(inputs)} structured less; "
                               f"{other.capture} used")
            state = other
    left = state.unclaimed()
    # zero-size and one-entry tensors (nn.PReLU()'s shared slope, a temperature) have no
    # structure to find: their per-tensor node is all there is, no warning
    report = [i for i in left if state.param_shapes[i].numel() > 1]
    unstructured = report_unstructured(model, state, report, strict) if report or state.opaque else []
    graph = state.finish(left, unstructured)
    graph.capture = state.capture
    graph.notes = list(state.notes) + ([f"tied/shared weights (entries on their first use's edges, "
                                        f"later uses' units merged with it): {', '.join(state.reused)}"]
                                       if state.reused else [])
    _check(graph)
    return graph


def _describe(inputs) -> str:
    items = inputs.values() if isinstance(inputs, dict) else (
        [inputs] if isinstance(inputs, torch.Tensor) else inputs)
    return ", ".join(f"{tuple(t.shape)}" for t in items if isinstance(t, torch.Tensor))
