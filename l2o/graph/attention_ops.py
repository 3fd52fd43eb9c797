"""Eager-capture handlers for attention: products of activations and the
terms added to / multiplied into attention scores.

* ``a @ b`` merges the nodes of ``a``'s last dim with those of ``b``'s
  second-to-last dim, per batch/head slice (``q @ k^T`` pairs q unit
  ``(h, j)`` with k unit ``(h, j)``), and the result carries ``b``'s column
  nodes (``attn @ v``); ``scaled_dot_product_attention`` does the same for
  q/k and returns v's nodes (grouped-query heads broadcast).
* The scores ``q @ k^T`` are followed through ``* scale`` / ``+ mask``
  (:func:`follow_scores`): a per-head tracked term added to them joins the
  head's units (:func:`join_heads`: T5's relative-position table), a
  parameter added to them is a table from positions to heads
  (:func:`score_table`: Swin, BEiT), a parameter multiplied in a per-head
  scale (:func:`score_scale`: Swinv2's ``logit_scale``).

Each handler takes the :class:`~l2o.graph.recorder.Recorder` as ``rec``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .op_names import ADD, MUL
from .param_graph import EdgeKind, EntryKind, NodeType
from .shadows import TensorInfo, const_along


def matmul(rec, args, out) -> None:
    a, b = args[0], args[1]
    ia, ib = rec.get(a), rec.get(b)
    if not isinstance(out, Tensor) or a.dim() < 2 or b.dim() < 2:
        return
    sa = ia.sh if ia is not None else None
    sb = ib.sh if ib is not None else None
    depth = max(ia.depth if ia else 0, ib.depth if ib else 0)
    if sa is not None and sb is not None and const_along(sa, -2) and const_along(sb, -1) \
            and not const_along(sa, -1):
        # contraction: a[..., i, k] with b[..., k, j], both carrying units along k
        # (q @ k^T): merge per k, per batch/head slice. Attention weights @ v
        # (units of a not along k) merge nothing.
        ka = sa.select(-2, 0)                         # [..., k]
        kb = sb.select(-1, 0)                         # [..., k]
        try:
            ka, kb = torch.broadcast_tensors(ka, kb)
            rec.merge_pairs(ka, kb)
            if out.dim() >= 3 and ka.dim() >= 2:
                rec.scores[id(out)] = (out, ka)       # [..., H, d]
        except RuntimeError:
            pass
    if sb is not None:
        cols = sb.select(-2, 0).unsqueeze(-2)       # [..., 1, j]
        if bool((sb == cols).all()):
            try:
                rec.set(out, TensorInfo(sh=torch.broadcast_to(cols, out.shape).clone(), depth=depth))
            except RuntimeError:
                pass


def sdpa(rec, args, kwargs, out) -> None:
    q, k, v = (args[j] if len(args) > j else kwargs.get(n) for j, n in enumerate(("query", "key", "value")))
    iq, ik, iv = rec.get(q), rec.get(k), rec.get(v)
    sq = rec.shadow_of(q, iq, -1) if iq is not None else None
    sk = rec.shadow_of(k, ik, -1) if ik is not None else None
    if sq is not None and sk is not None:
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        _pair_qk(rec, sq.select(-2, 0), sk.select(-2, 0), mask)     # [..., H, d] each
    if iv is not None and isinstance(out, Tensor):
        sv = rec.shadow_of(v, iv, -1).select(-2, 0)   # [..., Hkv, dv]
        if sv.dim() >= 2 and out.dim() >= 3 and sv.shape[-2] != out.shape[-3] \
                and out.shape[-3] % sv.shape[-2] == 0:
            sv = sv.repeat_interleave(out.shape[-3] // sv.shape[-2], dim=-2)
        try:
            rec.set(out, TensorInfo(sh=torch.broadcast_to(sv.unsqueeze(-2), out.shape).clone(),
                                    depth=max(iv.depth, iq.depth if iq else 0)))
        except RuntimeError:
            pass


def _pair_qk(rec, a: Tensor, b: Tensor, mask) -> None:
    """q unit (h, j) is k unit (h, j) (grouped-query: of h's kv head); a mask
    that is a score term joins or feeds the heads."""
    if a.dim() >= 2 and b.dim() >= 2 and a.shape[-2] != b.shape[-2] and a.shape[-2] % b.shape[-2] == 0:
        b = b.repeat_interleave(a.shape[-2] // b.shape[-2], dim=-2)   # grouped-query heads
    try:
        a, b = torch.broadcast_tensors(a, b)
        rec.merge_pairs(a, b)
        im = rec.get(mask) if isinstance(mask, Tensor) else None
        if im is not None and im.sh is not None and im.pidx is None:
            join_heads(rec, a, im.sh)
        elif im is not None and im.pidx is not None:
            score_table(rec, a, *im.pidx)
    except RuntimeError:
        pass


def follow_scores(rec, name, ins, out) -> None:
    """Follow attention scores through ``* scale`` / ``+ mask`` (the output
    is still the scores); a per-head tracked term added to them is a score
    bias (:func:`join_heads`), a parameter added to them one too
    (:func:`score_table`), a parameter multiplied in a per-head scale
    (:func:`score_scale`)."""
    units = None
    for t in ins:
        hit = rec.scores.get(id(t))
        if hit is not None and hit[0] is t:
            units = hit[1]
            break
    if units is None or not isinstance(out, Tensor) or (name not in ADD and name not in MUL):
        return
    for t in ins:
        i = rec.get(t)
        if i is None or t is out:
            continue
        if name in ADD and i.sh is not None and i.pidx is None:
            join_heads(rec, units, i.sh)
        elif name in ADD and i.pidx is not None:
            score_table(rec, units, *i.pidx)
        elif name in MUL and i.pidx is not None:
            score_scale(rec, units, *i.pidx)
    rec.scores[id(out)] = (out, units)


def head_dim(rec, units: Tensor, p: int, idx: Tensor) -> tuple[int, int] | None:
    """(H, d) when parameter ``p`` (not yet placed), met elementwise with
    attention scores ``[..., H, Lq, Lk]`` at entries ``idx``, acts on one
    head per entry, the head being its index along dim ``d``; else None."""
    st = rec.state
    if p in st.claimed or idx.dim() < 3 or units.dim() < 2:
        return None
    H = int(units.shape[-2])
    if int(idx.shape[-3]) != H:
        return None
    shape = tuple(st.param_shapes[p])
    numel = math.prod(shape)
    head = torch.arange(H).view(H, 1, 1).expand(idx.shape)
    ok = idx >= 0
    e, h = idx[ok], head[ok]
    if e.numel() == 0:
        return None
    hi = torch.full((numel,), -1, dtype=torch.long).scatter_reduce(0, e, h, "amax")
    lo = torch.full((numel,), H, dtype=torch.long).scatter_reduce(0, e, h, "amin")
    used = hi >= 0
    if bool((hi[used] != lo[used]).any()):
        return None                              # an entry acts on several heads
    for d in range(len(shape)):
        if shape[d] != H:
            continue
        along = torch.arange(H).view([H if i == d else 1 for i in range(len(shape))])
        if torch.equal(along.expand(shape).reshape(-1)[used], hi[used]):
            return H, d
    return None


def score_scale(rec, units: Tensor, p: int, idx: Tensor) -> None:
    """A parameter multiplied into the attention scores, one entry per head
    (Swinv2's ``logit_scale``, ``[H, 1, 1]``): noted now, placed after the
    run (:func:`place_score_scales`), when it is known whether each head's
    q/k units have become one node (a score bias joins them): the entries
    of head h are then node-held (NORM_WEIGHT) by that node. A scale on a
    head whose units stay separate is left alone (on any single unit it
    would break the symmetry of permuting the units within the head)."""
    found = head_dim(rec, units, p, idx)
    if found is not None:
        rec.score_scales.append((units, p, found))


def place_score_scales(rec) -> None:
    st = rec.state
    for units, p, (H, d) in rec.score_scales:
        if p in st.claimed:
            continue
        u = units.reshape(-1, H, int(units.shape[-1])).transpose(0, 1).reshape(H, -1)   # [H, ...]
        roots = []
        for h in range(H):
            rs = {st.find(n) for n in u[h].tolist() if n >= 0}
            if len(rs) != 1:
                break
            roots.append(rs.pop())
        if len(roots) != H or len(set(roots)) != H:
            continue
        shape = tuple(st.param_shapes[p])
        along = torch.arange(H).view([H if i == d else 1 for i in range(len(shape))])
        nodes = torch.tensor(roots)[along.expand(shape).reshape(-1)]
        st.add_entries(st.params[p], nodes, EntryKind.NORM_WEIGHT)


def score_table(rec, units: Tensor, p: int, idx: Tensor) -> None:
    """A parameter (or a view of one) added to the attention scores, each
    entry biasing one head: Swin's relative-position bias table
    ``table[rel_index]`` -> ``[1, H, L, L]``, a learned ``[H, L, L]`` bias.

    The same structure as T5's table (an embedding from distance buckets
    to heads): the parameter's head dim indexes H new head nodes, its
    other dims (flattened) index new INPUT position nodes, entry
    ``table[r, h]`` is the edge ``r -> h`` (EMBEDDING), and head node h is
    joined with head h's q/k units (:func:`join_heads`). ``idx`` gives
    the parameter entry of each score element, ``[..., H, Lq, Lk]``. Left
    alone (fallback) unless every entry it touches biases a single head
    and the heads follow one dim of the parameter."""
    st = rec.state
    found = head_dim(rec, units, p, idx)
    if found is None:
        return        # (or a table several attentions read: its first reader's heads)
    H, d = found
    shape = tuple(st.param_shapes[p])
    A, B = math.prod(shape[:d]), math.prod(shape[d + 1:])
    heads = st.new_nodes(H, NodeType.HIDDEN, 0)
    join_heads(rec, units, heads.view(H, 1, 1))   # fresh head nodes: it cannot refuse them
    pos = st.new_nodes(A * B, NodeType.INPUT, 0)   # one per relative position (table row)
    st.add_edges(st.params[p], (A, H, B), pos.view(A, 1, B), heads.view(1, H, 1), EdgeKind.EMBEDDING)


def join_heads(rec, units: Tensor, bias: Tensor) -> None:
    """A term added to the attention scores whose nodes depend on the head
    only (T5's relative-position table: column h feeds head h) joins the
    units of its head: the head's q/k units and the table's head node
    become one node.

    A score bias belongs to the head as a whole, and nothing else in the
    graph stands for a head: joining it to any single q/k unit would make
    that unit special and break the symmetry of permuting the units within
    the head; joining all of them keeps every symmetry (the head's q/k rows
    become parallel edges into one node) at the price of the units'
    separate identities in this one attention. Only the first attention a
    bias meets is joined (T5 passes layer 0's bias on to every later
    layer: those keep their units)."""
    if bias.dim() < 3 or units.dim() < 2 or not (const_along(bias, -1) and const_along(bias, -2)):
        return
    heads = bias[..., 0, 0]                               # [..., H]
    H = int(units.shape[-2])
    if heads.shape[-1] != H or bool((heads < 0).any()):
        return
    per_head = heads.reshape(-1, H)
    if not bool((per_head == per_head[:1]).all()):
        return
    first = per_head[0].tolist()
    roots = [rec.state.find(n) for n in first]
    joined = {rec.state.find(n) for n in rec.head_nodes}
    if len(set(roots)) != H or joined.intersection(roots) \
            or any(rec.state.node_type_of(r) != NodeType.HIDDEN for r in roots):
        return
    try:
        hn, u = torch.broadcast_tensors(heads.unsqueeze(-1), units)
    except RuntimeError:
        return
    ok = u >= 0
    rec.merge_pairs(hn[ok], u[ok])
    rec.head_nodes.extend(first)
