"""``build_graph``: trace a model with torch.fx and map it to a ParamGraph.

Walk: every fx value carries the node list of its feature dimension
(:mod:`values`); leaf modules of known kinds are mapped by
:mod:`layers`, functions and tensor methods by :mod:`ops`. Network inputs
get INPUT nodes lazily (sized by their first consumer); node lists reaching
the output become OUTPUT nodes (``node_io_index`` = position in the
concatenated output). A submodule fx cannot trace is walked on its own (its
inputs wired to the caller's values), and if even that fails its children
are walked separately; parameters nobody structured go on per-tensor
fallback nodes.
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from . import ops
from .errors import UnsupportedModuleError
from .layers import mapper_for
from .param_graph import NodeType, ParamGraph
from .state import GraphState
from .trace import propagate_shapes, trace
from .values import LazyNodes, ParamRef, TupleVal, Val, depth_of

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _map_arg(env: dict, a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda x: env.get(x) if isinstance(x, fx.Node) else x)


def _collect_nodes(v: Any, out: list[int]) -> None:
    if isinstance(v, Val):
        if v.nodes is not None:
            out.extend(v.nodes.tolist())
    elif isinstance(v, TupleVal):
        for x in v.items:
            _collect_nodes(x, out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _collect_nodes(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            _collect_nodes(x, out)


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _placeholder(top: bool, position: int) -> Val:
    return Val(lazy=LazyNodes(NodeType.INPUT if top else NodeType.HIDDEN, group=position))


def _walk(state: GraphState, module: nn.Module, prefix: str, inputs: list | None,
          example_inputs=None, top: bool = False) -> Any:
    fn = mapper_for(module)
    if fn is not None:
        # a known layer kind as the model itself (e.g. a bare TransformerEncoder,
        # which fx cannot trace): map it directly
        n_in = 3 if isinstance(module, nn.MultiheadAttention) else 1
        args = inputs if inputs is not None else [_placeholder(top, i) for i in range(n_in)]
        out = fn(state, module, prefix, args, {})
        if top:
            nodes: list[int] = []
            _collect_nodes(out, nodes)
            state.mark_outputs(nodes)
        return out
    graph, opaque, root_failure = trace(module)
    for qn, why in opaque.items():
        state.opaque[_join(prefix, qn)] = why
    if graph is None:
        state.opaque[prefix or "<root>"] = root_failure
        # The module's own forward is opaque, but its children may not be:
        # structure each on its own (their inputs become unknown neurons).
        for name, child in module.named_children():
            if _has_params(child):
                _walk(state, child, _join(prefix, name), None)
        return None
    if example_inputs is not None:
        failure = propagate_shapes(module, graph, example_inputs)
        if failure is not None:
            warnings.warn(
                f"build_graph: shape propagation with the given example_inputs failed for "
                f"{prefix or 'the model'} ({failure}); spatial positions after a flatten are inferred "
                "from layer sizes instead (square maps assumed). Check that example_inputs is a valid "
                "input of the model's forward.", UserWarning, stacklevel=4)

    env: dict[fx.Node, Any] = {}
    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if inputs is not None:
                env[node] = inputs[placeholders] if placeholders < len(inputs) else None
            else:
                env[node] = _placeholder(top, placeholders)
            placeholders += 1
        elif node.op == "get_attr":
            obj: Any = module
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            idx = state.param_id(obj) if isinstance(obj, nn.Parameter) else None
            env[node] = ParamRef(idx) if idx is not None else None
        elif node.op == "call_module":
            qn = _join(prefix, str(node.target))
            sub = module.get_submodule(str(node.target))
            args, kwargs = _map_arg(env, node.args), _map_arg(env, node.kwargs)
            fn = mapper_for(sub)
            if fn is not None:
                env[node] = fn(state, sub, qn, args, kwargs)
            elif not _has_params(sub):
                # activation, pooling, Flatten, ...: dispatch on the class name
                env[node] = ops.apply(state, node, args, kwargs, name=type(sub).__name__)
            else:
                # unknown module with parameters: look inside it on its own
                out = _walk(state, sub, qn, list(args))
                env[node] = out if out is not None else ops.opaque_output(depth_of(*args))
        elif node.op in ("call_function", "call_method"):
            env[node] = ops.apply(state, node, _map_arg(env, node.args), _map_arg(env, node.kwargs))
        elif node.op == "output":
            out = _map_arg(env, node.args[0])
            if top:
                nodes: list[int] = []
                _collect_nodes(out, nodes)
                state.mark_outputs(nodes)
            return out
    return None


def _owner(model: nn.Module, param_name: str) -> tuple[str, str]:
    mod_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    try:
        cls = type(model.get_submodule(mod_name)).__name__
    except AttributeError:
        cls = "?"
    return mod_name, cls


def _reason_for(state: GraphState, mod_name: str) -> str:
    probe = mod_name
    while True:
        key = probe or "<root>"
        if key in state.opaque:
            where = "" if probe == mod_name else f" (inside untraceable '{key}')"
            return state.opaque[key] + where
        if not probe:
            break
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return "no graph mapping for this module or a parameter used directly"


def _report_unstructured(model: nn.Module, state: GraphState, left: list[int], strict: bool) -> list[str]:
    names = [state.param_names[i] for i in left]
    by_module: "OrderedDict[tuple[str, str], list[str]]" = OrderedDict()
    for n in names:
        by_module.setdefault(_owner(model, n), []).append(n)
    lines = [f"  {mod or '<root>'} ({cls}): {', '.join(ps)} -- {_reason_for(state, mod)}"
             for (mod, cls), ps in by_module.items()]
    # untraceable modules whose parameters were all structured piecewise still
    # lose the wiring between their children: say so
    for qn, why in state.opaque.items():
        mod = "" if qn == "<root>" else qn
        if not any(_owner(model, n)[0] == mod for n in names):
            cls = type(model.get_submodule(mod)).__name__
            lines.append(f"  {qn} ({cls}): children structured separately, wiring between "
                         f"them unknown -- {why}")
    if strict:
        raise UnsupportedModuleError(
            "build_graph(strict=True): these modules have parameters the parameter graph "
            "cannot structure, or cannot be traced:\n" + "\n".join(lines))
    warnings.warn(
        f"build_graph: {len(names)} parameter tensor(s) have no graph structure and are "
        "placed on per-tensor fallback nodes (still optimised, without neuron "
        "structure), or a module could not be traced:\n" + "\n".join(lines), stacklevel=4)
    return names


def _check(graph: ParamGraph) -> None:
    """Every parameter entry in exactly one place."""
    order = sorted(graph.flat_order)
    assert order == list(range(len(graph.param_names))), "a parameter tensor is missing or placed twice"
    assert graph.num_params == sum(s.numel() for s in graph.param_shapes)
    assert graph.num_edges == sum(graph.numels[: graph.num_edge_params])
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
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in items):
        return _UNCACHEABLE
    return tuple((tuple(t.shape), str(t.dtype)) for t in items)


def build_graph(model: nn.Module, example_inputs=None, strict: bool = False, *,
                use_cache: bool = True) -> ParamGraph:
    """The parameter graph of ``model`` (see :mod:`l2o.graph` for the rules).

    ``example_inputs`` (a tensor or tuple) is only used for shape
    propagation, which gives exact spatial positions after a flatten; without
    it they are inferred from layer sizes (square maps assumed). Results are
    cached per model and rebuilt when its parameter names/shapes, ``strict`` or
    the shapes/dtypes of ``example_inputs`` change (not cached when
    ``example_inputs`` holds anything but tensors).
    ``strict=True`` raises :class:`UnsupportedModuleError` instead of placing
    unstructured parameters on fallback nodes.
    """
    signature = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    inputs_key = _inputs_key(example_inputs)
    if inputs_key is _UNCACHEABLE:
        use_cache = False
    signature = (signature, inputs_key)
    if use_cache:
        hit = _CACHE.get(model)
        if hit is not None and hit[0] == signature and hit[1] == strict:
            return hit[2]
    # The build is bound by memory (page faults writing ~40 bytes per edge)
    # and many small ops, not arithmetic; intra-op threads only add wake-up
    # latency and contention (ResNet-18 on a busy 2-core box: 0.7 s with one
    # thread, 1.5-2.5 s with two), so build single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph = _build(model, example_inputs, strict)
    finally:
        torch.set_num_threads(threads)
    if use_cache:
        _CACHE[model] = (signature, strict, graph)
    return graph


def _build(model: nn.Module, example_inputs, strict: bool) -> ParamGraph:
    state = GraphState(model)
    _walk(state, model, "", None, example_inputs, top=True)
    left = state.unclaimed()
    unstructured = _report_unstructured(model, state, left, strict) if left or state.opaque else []
    graph = state.finish(left, unstructured)
    _check(graph)
    return graph
