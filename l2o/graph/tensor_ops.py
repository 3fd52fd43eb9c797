"""Eager-capture handlers for ops on activations: shape ops, elementwise
ops, ``glu`` and reductions (see :mod:`l2o.graph.capture`).
Each handler takes the :class:`~l2o.graph.recorder.Recorder` as ``rec``.
"""
from __future__ import annotations

import math

import torch

from . import param_uses
from .op_names import LIST_ARG
from .shadows import (TensorInfo, apply_to_shadows, keep_matching_dims, output_pairs, stretched_dims,
                      tensors_in, unit_dim, without_collapsing)


def view(rec, name, func, args, kwargs, out, tracked) -> None:
    """A shape op: applied to the shadows (or, on views of one parameter, to
    the parameter's entry indices)."""
    depth = rec.depth(tracked)
    # views of a parameter: follow which entry each element is
    # (cat/stack of views of one parameter too: BEiT re-assembles its table)
    if all(i.pidx is not None for _, i in tracked) and (
            name not in LIST_ARG or len({i.pidx[0] for _, i in tracked}) == 1):
        p = tracked[0][1].pidx[0]
        res = apply_to_shadows(func, name, args, kwargs, {id(t): i.pidx[1] for t, i in tracked}, fill=-1,
                               spread=False)
        for o, r in output_pairs(out, res):
            rec.set(o, TensorInfo(pidx=(p, r)))
        return
    lazy = [i for _, i in tracked if i.lazy is not None and i.sh is None]
    if lazy and len(tracked) == 1:
        # an input not yet consumed: integer token ids keep their identity,
        # other inputs too when the op only relabels dims
        for o in tensors_in(out):
            rec.set(o, TensorInfo(lazy=lazy[0].lazy, depth=depth))
        return
    # an input not yet consumed takes its units on the dim the tracked pieces'
    # units vary along (a conv map's channels), not always the last one
    known = [i.sh for _, i in tracked if i.pidx is None and i.sh is not None]
    cat_dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) if name in ("cat", "concat", "concatenate") \
        else None
    fd = unit_dim(known, cat_dim if isinstance(cat_dim, int) else None) if lazy and known else -1
    subs = {id(t): rec.shadow_of(t, i, fd if -t.dim() <= fd else -1) for t, i in tracked if i.pidx is None}
    res = apply_to_shadows(func, name, args, kwargs, subs, fill=-1)
    spatial = None
    if name in ("flatten", "view", "reshape") and isinstance(out, torch.Tensor):
        src = tracked[0][0]
        if src.dim() >= 3 and out.dim() == 2 and out.shape[1] == math.prod(src.shape[1:]) \
                and src.shape[0] == out.shape[0]:
            spatial = tuple(src.shape[2:])
    if name in LIST_ARG and isinstance(out, torch.Tensor):
        param_uses.place_listed_params(rec, name, args, kwargs, res)
    for o, r in output_pairs(out, res):
        if isinstance(r, torch.Tensor) and r.dtype == torch.long and tuple(r.shape) == tuple(o.shape):
            rec.set(o, TensorInfo(sh=r, depth=depth, spatial=spatial))


def elementwise(rec, out, tracked) -> None:
    """Tensors met elementwise: their units are one, position by position
    (residual adds, gated products), except where that would make one
    operand's different units one node (:func:`~l2o.graph.shadows.without_collapsing`)."""
    outs = tensors_in(out)
    if len(outs) != 1:
        return
    o = outs[0]
    depth = rec.depth(tracked)
    shs, stretched = [], []
    for t, i in tracked:
        if i.pidx is not None:
            continue
        if i.sh is None and i.lazy is not None:
            if len(tracked) == 1 or all(j.sh is None for _, j in tracked):
                rec.set(o, TensorInfo(lazy=i.lazy, depth=depth))
                return
            continue
        try:
            shs.append(torch.broadcast_to(i.sh, o.shape))
            stretched.append(stretched_dims(i.sh.shape, o.shape))
        except RuntimeError:
            kept = keep_matching_dims(i.sh, o.shape)   # pooling, interpolation, ...
            if kept is not None:
                shs.append(kept)
                stretched.append(())
    # lazy inputs meeting a known tensor: nodes on the dim its units vary along
    # (the channels of a conv map in ``x + conv(x)``; else the last dim), merged
    fd = unit_dim(shs) if shs else -1
    for t, i in tracked:
        if i.sh is None and i.lazy is not None and shs:
            try:
                sh = rec.shadow_of(t, i, fd if -t.dim() <= fd else -1)
                shs.append(torch.broadcast_to(sh, o.shape))
                stretched.append(stretched_dims(sh.shape, o.shape))
            except RuntimeError:
                pass
    if not shs:
        return
    shs = without_collapsing(shs, stretched)
    base = shs[0]
    for other in shs[1:]:
        rec.merge_pairs(base, other)
        base = torch.where(base >= 0, base, other)
    rec.set(o, TensorInfo(sh=base, depth=depth, spatial=next(
        (i.spatial for _, i in tracked if i.spatial), None)))


def glu(rec, args, kwargs, out) -> None:
    """``F.glu``: the two halves' units are one."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    i = rec.get(x)
    if i is None or not isinstance(out, torch.Tensor):
        return
    sh = rec.shadow_of(x, i, dim)
    a, b = sh.chunk(2, dim)
    rec.merge_pairs(a, b)
    rec.set(out, TensorInfo(sh=a.clone(), depth=i.depth))


def reduce(rec, args, kwargs, out) -> None:
    """A reduction keeps the nodes of the dims it does not reduce."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        # torch.max(a, b) / torch.min(a, b): elementwise, not a reduction
        elementwise(rec, out, [(t, i) for t, i in ((t, rec.get(t)) for t in args[:2]) if i is not None])
        return
    x = args[0] if args else kwargs.get("input")
    i = rec.get(x)
    o = out[0] if isinstance(out, tuple) else out
    if i is None or i.sh is None or not isinstance(o, torch.Tensor) or not o.is_floating_point():
        if i is not None and i.lazy is not None and isinstance(o, torch.Tensor) and o.shape == x.shape:
            rec.set(o, TensorInfo(lazy=i.lazy, depth=i.depth))
        return
    dim = args[1] if len(args) > 1 and not isinstance(args[1], (float, str)) else kwargs.get("dim")
    if dim is None:
        return
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    dims = [d % max(i.sh.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)]
    hi, lo = i.sh.amax(dims, keepdim=keep), i.sh.amin(dims, keepdim=keep)
    r = torch.where(hi == lo, hi, torch.full_like(hi, -1))
    if not bool((hi == lo).all()):
        summed = _sum_of_unit_slices(rec, i.sh, dims)
        if summed is not None:
            r = summed.reshape(hi.shape)     # the kept dims, with the reduced ones as 1 under keepdim
    if tuple(r.shape) == tuple(o.shape):
        rec.set(o, TensorInfo(sh=r, depth=i.depth))


def _sum_of_unit_slices(rec, sh: torch.Tensor, dims: list[int]):
    """A reduction over stacked copies of one layout (``torch.stack([a(x), b(x)]).mean(0)``,
    an ensemble): each slice along the reduced dims holds distinct units, position by
    position in one-to-one correspondence, so the units summed together are one (as
    for ``a(x) + b(x)``). The merged slice's shadow, or None where the slices are not
    such (a sum over the feature dim itself: each slice one unit)."""
    kept = [d for d in range(sh.dim()) if d not in dims]
    slices = sh.permute(*dims, *kept).reshape(-1, *[sh.shape[d] for d in kept])
    first = slices[0]
    n = first.unique().numel()
    if slices.shape[0] < 2 or not bool((slices >= 0).all()) or n < 2:
        return None
    for other in slices[1:]:
        pairs = torch.unique(first.flatten() * (rec.state.num_raw_nodes + 1) + other.flatten())
        if not (pairs.numel() == n == other.unique().numel()):
            return None
    rec.merge_pairs(first.expand_as(slices), slices)
    return first.clone()
