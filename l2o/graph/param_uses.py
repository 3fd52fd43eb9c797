"""Eager-capture handlers for parameters consumed by ops: each use becomes
edges or node-held entries.

* ``linear`` / ``addmm`` / ``mm`` / ``x @ W(.T)``: edges (HF ``Conv1D`` is
  ``addmm(b, x, W)`` with ``W[in, out]``; ``x @ W.T`` a Linear written out);
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

from .layers.embedding import embedding_core
from .layers.hf import conv1d_core
from .layers.linear import linear_core
from .op_names import ADD, MUL
from .param_graph import EntryKind
from .shadows import TensorInfo

NORMS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")


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
        return _matrix_product(rec, x, w, b, out)
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

