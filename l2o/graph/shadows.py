"""Shadows: for each recorded tensor, the graph node of every element.

A shadow is a long tensor of the recorded tensor's shape whose entry is the
node of the feature that element belongs to (``-1``: none). Shape ops run on
the shadow itself (:func:`apply_to_shadows`), so head splits, rotary
half-rotations, ``repeat_kv`` or a cls-token ``cat`` move the nodes exactly
as they move the data. :class:`TensorInfo` is what the recorder keeps per
tensor; the rest are shadow helpers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .op_names import CASTS, LIST_ARG
from .values import LazyNodes


@dataclass
class TensorInfo:
    """What the recorder knows of one tensor."""
    sh: Tensor | None = None          # shadow: node per element, -1 none
    lazy: LazyNodes | None = None     # an input whose feature dim is not known yet
    depth: int = 0
    spatial: tuple[int, ...] | None = None   # C x S map flattened into the last dim
    pidx: tuple[int, Tensor] | None = None   # a view of parameter p: flat entry per element


def tensors_in(x) -> list[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts (op arguments, model outputs)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in tensors_in(item)]
    return []


def along(nodes: Tensor, shape, fd: int) -> Tensor:
    """Shadow of ``shape`` whose dim ``fd`` carries ``nodes``."""
    nd = len(shape)
    if nd == 0:
        return nodes.view(())
    fd = fd % nd
    view = [1] * nd
    view[fd] = int(nodes.shape[0])
    return nodes.view(view).expand(tuple(shape))


def const_along(sh: Tensor, dim: int) -> bool:
    return sh.shape[dim] <= 1 or bool((sh == sh.narrow(dim, 0, 1)).all())


def unit_dim(shs: list[Tensor], dim: int | None = None) -> int:
    """The dim (counted from the end) on which an input not yet consumed carries
    its units when it meets the tracked shadows ``shs`` (of the op's rank) in a
    cat along ``dim`` or elementwise: the dim their units vary along -- 1 for a
    channels-first map, so the input's channels are its units there too, as a
    conv reading it made them (``cat([conv(x), x], 1)``, ``x + conv(x)``); the
    cat dim first when they vary along it (a feature concat). The last dim when
    the shadows do not tell (none, or units varying along several dims)."""
    for s in shs:
        nd = s.dim()
        if nd == 0:
            continue
        vary = [d for d in range(nd) if s.stride(d) != 0 and not const_along(s, d)]
        if dim is not None and dim % nd in vary:
            return dim % nd - nd
        if len(vary) == 1:
            return vary[0] - nd
    return -1


def keep_matching_dims(sh: Tensor, shape) -> Tensor | None:
    """Shadow for an op that resizes some dims (pooling, interpolation) when
    the nodes do not vary along the resized dims."""
    if sh.dim() != len(shape):
        return None
    changed = [d for d in range(sh.dim()) if sh.shape[d] != shape[d]]
    if not changed:
        return None
    base = sh
    for d in changed:
        first = base.narrow(d, 0, 1)
        if not bool((base == first).all()):
            return None
        base = first
    return base.expand(tuple(shape))


def stretched_dims(shape, out_shape) -> tuple[int, ...]:
    """Dims of ``out_shape`` a tensor of ``shape`` is broadcast along (size 1 or absent -> > 1)."""
    pad = len(out_shape) - len(shape)
    full = (1,) * pad + tuple(shape)
    return tuple(d for d in range(len(out_shape)) if full[d] == 1 and out_shape[d] > 1)


def without_collapsing(shs: list[Tensor], stretched: list[tuple[int, ...]]) -> list[Tensor]:
    """The shadows an elementwise op may merge pairwise: not one broadcast
    along a dim where another operand's units vary -- a per-token scalar gate
    ``sigmoid(g(x))[..., 1] * y[..., H]`` (Qwen2-MoE's shared expert), a
    dueling head's ``V[..., 1] + A[..., n]``: merging would make all of
    ``y``'s units one node. (If every operand is such, only the first is kept.)"""
    dims = set().union(*stretched)
    if not dims:
        return shs
    varies = [{d for d in dims if s.stride(d) != 0 and not const_along(s, d)} for s in shs]
    keep = [s for k, s in enumerate(shs)
            if not any(set(stretched[k]) & varies[j] for j in range(len(shs)) if j != k)]
    return keep or shs[:1]


def output_pairs(out, res) -> list[tuple[Tensor, Tensor]]:
    """(output tensor, its shadow) pairs of an op's output and the op applied to shadows."""
    if isinstance(out, Tensor):
        return [(out, res)] if isinstance(res, Tensor) else []
    if isinstance(out, (tuple, list)) and isinstance(res, (tuple, list)):
        return [(o, r) for o, r in zip(out, res) if isinstance(o, Tensor) and isinstance(r, Tensor)]
    return []


def apply_to_shadows(func, name, args, kwargs, subs: dict, fill: int, spread: bool = True):
    """``func`` applied with tracked tensors replaced by their shadows (``subs``:
    ``id(tensor)`` -> shadow) and untracked tensors in a cat/stack list by
    ``fill``-filled long tensors (``spread``: or by the units of the tracked
    pieces, see :func:`_list_filler`)."""
    def sub(x):
        if isinstance(x, Tensor):
            s = subs.get(id(x))
            if s is not None:
                return s
        return x

    if name in LIST_ARG:
        items = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        known = [subs[id(t)] for t in items if id(t) in subs]
        spread = spread and name in ("cat", "concat", "concatenate") and isinstance(dim, int) and bool(known)
        new = [subs[id(t)] if id(t) in subs else _list_filler(t, known, dim, fill, spread) for t in items]
        args = (new,) + tuple(args[1:]) if args else args
        if not args:
            kwargs = {**kwargs, "tensors": new}
        return func(*args, **kwargs)
    if not args and "input" in kwargs:   # torch.flatten(input=h, ...)
        args, kwargs = (kwargs["input"],), {k: v for k, v in kwargs.items() if k != "input"}
    first = args[0] if args else None
    rest = list(args[1:])
    if name in ("view", "view_as") and not kwargs.get("dtype") and not (rest and isinstance(rest[0], torch.dtype)):
        # Shadows are broadcast (stride 0), so one may not be viewable where the real
        # tensor is; reshape puts every element where the view does.
        func = Tensor.reshape if name == "view" else Tensor.reshape_as
    if name in CASTS:
        return sub(first)
    if name == "pad":
        kwargs = {**kwargs, "value": fill} if kwargs.get("mode", rest[1] if len(rest) > 1 else "constant") \
            == "constant" else kwargs
        if len(rest) > 2:
            rest = rest[:2]
    return func(sub(first), *rest, **kwargs)   # other tensor args (expand_as's target) stay real


def _list_filler(t: Tensor, known: list[Tensor], dim: int, fill: int, spread: bool) -> Tensor:
    """Stand-in shadow of an untracked piece of a cat: a piece (a cls token)
    concatenated along a dim the units do not depend on takes the units of
    the tracked pieces (``spread``); otherwise ``fill``."""
    if spread:
        k = known[0]
        d = dim % k.dim() if k.dim() else 0
        if k.dim() == t.dim() and const_along(k, d) and all(
                k.shape[i] == t.shape[i] for i in range(k.dim()) if i != d):
            return k.narrow(d, 0, 1).expand(tuple(t.shape))
    return torch.full(t.shape, fill, dtype=torch.long)
