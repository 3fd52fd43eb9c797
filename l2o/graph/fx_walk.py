"""The ``torch.fx`` fallback: walk a symbolic trace, module by module where it fails.

Every fx value carries the node list of its feature dimension
(:mod:`l2o.graph.values`); leaf modules of known kinds are mapped by
:mod:`l2o.graph.layers`, functions and tensor methods by :mod:`l2o.graph.ops`.
Network inputs get INPUT nodes lazily (sized by their first consumer); node
lists reaching the output become OUTPUT nodes (``node_io_index`` = position
in the concatenated output). A submodule fx cannot trace is walked on its own
(its inputs wired to the caller's values), and if even that fails its
children are walked separately; what nobody structured falls back.
"""
from __future__ import annotations

import warnings
from typing import Any

from torch import fx, nn

from . import ops
from .layers import mapper_for
from .param_graph import NodeType
from .state import NOT_FOLLOWED, GraphState, mapper_failure
from .trace import propagate_shapes, trace
from .values import LazyNodes, ParamRef, TupleVal, Val, depth_of


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _map_arg(env: dict, a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda x: env.get(x) if isinstance(x, fx.Node) else x)


def collect_nodes(v: Any, out: list[int]) -> None:
    if isinstance(v, Val):
        if v.nodes is not None:
            out.extend(v.nodes.tolist())
    elif isinstance(v, TupleVal):
        for x in v.items:
            collect_nodes(x, out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            collect_nodes(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            collect_nodes(x, out)


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _placeholder(top: bool, position: int) -> Val:
    return Val(lazy=LazyNodes(NodeType.INPUT if top else NodeType.HIDDEN, group=position))


def walk_module(state: GraphState, module: nn.Module, prefix: str, inputs: list | None,
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
            collect_nodes(out, nodes)
            state.mark_outputs(nodes)
        return out
    graph, opaque, root_failure = trace(module)
    for qn, why in opaque.items():
        state.opaque[join_name(prefix, qn)] = why
    if graph is None:
        state.opaque[prefix or "<root>"] = root_failure
        # The module's own forward is opaque, but its children may not be:
        # structure each on its own (their inputs become unknown neurons).
        for name, child in module.named_children():
            if _has_params(child):
                walk_module(state, child, join_name(prefix, name), None)
        return None
    if example_inputs is not None:
        failure = propagate_shapes(module, graph, example_inputs)
        if failure is not None:
            warnings.warn(
                f"build_graph: shape propagation with the given example_inputs failed for "
                f"{prefix or 'the model'} ({failure}); spatial positions after a flatten are inferred "
                "from layer sizes instead (square maps assumed). Check that example_inputs is a valid "
                "input of the model's forward.", UserWarning, stacklevel=5)

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
            qn = join_name(prefix, str(node.target))
            sub = module.get_submodule(str(node.target))
            args, kwargs = _map_arg(env, node.args), _map_arg(env, node.kwargs)
            fn = mapper_for(sub)
            if fn is not None:
                try:
                    env[node] = fn(state, sub, qn, args, kwargs)
                except Exception as e:  # as the eager capture does: noted, its parameters left to fallback
                    state.notes.append(NOT_FOLLOWED + mapper_failure(qn, sub, e))
                    env[node] = ops.opaque_output(depth_of(*args))
            elif not _has_params(sub):
                # activation, pooling, Flatten, ...: dispatch on the class name
                env[node] = ops.apply(state, node, args, kwargs, name=type(sub).__name__)
            else:
                # unknown module with parameters: look inside it on its own
                out = walk_module(state, sub, qn, list(args))
                env[node] = out if out is not None else ops.opaque_output(depth_of(*args))
        elif node.op in ("call_function", "call_method"):
            env[node] = ops.apply(state, node, _map_arg(env, node.args), _map_arg(env, node.kwargs))
        elif node.op == "output":
            out = _map_arg(env, node.args[0])
            if top:
                nodes: list[int] = []
                collect_nodes(out, nodes)
                state.mark_outputs(nodes)
            return out
    return None
