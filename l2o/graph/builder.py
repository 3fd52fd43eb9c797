"""``build_graph``: capture a model and map it to a ParamGraph.

Capture, in order: (1) an eager run on example inputs recorded at the torch
function level (:mod:`capture`; follows any Python control flow) -- inputs
are ``example_inputs``, or made up for Hugging Face models from their config;
(2) ``torch.fx`` symbolic trace; (3) module-by-module mapping of what fx
cannot trace. Without ``example_inputs`` for a plain module, fx goes first and
the eager run (on inputs guessed from the first layer) is tried when fx leaves
parameters unstructured; the better result is kept.

fx walk: every fx value carries the node list of its feature dimension
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

import itertools
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from . import ops
from .errors import UnsupportedModuleError
from . import capture as _capture
from .layers import feature_dim_for, mapper_for
from .param_graph import NodeType, ParamGraph
from .state import GraphState
from .trace import propagate_shapes, trace
from .values import LazyNodes, ParamRef, TupleVal, Val, depth_of

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget built graphs (after registering a mapper)."""
    _CACHE.clear()


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
    key = (tuple(names), tuple(state.opaque))
    seen = _WARNED.setdefault(model, set()) if _weakrefable(model) else set()
    if key in seen:
        return names
    seen.add(key)
    total = sum(s.numel() for s in state.param_shapes) or 1
    frac = 100.0 * sum(state.param_shapes[i].numel() for i in left) / total
    def _short(ps, mod):
        ps = [p[len(mod) + 1:] if mod else p for p in ps]
        return ", ".join(ps[:3]) + (", ..." if len(ps) > 3 else "")
    mods = [f"{mod or '<root>'} ({cls}: {_short(ps, mod)})" for (mod, cls), ps in by_module.items()]
    untraced = list(state.opaque)
    def _few(xs):
        return ", ".join(xs[:6]) + (f", and {len(xs) - 6} more" if len(xs) > 6 else "")
    if names:
        msg = (f"build_graph: {frac:.1f}% of the parameters ({len(names)} tensor(s)) have no graph "
               f"structure (capture: {state.capture}); they are still optimised, on per-tensor nodes.")
        if mods:
            msg += f" Modules: {_few(mods)}."
    else:
        msg = f"build_graph: every parameter is structured (capture: {state.capture}), but"
    if untraced:
        msg += (f"{' The' if names else ' the'} wiring between the children of {_few(untraced)} is unknown "
                "(could not be traced).")
    msg += (" To fix: pass example_inputs=... so the forward can be run and recorded, or describe the "
            "module with l2o.graph.register_module(cls, mapper); build_graph(..., strict=True) lists "
            "every reason.")
    warnings.warn(msg, stacklevel=4)
    return names


def _weakrefable(m) -> bool:
    try:
        weakref.ref(m)
        return True
    except TypeError:
        return False


def _check(graph: ParamGraph) -> None:
    """Every parameter entry in exactly one place."""
    order = sorted(graph.flat_order)
    assert order == list(range(len(graph.param_names))), "a parameter tensor is missing or placed twice"
    assert graph.num_params == sum(s.numel() for s in graph.param_shapes)
    assert graph.num_edges == sum(graph.numels[: graph.num_edge_params])
    factors = getattr(graph, "_factors", None)
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
    _walk(state, model, "", None, example_inputs if _is_tensors(example_inputs) else None, top=True)
    state.capture = "fx" if "<root>" not in state.opaque else "per-module (fx failed on the root)"
    return state


def _eager(model, inputs) -> GraphState:
    state = GraphState(model)
    state.notes = _capture.run(state, model, inputs, mapper_for, feature_dim_for)
    if isinstance(inputs, dict) or inputs is not None:
        state.notes = [f"op not followed: {n}" for n in state.notes]
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
        inputs = None
    if state is None and capture != "fx" and inputs is not None:
        try:
            state = _eager(model, inputs)
        except Exception as e:  # the user's forward raised on the inputs
            failure = f"eager capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    if state is None:
        state = _fx(model, example_inputs)
        if capture == "fx":
            inputs = None
        if failure:
            state.notes.append(failure)
    elif made_up and capture == "auto" and (state.unclaimed() or state.errors_noted()):
        # a run on guessed inputs may miss a branch: keep fx's result if it structures more
        other = _fx(model, None)
        if _unclaimed_numel(other) < _unclaimed_numel(state):
            other.notes.append(f"eager run on guessed inputs {_describe(inputs)} structured less; fx used")
            state = other
    left = state.unclaimed()
    # zero-size tensors have nothing to structure: fallback bookkeeping only, no warning
    report = [i for i in left if state.param_shapes[i].numel() > 0]
    unstructured = _report_unstructured(model, state, report, strict) if report or state.opaque else []
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


def example_inputs_for(model: nn.Module):
    """Inputs to record a forward on when none are given: for a Hugging Face
    model, from its config (token ids, pixel values, decoder ids); otherwise
    from the first layer (Embedding -> token ids, Linear -> features, Conv ->
    a 32-wide map, RNN -> a sequence; drawn from a fixed seed). None if nothing fits."""
    gen = torch.Generator().manual_seed(0)
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if cfg is not None and name is not None:
        kw = {}
        if name == "input_ids":
            vocab = getattr(cfg, "vocab_size", None) or 100
            kw["input_ids"] = torch.randint(0, int(vocab), (1, 8), generator=gen)
        elif name == "pixel_values":
            size = getattr(cfg, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            kw["pixel_values"] = torch.randn(1, getattr(cfg, "num_channels", 3), size, size, generator=gen)
        else:
            return None
        if getattr(cfg, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = torch.zeros(1, 4, dtype=torch.long)
        return kw
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (2, 8), generator=gen),)
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features, generator=gen),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 32, 32, generator=gen),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32, generator=gen),)
        if isinstance(m, nn.RNNBase):
            shape = (2, 8, m.input_size) if m.batch_first else (8, 2, m.input_size)
            return (torch.randn(*shape, generator=gen),)
        if m is not model and next(m.parameters(recurse=False), None) is not None:
            return None
    return None
