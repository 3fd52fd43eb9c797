"""Eager-capture handlers for parameters consumed by ops: each use becomes
edges or node-held entries.

* ``linear`` / ``addmm`` / ``mm`` / ``x @ W(.T)``: edges (HF ``Conv1D`` is
  ``addmm(b, x, W)`` with ``W[in, out]``; ``x @ W.T`` a Linear written out);
* ``W @ x`` (``W(.T) @ x`` / ``mm(W, x)``): the same linear map applied to
  ``x``'s second-to-last dim (``x`` channels-first, ``[..., in, L]``), when
  ``x``'s units lie along that dim (Mamba's ``dt_proj.weight @ dt``);
* ``conv1d`` / ``conv2d`` / ``conv3d`` / ``conv_transpose*`` with a parameter
  kernel, or an in-order reshape of one (``conv.weight.squeeze(1)`` put
  back with ``unsqueeze(1)``: a depthwise causal conv written out):
  kernel entries are edges, as for a conv module;
* ``embedding``: token -> unit edges;
* ``layer_norm`` / ``rms_norm`` / ``group_norm`` / ``batch_norm`` /
  ``instance_norm``, ``prelu``: NORM_WEIGHT / NORM_BIAS entries;
* a parameter (or a view of one: ``cls.expand(...)``, ``pos[:, :T]``)
  multiplied into or added to a tracked tensor, or concatenated with one:
  entries on the nodes it meets (NORM_WEIGHT for a product -- RMSNorm-style
  scales, recognised by what they compute -- BIAS for a sum or concat:
  learned positions, cls tokens).

Each handler takes the :class:`~l2o.graph.recorder.Recorder` as ``rec``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layers.conv import conv_core
from .layers.embedding import embedding_core
from .layers.hf import conv1d_core
from .layers.linear import linear_core
from .op_names import ADD, MUL
from .param_graph import EntryKind
from .shadows import TensorInfo, along, const_along

NORMS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")
CONVS = {"conv1d": (1, False), "conv2d": (2, False), "conv3d": (3, False),
         "conv_transpose1d": (1, True), "conv_transpose2d": (2, True), "conv_transpose3d": (3, True)}


def record_param_use(rec, name, func, args, kwargs, out, tracked) -> bool:
    """Map an op that consumes a parameter; False if it is not one we know
    (then the op is handled as an op on activations)."""
    def arg(k, key=None):
        return args[k] if len(args) > k else kwargs.get(key)

    if name == "linear" and rec.is_param(arg(1, "weight")):
        b = arg(2, "bias")
        rec.assign(out, linear_core(rec.state, arg(1, "weight"), b if rec.is_param(b) else None,
                                    rec.val(arg(0, "input"))))
        return True
    # torch.mm reaches the mode under the name "spmm" (torch.overrides.resolve_name)
    if name in ("addmm", "mm", "spmm", "matmul", "__matmul__"):
        x, w, b = (arg(1, "mat1"), arg(2, "mat2"), arg(0, "input")) if name == "addmm" else \
            (arg(0, "input"), arg(1, "other" if "matmul" in name else "mat2"), None)
        if name != "addmm" and not rec.is_activation(x) and rec.is_activation(w):
            return _left_product(rec, x, w, out)
        return _matrix_product(rec, x, w, b, out)
    if name in CONVS:
        return _conv(rec, name, arg, out)
    if name == "embedding":
        # F.embedding passes (input, weight) on positionally; the builtin
        # torch.embedding takes (weight, indices)
        w, ids = (args[1], args[0]) if len(args) > 1 and rec.is_param(args[1]) else \
            (arg(0, "weight"), arg(1, "indices"))
        if rec.is_param(w):
            rec.assign(out, embedding_core(rec.state, w, rec.val(ids)))
            return True
    if name == "prelu" and rec.is_param(arg(1, "weight")) and isinstance(arg(0, "input"), Tensor):
        return _prelu(rec, arg(0, "input"), arg(1, "weight"), out, rec.depth(tracked))
    if name in NORMS:
        return _norm(rec, name, arg, out, rec.depth(tracked))
    if isinstance(out, Tensor) and (name in MUL or name in ADD):
        return _elementwise_param(rec, name, out, tracked)
    return False


def _matrix_product(rec, x, w, b, out) -> bool:
    """``x @ W.T (+ b)`` (a Linear written out: Falcon's FalconLinear, ...) or
    ``x @ W (+ b)`` (HF ``Conv1D``) with a tracked activation ``x``."""
    if not rec.is_activation(x):
        return False
    bias = b if rec.is_param(b) and b.dim() == 1 else None
    wt = transposed_param(rec, w)
    if wt is not None:
        rec.assign(out, linear_core(rec.state, wt, bias, rec.val(x)))
        return True
    if rec.is_param(w) and w.dim() == 2:
        rec.assign(out, conv1d_core(rec.state, w, bias, rec.val(x)))
        return True
    return False


def _left_product(rec, w, x, out) -> bool:
    """``W @ x`` (``W[out, in]``) or ``W.T @ x`` (``W[in, out]``): a linear map
    on ``x``'s dim -2 (its only dim if 1-D), whose units must lie along that
    dim (a parameter mixing the positions of a token-major ``x`` is left to
    :func:`l2o.graph.attention_ops.matmul`)."""
    if not isinstance(out, Tensor) or out.dim() == 0:
        return False
    xi = rec.get(x)
    fd = -2 if x.dim() >= 2 else -1
    if x.dim() >= 2 and xi.sh is not None and not const_along(xi.sh, -1):
        return False
    wt = transposed_param(rec, w)
    p = in_order_param(rec, w) if wt is None else None
    if wt is not None:
        val = conv1d_core(rec.state, wt, None, rec.val(x, fd))
    elif p is not None and w.dim() == 2:
        val = linear_core(rec.state, p, None, rec.val(x, fd))
    else:
        return False
    nodes = val.nodes
    if nodes is None or int(out.shape[fd]) != int(nodes.shape[0]):
        return True
    rec.set(out, TensorInfo(sh=along(nodes, out.shape, fd), depth=val.depth))
    return True


def _conv(rec, name: str, arg, out) -> bool:
    """``F.conv*d(x, W, b, ..., groups)`` with ``W`` a parameter or an in-order
    reshape of one: edges as for the conv module (:func:`l2o.graph.layers.conv.conv_core`)."""
    nsp, transposed = CONVS[name]
    x, w, b = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
    p = in_order_param(rec, w)
    if p is None or not rec.is_activation(x) or w.dim() != nsp + 2 or x.dim() not in (nsp + 1, nsp + 2):
        return False
    groups = arg(6, "groups")
    groups = 1 if groups is None else int(groups)
    bias = in_order_param(rec, b)
    bias = bias if bias is not None and bias.dim() == 1 else None
    fd = x.dim() - nsp - 1
    val = conv_core(rec.state, p, tuple(w.shape), bias, rec.val(x, fd), groups, transposed)
    nodes = val.nodes
    if isinstance(out, Tensor) and out.dim() > fd and int(out.shape[fd]) == int(nodes.shape[0]):
        rec.set(out, TensorInfo(sh=along(nodes, out.shape, fd), depth=val.depth))
    return True


def in_order_param(rec, t):
    """The parameter ``P`` if ``t`` is ``P`` or holds all of ``P``'s entries in
    their own order (a reshape, ``squeeze`` / ``unsqueeze``, a no-op cast), else None."""
    if rec.is_param(t):
        return t
    i = rec.get(t) if isinstance(t, Tensor) else None
    if i is None or i.pidx is None:
        return None
    p, idx = i.pidx
    n = rec.state.param_shapes[p].numel()
    if idx.numel() != n or not torch.equal(idx.reshape(-1), torch.arange(n)):
        return None
    return rec.state.params[p]


def transposed_param(rec, t):
    """The 2-D parameter ``W`` if ``t`` is exactly ``W.T``, else None."""
    i = rec.get(t) if isinstance(t, Tensor) and not rec.is_param(t) else None
    if i is None or i.pidx is None or i.pidx[1].dim() != 2:
        return None
    p, idx = i.pidx
    shape = rec.state.param_shapes[p]
    if len(shape) != 2 or tuple(idx.shape) != (shape[1], shape[0]):
        return None
    if not torch.equal(idx, torch.arange(shape.numel()).view(tuple(shape)).t()):
        return None
    return rec.state.params[p]


def _prelu(rec, x, w, out, depth: int) -> bool:
    xi = rec.get(x)
    if w.numel() <= 1 or xi is None or xi.pidx is not None or x.dim() < 2:
        return False
    sh = rec.shadow_of(x, xi, 1)
    cols = rec.columns(sh, 1)
    if cols.numel() == w.numel():
        rec.state.add_entries(w, cols, EntryKind.NORM_WEIGHT)
    rec.set(out, TensorInfo(sh=sh, depth=depth, spatial=xi.spatial))
    return True


def _norm(rec, name: str, arg, out, depth: int) -> bool:
    """A normalisation's scale / shift: entries on the normalised units."""
    x = arg(0, "input")
    if not isinstance(x, Tensor) or rec.get(x) is None:
        return False
    xi = rec.get(x)
    if name in ("layer_norm", "rms_norm"):
        shape = tuple(arg(1, "normalized_shape"))
        sh = rec.shadow_of(x, xi, x.dim() - len(shape))
        ws = [(arg(2, "weight"), EntryKind.NORM_WEIGHT)]
        if name == "layer_norm":
            ws.append((arg(3, "bias"), EntryKind.NORM_BIAS))
        ref = sh.reshape(-1, *shape).max(0).values
    else:
        sh = rec.shadow_of(x, xi, 1)
        # F.batch_norm / F.instance_norm put the running stats first (weight at 3);
        # the torch.* builtins put weight and bias first (at 1; either may be None)
        k = 2 if name == "group_norm" else 1 if rec.is_param(arg(1)) or rec.is_param(arg(2)) else 3
        ws = [(arg(k, "weight"), EntryKind.NORM_WEIGHT), (arg(k + 1, "bias"), EntryKind.NORM_BIAS)]
        ref = rec.columns(sh, 1)
    for w, kind in ws:
        if rec.is_param(w):
            wi = rec.get(w)
            place_param(rec, wi.pidx[0], wi.pidx[1], ref.reshape(w.shape) if ref.numel() == w.numel() else ref,
                        kind)
    if isinstance(out, Tensor) and out.shape == x.shape:
        rec.set(out, TensorInfo(sh=sh, depth=depth, spatial=xi.spatial))
    return True


def _elementwise_param(rec, name: str, out, tracked) -> bool:
    """A parameter (view) met elementwise with tracked activations: the
    activations' units are merged as usual, the parameter's entries are held
    by the units each entry meets."""
    others = [(t, i) for t, i in tracked if i.pidx is None]
    ps = [(t, i) for t, i in tracked if i.pidx is not None]
    if not others or len(ps) != 1:
        return False
    rec.elementwise(out, others)
    oi = rec.get(out)
    if oi is not None and oi.sh is not None:
        kind = EntryKind.NORM_WEIGHT if name in MUL else EntryKind.BIAS
        p, idx = ps[0][1].pidx
        place_param(rec, p, idx, oi.sh, kind)
    return True


def still_param_entries(rec, name: str, ins, out, param) -> bool:
    """An op on one parameter (view) alone whose result is still "the entries
    of w" element by element: ``1.0 + w``, ``w.float() ** 2`` (Gemma's
    ``1 + weight``), or ``w`` plus a constant broadcast to a larger shape
    (Swin's relative-position bias + its shifted-window mask). Noted as such;
    False if neither."""
    t, info = param
    if tuple(out.shape) == tuple(t.shape):
        rec.set(out, TensorInfo(pidx=info.pidx))
        return True
    if (name in ADD or name in MUL) and not any(id(x) in rec.scores for x in ins):
        p, idx = info.pidx
        try:
            rec.set(out, TensorInfo(pidx=(p, torch.broadcast_to(idx, out.shape))))
            return True
        except RuntimeError:
            pass
    return False


def place_listed_params(rec, name, args, kwargs, res) -> None:
    """cat/stack of a parameter view with tracked tensors (cls tokens): the
    parameter's entries sit on the nodes its elements land next to (``res``:
    the op applied to the shadows)."""
    items = args[0] if args else kwargs.get("tensors", ())
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    for t in items:
        i = rec.get(t)
        if i is None or i.pidx is None:
            continue
        # the element positions of t inside out: cat the index tensor with -1 fillers
        marks = [torch.full(x.shape, -1, dtype=torch.long) if x is not t else i.pidx[1] for x in items]
        try:
            pos = torch.stack(marks, dim) if name == "stack" else torch.cat(marks, dim)
        except Exception:
            continue
        place_param(rec, i.pidx[0], pos, res, EntryKind.BIAS)


def place_param(rec, p: int, pidx: Tensor, sh: Tensor, kind) -> bool:
    """Entries of parameter ``p`` on the nodes at the same elements of ``sh``
    (``pidx``: the parameter entry of each element)."""
    state = rec.state
    numel = state.param_shapes[p].numel()
    try:
        pidx, sh = torch.broadcast_tensors(pidx, sh)
    except RuntimeError:
        return False
    ok = (pidx >= 0) & (sh >= 0)
    nodes = torch.full((numel,), -1, dtype=torch.long)
    nodes[pidx[ok]] = sh[ok]
    if bool((nodes < 0).any()):
        nodes = _fill_untouched(nodes.view(state.param_shapes[p])).reshape(-1)
        if bool((nodes < 0).any()):
            return False
    return state.add_entries(state.params[p], nodes, kind)


def _fill_untouched(full: Tensor) -> Tensor:
    """Entries the run did not touch (positions past the example's length):
    along a dim where the touched ones all sit on the same unit, so do they."""
    for d in range(full.dim()):
        valid = full >= 0
        hi = full.amax(d, keepdim=True)
        lo = torch.where(valid, full, torch.full_like(full, 1 << 62)).amin(d, keepdim=True)
        same = (hi == lo) & (hi >= 0)
        full = torch.where(valid | ~same.expand_as(full), full, hi.expand_as(full))
    return full

