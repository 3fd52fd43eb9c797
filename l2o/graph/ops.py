"""How fx functions and tensor methods move node lists.

* shape-preserving / elementwise ops (activations, dropout, pooling, mean,
  softmax, transpose, view, scalar mul, ...): pass the first input's nodes
  through -- they never mix neurons of the feature dim;
* elementwise ops between two tensors with feature nodes (``x + f(x)``,
  gating ``a * b``, ``torch.stack``, ``torch.where``): merge the node lists
  pairwise, because a neuron permutation must act identically on both;
* ``torch.cat`` along the feature dim concatenates node lists; along any
  other dim it merges them (the inputs share their feature neurons);
* ``flatten`` / ``view`` / ``reshape`` of a ``[B, C, *S]`` conv map into
  ``[B, C*prod(S)]`` keeps the C channel nodes and records ``S`` so the
  next Linear can give each column its spatial position;
* ``chunk`` / ``split`` / ``tensor_split`` / ``unbind`` along the feature dim split the node
  list (a fused qkv projection becomes q, k, v node sets); ``glu`` merges its
  two halves' units (``a * sigmoid(b)``);
* ``transpose`` / ``mT`` / ``t`` moving the last dim mark the value as
  transposed; ``a @ b`` with ``b`` transposed contracts the two feature
  dims (attention scores ``q @ k^T``): q and k neurons are merged, since they
  must be permuted together, and the result has no feature neurons;
  ``a @ b`` with ``b`` not transposed (``attn @ v``) keeps ``b``'s neurons;
* ``F.linear`` with parameters fetched by ``get_attr`` is mapped like
  ``nn.Linear``.
Anything else passes its first node-carrying input through.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from .layers.linear import linear_core
from .param_graph import NodeType
from .values import LazyNodes, ParamRef, TupleVal, Val, depth_of, resolve

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "truediv", "floordiv", "iadd", "isub", "imul", "itruediv",
    "add_", "sub_", "mul_", "div_", "maximum", "minimum", "max", "min", "where", "stack",
    "hstack", "vstack", "addcmul", "lerp",
}
_NOT_TENSOR = {"size", "dim", "numel", "getattr", "len", "ndimension", "type", "nelement"}
_SPLIT_HOW = ("chunks", "split_size", "split_size_or_sections", "split_sizes", "sections", "indices",
              "tensor_indices_or_sections")
_FLATTEN = {"flatten", "view", "reshape", "Flatten", "unflatten"}


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _shape(n: Any):
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _vals(xs) -> list[Val]:
    out = []
    for x in xs:
        if isinstance(x, Val):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_vals(x))
    return out


def merge_all(state, vals: list[Val]) -> Val:
    """Merge node lists of equal width; lazy ones take the known width."""
    known = [v for v in vals if v.nodes is not None]
    if not known:
        return vals[0]
    base = known[0]
    n = int(base.nodes.shape[0])
    for v in vals:
        if v is base:
            continue
        nodes = resolve(state, v, n)
        if int(nodes.shape[0]) == n:
            state.merge(base.nodes, nodes)
    return base.passthrough(depth=depth_of(*vals))


def flatten(state, node: fx.Node, x: Val, name: str) -> Val:
    src, dst = _shape(node.args[0]) if node.args else None, _shape(node)
    if x.nodes is not None and src and dst and len(src) >= 3 and len(dst) == 2 \
            and src[1] == int(x.nodes.shape[0]) and dst[1] == math.prod(src[1:]):
        return x.passthrough(spatial=tuple(src[2:]), fdim="last")
    if name in ("flatten", "Flatten") and x.fdim == "chan":
        return x.passthrough(fdim="last")
    return x


def _cat(state, node: fx.Node, tensors, dim: int) -> Any:
    vals = _vals(tensors)
    if not vals:
        return None
    shape = _shape(node)
    # which dim the nodes index, from any input that knows (a network input does not)
    fdim = next((v.fdim for v in vals if v.fdim is not None), None)
    if shape is not None:
        d = dim % len(shape)
        feature = d == (1 if fdim == "chan" else len(shape) - 1)
    else:
        # no shapes (fx without example inputs): a conv map's last dim is spatial
        feature = (dim == -1 and fdim != "chan") or (dim == 1 and fdim in ("chan", "last", None)) \
            or (dim >= 2 and fdim == "last")
    if any(v.nodes is None for v in vals):
        if feature and shape is not None:
            # a network input met first here: its width is its own size along dim
            srcs = node.args[0] if node.args else node.kwargs.get("tensors", ())
            widths = [s[d] if (s := _shape(n)) is not None else None for n in srcs]
            if len(widths) == len(tensors) and None not in widths:
                nodes = [resolve(state, v, w) for v, w in zip(tensors, widths) if isinstance(v, Val)]
                return Val(own_nodes=torch.cat(nodes), depth=depth_of(*vals), fdim=fdim)
        # widths unknown: cannot tell a feature concat from a batch concat
        return merge_all(state, vals) if any(v.nodes is not None for v in vals) else vals[0]
    if feature:
        return Val(own_nodes=torch.cat([v.nodes for v in vals]), depth=depth_of(*vals), fdim=fdim)
    return merge_all(state, vals)


def _is_feature_dim(x: Val, dim: int, shape) -> bool:
    if shape is not None:
        d = dim % len(shape)
        return d == (1 if x.fdim == "chan" else len(shape) - 1)
    return (dim == -1 and x.fdim != "chan") or (dim == 1 and x.fdim == "chan")


def _split(state, node: fx.Node, name: str, args, kwargs) -> Any:
    x = args[0] if args else None
    if not isinstance(x, Val) or x.nodes is None:
        return TupleVal([], fill=x)
    if name == "unbind":
        dim, how, name = (args[1] if len(args) > 1 else kwargs.get("dim", 0)), 1, "split"
    else:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        how = args[1] if len(args) > 1 else next(
            (kwargs[k] for k in _SPLIT_HOW if k in kwargs), None)
    if not isinstance(dim, int) or not _is_feature_dim(x, dim, _shape(node.args[0])):
        return TupleVal([], fill=x)  # batch/sequence split: every piece keeps the neurons
    if isinstance(how, (list, tuple)) and all(isinstance(h, int) for h in how):
        how = list(how)
    elif not isinstance(how, int):
        return TupleVal([], fill=x)
    # the node list is cut exactly as the tensor's feature dim is
    pieces = getattr(x.nodes, "split" if name == "split_with_sizes" else name)(how)
    return TupleVal([x.passthrough(own_nodes=p, lazy=None, spatial=None) for p in pieces])


def _transpose(x: Val, name: str, dims, shape) -> Val:
    if name in ("t", "mT"):
        moves_last = True
    else:
        nd = len(shape) if shape is not None else None
        ds = [d for d in dims if isinstance(d, int)]
        moves_last = any(d == -1 or (nd is not None and d == nd - 1) for d in ds)
    if not moves_last or x.fdim == "chan":
        return x
    return x.passthrough(fdim="last" if x.fdim == "moved" else "moved")


def _matmul(state, args) -> Any:
    a, b = (args + (None, None))[:2]
    if isinstance(b, Val) and b.fdim == "moved":
        # a @ b^T contracts the feature dims of a and b (attention scores)
        if isinstance(a, Val) and a.nodes is not None and b.nodes is not None \
                and a.nodes.shape == b.nodes.shape:
            state.merge(a.nodes, b.nodes)
        return None
    if isinstance(b, Val):
        return b.passthrough(depth=depth_of(a, b))
    # x @ (a parameter or constant): the width changes to something unknown
    return opaque_output(depth_of(a)) if isinstance(a, Val) else None


def apply(state, node: fx.Node, args: tuple, kwargs: dict, name: str | None = None) -> Any:
    """Value of a call_function / call_method node (or a parameter-free leaf
    module, whose class name is passed as ``name``)."""
    name = name or _name(node)
    if name in _NOT_TENSOR:
        return None
    if node.target is operator.getitem:
        base, idx = args[0], args[1]
        if isinstance(base, TupleVal):
            ok = isinstance(idx, int) and -len(base.items) <= idx < len(base.items)
            return base.items[idx] if ok else base.fill
        return base if isinstance(base, Val) else None
    if name in ("cat", "concat", "concatenate"):
        tensors = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return _cat(state, node, tensors, dim if isinstance(dim, int) else 0)
    if name == "linear" and isinstance(weight := args[1] if len(args) > 1 else kwargs.get("weight"), ParamRef):
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        b = state.params[b.index] if isinstance(b, ParamRef) else None
        return linear_core(state, state.params[weight.index], b, args[0] if args else kwargs.get("input"))
    if name in ("chunk", "split", "unbind", "split_with_sizes", "tensor_split"):
        return _split(state, node, name, args, kwargs)
    if name == "glu":
        # F.glu: a * sigmoid(b) of the two halves, whose units are one (as in the eager capture)
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        if isinstance(x, Val) and x.nodes is not None and isinstance(dim, int) \
                and _is_feature_dim(x, dim, _shape(node.args[0])) and int(x.nodes.shape[0]) % 2 == 0:
            a, b = x.nodes.chunk(2)
            state.merge(a, b)
            return x.passthrough(own_nodes=a, lazy=None, spatial=None)
    if name == "scaled_dot_product_attention":
        # q and k units pair up in the scores; the result carries v's units
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
        if isinstance(q, Val) and isinstance(k, Val) and q.nodes is not None and k.nodes is not None \
                and q.nodes.shape == k.nodes.shape:
            state.merge(q.nodes, k.nodes)
        return v.passthrough(depth=depth_of(q, k, v)) if isinstance(v, Val) else None
    if name in ("matmul", "bmm", "__matmul__"):
        return _matmul(state, args)
    if name in ("transpose", "swapaxes", "swapdims", "t", "mT") and isinstance(args[0] if args else None, Val):
        return _transpose(args[0], name, args[1:], _shape(node.args[0]))
    vals = _vals(list(args) + list(kwargs.values()))
    if not vals:
        return None
    if name in _ELEMENTWISE and len(vals) >= 2:
        return merge_all(state, vals)
    if name in _FLATTEN:
        return flatten(state, node, vals[0], name)
    return vals[0]


def opaque_output(depth: int) -> Val:
    """Output of a module we could not look into: unknown neurons."""
    return Val(lazy=LazyNodes(NodeType.HIDDEN, group=-1, depth=depth + 1), depth=depth + 1)
