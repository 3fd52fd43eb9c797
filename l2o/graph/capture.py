"""Eager capture: run the model once on example inputs and record what it does.

The primary tracer. Every torch function / tensor method the model's Python
code calls is seen through a :class:`~torch.overrides.TorchFunctionMode`
(the same Python-level run non-strict ``torch.export`` makes), so Python
control flow, ``len(x)``, iteration over tensors and Hugging Face's input
checks all just run. Modules with a mapper (:mod:`l2o.graph.layers`, and
anything given to :func:`l2o.graph.register_module`) are kept whole with
forward hooks: the ops inside them are not recorded, their mapper is called
with the values of their inputs.

**Shadows.** Every recorded tensor has a *shadow*: a long tensor of the same
shape whose entry is the graph node of the feature that element belongs to
(``-1``: none). Shape ops (view, reshape, transpose, permute, indexing,
cat, split, expand, repeat, pad, ...) are applied to the shadow itself, so
the node layout follows any head split / merge, rotary half-rotation,
grouped-query ``repeat_kv`` or cls-token concatenation exactly. Then:

* elementwise ops between tracked tensors merge the nodes that meet
  (residual adds, gated units ``act(g(x)) * u(x)``, rotary ``q*cos +
  rot(q)*sin``), position by position;
* ``a @ b`` merges the nodes of ``a``'s last dim with those of ``b``'s
  second-to-last dim, per batch/head slice (``q @ k^T`` pairs q unit
  ``(h, j)`` with k unit ``(h, j)``), and the result carries ``b``'s column
  nodes (``attn @ v``); ``scaled_dot_product_attention`` does the same for
  q/k and returns v's nodes (grouped-query heads broadcast);
* a parameter consumed by an op becomes edges or node-held entries:
  ``linear``/``addmm``/``mm`` (HF ``Conv1D`` is ``addmm(b, x, W)`` with
  ``W[in, out]``), ``embedding``, ``layer_norm``/``rms_norm``/``group_norm``/
  ``batch_norm``, and a parameter (or a view of one: ``cls.expand(...)``,
  ``pos[:, :T]``) multiplied into or added to / concatenated with a tracked
  tensor gives node-held entries on the nodes it meets (NORM_WEIGHT for a
  product -- RMSNorm-style scales, recognised by what they compute -- BIAS
  for a sum or concat: learned positions, cls tokens);
* reductions keep the nodes of the dims they do not reduce.

A weight used a second time (tied embeddings, a module called twice) keeps
its entries on the edges of its first use; the later use's endpoints are
merged with the first use's (the LM head's logit ``t`` *is* token node
``t``), which is exactly the constraint tying puts on permutations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils import _pytree as pytree

from .param_graph import EdgeKind, EntryKind, NodeType
from .values import LazyNodes, TupleVal, Val

_VIEW_LIKE = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as",
    "transpose", "swapaxes", "swapdims", "permute", "contiguous", "__getitem__", "narrow",
    "select", "repeat", "repeat_interleave", "movedim", "moveaxis", "t", "mT", "T", "mH", "H",
    "roll", "flip", "tile", "index_select", "view_as", "reshape_as", "unfold", "clone", "detach",
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "split", "chunk", "unbind", "split_with_sizes", "tensor_split",
    "pad", "broadcast_to", "diagonal", "take_along_dim", "gather", "atleast_2d", "atleast_3d",
    "ravel", "unsqueeze_", "squeeze_", "cpu", "cuda",
}
_LIST_ARG = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "norm", "std", "var", "logsumexp",
           "prod", "nansum", "nanmean", "median", "vector_norm"}
_MATMUL = {"matmul", "bmm", "__matmul__", "__rmatmul__"}
_MUL = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_",
        "__itruediv__", "multiply", "addcmul"}
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_",
        "__isub__", "subtract"}
_SKIP = {"size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "__format__",
         "__repr__", "is_floating_point", "is_complex", "__index__", "__int__", "__float__",
         "data_ptr", "element_size", "stride", "storage_offset", "is_contiguous", "__get__"}

_NAMES: dict[Any, str] = {}


def _name(func) -> str:
    n = _NAMES.get(func)
    if n is None:
        try:
            full = resolve_name(func) or getattr(func, "__name__", str(func))
        except Exception:
            full = getattr(func, "__name__", str(func))
        parts = [p for p in str(full).split(".") if p not in ("__get__", "__set__")]
        n = parts[-1] if parts else str(full)
        _NAMES[func] = n
    return n


@dataclass
class _Info:
    sh: Tensor | None = None          # shadow: node per element, -1 none
    lazy: LazyNodes | None = None     # an input whose feature dim is not known yet
    depth: int = 0
    spatial: tuple[int, ...] | None = None   # C x S map flattened into the last dim
    pidx: tuple[int, Tensor] | None = None   # a view of parameter p: flat entry per element


class CaptureError(RuntimeError):
    pass


class _Mode(TorchFunctionMode):
    def __init__(self, rec: "Recorder"):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.rec
        if rec.leaf_depth == 0 and not rec.busy:
            rec.busy = True
            try:
                rec.on_op(func, args, kwargs, out)
            except Exception as e:  # never break the user's forward: note it
                rec.errors.append(f"{_name(func)}: {type(e).__name__}: {e}")
            finally:
                rec.busy = False
        return out


def _tensors(x) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]


class Recorder:
    def __init__(self, state, model: nn.Module, mapper_for, feature_dim_for):
        self.state = state
        self.model = model
        self.mapper_for = mapper_for
        self.feature_dim_for = feature_dim_for
        self.info: dict[int, tuple[Tensor, _Info]] = {}
        self.leaf_depth = 0
        self.busy = False
        self.errors: list[str] = []
        self.handles: list = []
        # attention scores (q @ k^T, untracked: they have no units) -> the q/k
        # units of each head, [..., H, d], so a per-head score bias can find its head
        self.scores: dict[int, tuple[Tensor, Tensor]] = {}
        self.head_nodes: list[int] = []     # score-bias head nodes already joined to a head
        self.score_scales: list = []        # per-head score scales, placed after the run

    # ----------------------------------------------------------- values
    def get(self, t) -> _Info | None:
        if not isinstance(t, Tensor):
            return None
        if isinstance(t, nn.Parameter):
            idx = self.state.param_id(t)
            if idx is not None:
                return _Info(pidx=(idx, torch.arange(t.numel()).view(t.shape)))
        hit = self.info.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        return None

    def set(self, t: Tensor, info: _Info) -> None:
        if isinstance(t, Tensor) and not isinstance(t, nn.Parameter):
            self.info[id(t)] = (t, info)

    def shadow_of(self, t: Tensor, info: _Info | None, fd: int) -> Tensor:
        """Shadow of ``t``; a lazy input gets its nodes on dim ``fd`` now."""
        if info is not None and info.sh is not None:
            return info.sh
        n = int(t.shape[fd]) if t.dim() else 1
        if info is not None and info.lazy is not None:
            lz = info.lazy
            if lz.nodes is None or int(lz.nodes.shape[0]) != n:
                if lz.nodes is None:
                    lz.nodes = self.state.new_nodes(n, lz.kind, lz.depth, input_group=lz.group)
                    nodes = lz.nodes
                else:
                    nodes = self.state.new_nodes(n, NodeType.HIDDEN, lz.depth)
            else:
                nodes = lz.nodes
        else:
            nodes = self.state.new_nodes(n, NodeType.HIDDEN, info.depth if info else 0)
        sh = _along(nodes, t.shape, fd)
        if info is not None:
            info.sh, info.lazy = sh, None
        return sh

    def val(self, t, fd: int = -1) -> Any:
        """A layer mapper's view of tensor ``t``: its nodes along dim ``fd``."""
        if not isinstance(t, Tensor):
            return t
        info = self.get(t)
        if info is None:
            return Val(depth=0)
        if info.pidx is not None:
            return Val(depth=0)
        if info.sh is None and info.lazy is not None:
            return Val(lazy=info.lazy, depth=info.depth)
        if t.dim() == 0:
            return Val(depth=info.depth)
        fd = fd % t.dim()
        cols = self.columns(info.sh, fd)
        n = int(cols.shape[0])
        if info.spatial and fd == t.dim() - 1:
            rep = math.prod(info.spatial)
            if n % rep == 0 and rep > 1:
                per = cols.view(n // rep, rep)
                if bool((per == per[:, :1]).all()):
                    return Val(own_nodes=per[:, 0].clone(), depth=info.depth, spatial=info.spatial,
                               fdim="last")
        return Val(own_nodes=cols, depth=info.depth, fdim="chan" if fd == 1 and t.dim() > 2 else "last")

    def columns(self, sh: Tensor, fd: int) -> Tensor:
        """Node of each index along dim ``fd`` (fresh nodes where none is known)."""
        n = int(sh.shape[fd])
        rows = sh.movedim(fd, -1).reshape(-1, n)
        cols = rows.max(0).values if rows.shape[0] else torch.full((n,), -1)
        missing = cols < 0
        if bool(missing.any()):
            cols = cols.clone()
            cols[missing] = self.state.new_nodes(int(missing.sum()), NodeType.HIDDEN, 0)
        return cols

    def assign(self, out, val) -> None:
        """Give the output tensor(s) of a mapper or op the nodes of ``val``."""
        if isinstance(out, Tensor):
            if isinstance(val, Val):
                nodes = val.nodes
                if nodes is None:
                    if val.lazy is not None:
                        self.set(out, _Info(lazy=val.lazy, depth=val.depth))
                    return
                fd = 1 if (val.fdim == "chan" and out.dim() > 2) else out.dim() - 1
                if out.dim() == 0 or int(out.shape[fd]) != int(nodes.shape[0]):
                    return
                self.set(out, _Info(sh=_along(nodes, out.shape, fd), depth=val.depth))
            return
        if isinstance(out, (tuple, list)):
            items = val.items if isinstance(val, TupleVal) else [val]
            for o, v in zip(out, items):
                self.assign(o, v)

    # ------------------------------------------------------------ hooks
    def install(self) -> None:
        from .layers import keep_whole
        for qn, m in self.model.named_modules():
            if not keep_whole(m):
                continue
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._make_post(qn), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        self.leaf_depth += 1

    def _make_post(self, qn):
        def post(module, args, kwargs, out):
            self.leaf_depth -= 1
            if self.leaf_depth or self.busy:
                return None
            self.busy = True
            try:
                fd = self.feature_dim_for(module)
                fd = -1 if fd == "tokens" else fd
                a = [self.val(x, fd) if isinstance(x, Tensor) else x for x in args]
                kw = {k: self.val(x, fd) if isinstance(x, Tensor) else x for k, x in kwargs.items()}
                self.assign(out, self.mapper_for(module)(self.state, module, qn, a, kw))
            except Exception as e:
                self.errors.append(f"{qn} ({type(module).__name__}): {type(e).__name__}: {e}")
            finally:
                self.busy = False
            return None
        return post

    # -------------------------------------------------------------- ops
    def on_op(self, func, args, kwargs, out) -> None:
        name = _name(func)
        if name in _SKIP:
            return
        ins = _tensors((args, kwargs))
        if self.scores:
            self._scores_op(name, ins, out)
        infos = [(t, self.get(t)) for t in ins]
        tracked = [(t, i) for t, i in infos if i is not None]
        if not tracked:
            return
        params = [(t, i) for t, i in tracked if i.pidx is not None]
        if params and self._param_op(name, func, args, kwargs, out, tracked):
            return
        if len(tracked) == 1 and params and isinstance(out, Tensor) and name not in _VIEW_LIKE:
            idx = params[0][1].pidx
            if tuple(out.shape) == tuple(params[0][0].shape):
                # 1.0 + w, w.float() ** 2, ...: still "the entries of w" (Gemma's 1 + weight)
                self.set(out, _Info(pidx=idx))
                return
            if (name in _ADD or name in _MUL) and not any(id(t) in self.scores for t in ins):
                # w + a constant broadcast to a larger shape (Swin's relative-position
                # bias + its shifted-window mask): element e is still entry idx[e]
                try:
                    self.set(out, _Info(pidx=(idx[0], torch.broadcast_to(idx[1], out.shape))))
                    return
                except RuntimeError:
                    pass
        if name in _VIEW_LIKE:
            self._view(name, func, args, kwargs, out, tracked)
        elif name in _MATMUL:
            self._matmul(args, out)
        elif name == "scaled_dot_product_attention":
            self._sdpa(args, kwargs, out)
        elif name == "glu":
            self._glu(args, kwargs, out)
        elif name in _REDUCE:
            self._reduce(args, kwargs, out, tracked)
        else:
            self._elementwise(out, tracked)

    def _transposed_param(self, t):
        """The 2-D parameter ``W`` if ``t`` is exactly ``W.T``, else None."""
        i = self.get(t) if isinstance(t, Tensor) and not isinstance(t, nn.Parameter) else None
        if i is None or i.pidx is None or i.pidx[1].dim() != 2:
            return None
        p, idx = i.pidx
        shape = self.state.param_shapes[p]
        if len(shape) != 2 or tuple(idx.shape) != (shape[1], shape[0]):
            return None
        if not torch.equal(idx, torch.arange(shape.numel()).view(tuple(shape)).t()):
            return None
        return self.state.params[p]

    def _depth(self, tracked) -> int:
        return max([i.depth for _, i in tracked] + [0])

    def _view(self, name, func, args, kwargs, out, tracked) -> None:
        depth = self._depth(tracked)
        # views of a parameter: follow which entry each element is
        # (cat/stack of views of one parameter too: BEiT re-assembles its table)
        if all(i.pidx is not None for _, i in tracked) and (
                name not in _LIST_ARG or len({i.pidx[0] for _, i in tracked}) == 1):
            p = tracked[0][1].pidx[0]
            res = _apply_to(func, name, args, kwargs, {id(t): i.pidx[1] for t, i in tracked}, fill=-1,
                            spread=False)
            for o, r in _pairs(out, res):
                self.set(o, _Info(pidx=(p, r)))
            return
        lazy = [i for _, i in tracked if i.lazy is not None and i.sh is None]
        if lazy and len(tracked) == 1:
            # an input not yet consumed: integer token ids keep their identity,
            # other inputs too when the op only relabels dims
            for o in (_tensors(out)):
                self.set(o, _Info(lazy=lazy[0].lazy, depth=depth))
            return
        subs = {}
        for t, i in tracked:
            if i.pidx is not None:
                continue
            subs[id(t)] = self.shadow_of(t, i, -1)
        res = _apply_to(func, name, args, kwargs, subs, fill=-1)
        spatial = None
        if name in ("flatten", "view", "reshape") and isinstance(out, Tensor):
            src = tracked[0][0]
            if src.dim() >= 3 and out.dim() == 2 and out.shape[1] == math.prod(src.shape[1:]) \
                    and src.shape[0] == out.shape[0]:
                spatial = tuple(src.shape[2:])
        if name in _LIST_ARG and isinstance(out, Tensor):
            self._list_params(name, args, kwargs, out, res)
        for o, r in _pairs(out, res):
            if isinstance(r, Tensor) and r.dtype == torch.long and tuple(r.shape) == tuple(o.shape):
                self.set(o, _Info(sh=r, depth=depth, spatial=spatial))

    def _list_params(self, name, args, kwargs, out, res) -> None:
        """cat/stack of a parameter view with tracked tensors (cls tokens):
        the parameter's entries sit on the nodes its elements land next to."""
        items = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        for t in items:
            i = self.get(t)
            if i is None or i.pidx is None:
                continue
            # the element positions of t inside out: cat the index tensor with -1 fillers
            marks = [torch.full(x.shape, -1, dtype=torch.long) if x is not t else i.pidx[1] for x in items]
            try:
                pos = torch.stack(marks, dim) if name == "stack" else torch.cat(marks, dim)
            except Exception:
                continue
            self._place_param(i.pidx[0], pos, res, EntryKind.BIAS)

    def _place_param(self, p: int, pidx: Tensor, sh: Tensor, kind) -> bool:
        """Entries of parameter ``p`` on the nodes at the same elements of ``sh``."""
        numel = self.state.param_shapes[p].numel()
        try:
            pidx, sh = torch.broadcast_tensors(pidx, sh)
        except RuntimeError:
            return False
        ok = (pidx >= 0) & (sh >= 0)
        nodes = torch.full((numel,), -1, dtype=torch.long)
        nodes[pidx[ok]] = sh[ok]
        if bool((nodes < 0).any()):
            # entries this run did not touch (positions past the example's length):
            # along a dim where the touched ones all sit on the same unit, so do they
            full = nodes.view(self.state.param_shapes[p])
            for d in range(full.dim()):
                valid = full >= 0
                hi = full.amax(d, keepdim=True)
                lo = torch.where(valid, full, torch.full_like(full, 1 << 62)).amin(d, keepdim=True)
                same = (hi == lo) & (hi >= 0)
                full = torch.where(valid | ~same.expand_as(full), full, hi.expand_as(full))
            nodes = full.reshape(-1)
            if bool((nodes < 0).any()):
                return False
        return self.state.add_entries(self.state.params[p], nodes, kind)

    def _param_op(self, name, func, args, kwargs, out, tracked) -> bool:
        st = self.state
        depth = self._depth(tracked)

        def raw(t):
            i = self.get(t)
            return isinstance(t, nn.Parameter) and i is not None and i.pidx is not None

        def arg(k, key=None):
            return args[k] if len(args) > k else kwargs.get(key)

        from .layers.embedding import embedding_core
        from .layers.linear import linear_core
        if name == "linear" and raw(arg(1, "weight")):
            w, b = arg(1, "weight"), arg(2, "bias")
            b = b if raw(b) else None
            v = linear_core(st, w, b, self.val(arg(0, "input")))
            self.assign(out, v)
            return True
        if name in ("addmm", "mm", "matmul", "__matmul__") :
            x, w, b = (arg(1), arg(2), arg(0)) if name == "addmm" else (arg(0), arg(1), None)
            wt = self._transposed_param(w)
            if wt is not None and isinstance(x, Tensor) and self.get(x) is not None \
                    and self.get(x).pidx is None:
                # x @ W.T (+ b): a Linear written out (Falcon's FalconLinear, ...)
                v = linear_core(st, wt, b if raw(b) and b.dim() == 1 else None, self.val(x))
                self.assign(out, v)
                return True
            if raw(w) and w.dim() == 2 and isinstance(x, Tensor) and self.get(x) is not None \
                    and self.get(x).pidx is None:
                from .layers.hf import conv1d_core
                v = conv1d_core(st, w, b if raw(b) and b.dim() == 1 else None, self.val(x))
                self.assign(out, v)
                return True
            return False
        if name == "embedding" and raw(arg(1, "weight")):
            w = arg(1, "weight")
            v = embedding_core(st, w, self.val(arg(0, "input")))
            self.assign(out, v)
            return True
        if name == "prelu" and raw(arg(1, "weight")) and isinstance(arg(0), Tensor):
            w, x = arg(1, "weight"), arg(0)
            xi = self.get(x)
            if w.numel() > 1 and xi is not None and xi.pidx is None and x.dim() >= 2:
                sh = self.shadow_of(x, xi, 1)
                cols = self.columns(sh, 1)
                if cols.numel() == w.numel():
                    st.add_entries(w, cols, EntryKind.NORM_WEIGHT)
                self.set(out, _Info(sh=sh, depth=depth))
                return True
            return False
        if name in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"):
            x = arg(0, "input")
            if not isinstance(x, Tensor) or self.get(x) is None:
                return False
            xi = self.get(x)
            fd = -1 if name in ("layer_norm", "rms_norm") else 1
            if name in ("layer_norm", "rms_norm"):
                shape = tuple(arg(1, "normalized_shape"))
                fd = x.dim() - len(shape)
            sh = self.shadow_of(x, xi, fd)
            if name in ("layer_norm", "rms_norm"):
                ws = [(arg(2, "weight"), EntryKind.NORM_WEIGHT), (arg(3, "bias"), EntryKind.NORM_BIAS)]
                if name == "rms_norm":
                    ws = ws[:1]
                ref = sh.reshape(-1, *shape).max(0).values
            else:
                k = 2 if name == "group_norm" else 3
                ws = [(arg(k, "weight"), EntryKind.NORM_WEIGHT), (arg(k + 1, "bias"), EntryKind.NORM_BIAS)]
                ref = self.columns(sh, 1)
            for w, kind in ws:
                if raw(w):
                    wi = self.get(w)
                    self._place_param(wi.pidx[0], wi.pidx[1], ref.reshape(w.shape) if ref.numel() == w.numel()
                                      else ref, kind)
            self.set(out, _Info(sh=sh, depth=depth)) if isinstance(out, Tensor) and out.shape == x.shape \
                else None
            return True
        # a parameter (view) met elementwise with a tracked tensor
        if isinstance(out, Tensor) and (name in _MUL or name in _ADD):
            others = [(t, i) for t, i in tracked if i.pidx is None]
            ps = [(t, i) for t, i in tracked if i.pidx is not None]
            if others and len(ps) == 1:
                self._elementwise(out, others)
                oi = self.get(out)
                if oi is not None and oi.sh is not None:
                    kind = EntryKind.NORM_WEIGHT if name in _MUL else EntryKind.BIAS
                    p, idx = ps[0][1].pidx
                    self._place_param(p, idx, oi.sh, kind)
                return True
        return False


    def _elementwise(self, out, tracked) -> None:
        outs = _tensors(out)
        if len(outs) != 1:
            return
        o = outs[0]
        depth = self._depth(tracked)
        shs, stretched = [], []
        for t, i in tracked:
            if i.pidx is not None:
                continue
            if i.sh is None and i.lazy is not None:
                if len(tracked) == 1 or all(j.sh is None for _, j in tracked):
                    self.set(o, _Info(lazy=i.lazy, depth=depth))
                    return
                continue
            try:
                shs.append(torch.broadcast_to(i.sh, o.shape))
                stretched.append(_stretched_dims(i.sh.shape, o.shape))
            except RuntimeError:
                kept = _keep_matching_dims(i.sh, o.shape)   # pooling, interpolation, ...
                if kept is not None:
                    shs.append(kept)
                    stretched.append(())
        # lazy inputs meeting a known tensor: nodes on its last dim, merged
        for t, i in tracked:
            if i.sh is None and i.lazy is not None and shs:
                try:
                    sh = self.shadow_of(t, i, -1)
                    shs.append(torch.broadcast_to(sh, o.shape))
                    stretched.append(_stretched_dims(sh.shape, o.shape))
                except RuntimeError:
                    pass
        if not shs:
            return
        shs = _without_collapsing(shs, stretched)
        base = shs[0]
        for other in shs[1:]:
            self._merge_pairs(base, other)
            base = torch.where(base >= 0, base, other)
        self.set(o, _Info(sh=base, depth=depth, spatial=next(
            (i.spatial for _, i in tracked if i.spatial), None)))

    def _merge_pairs(self, a: Tensor, b: Tensor) -> None:
        ok = (a >= 0) & (b >= 0) & (a != b)
        if not bool(ok.any()):
            return
        big = self.state.num_raw_nodes + 1
        key = torch.unique(a[ok] * big + b[ok])     # 1-D unique: much cheaper than unique(dim=0)
        self.state.merge(key // big, key % big)

    def _matmul(self, args, out) -> None:
        a, b = args[0], args[1]
        ia, ib = self.get(a), self.get(b)
        if not isinstance(out, Tensor) or a.dim() < 2 or b.dim() < 2:
            return
        sa = ia.sh if ia is not None else None
        sb = ib.sh if ib is not None else None
        depth = max(ia.depth if ia else 0, ib.depth if ib else 0)
        if sa is not None and sb is not None and _const_along(sa, -2) and _const_along(sb, -1) \
                and not _const_along(sa, -1):
            # contraction: a[..., i, k] with b[..., k, j], both carrying units along k
            # (q @ k^T): merge per k, per batch/head slice. Attention weights @ v
            # (units of a not along k) merge nothing.
            ka = sa.select(-2, 0)                         # [..., k]
            kb = sb.select(-1, 0)                         # [..., k]
            try:
                ka, kb = torch.broadcast_tensors(ka, kb)
                self._merge_pairs(ka, kb)
                if out.dim() >= 3 and ka.dim() >= 2:
                    self.scores[id(out)] = (out, ka)       # [..., H, d]
            except RuntimeError:
                pass
        if sb is not None:
            cols = sb.select(-2, 0).unsqueeze(-2)       # [..., 1, j]
            if bool((sb == cols).all()):
                try:
                    self.set(out, _Info(sh=torch.broadcast_to(cols, out.shape).clone(), depth=depth))
                except RuntimeError:
                    pass

    def _sdpa(self, args, kwargs, out) -> None:
        q, k, v = args[:3]
        iq, ik, iv = self.get(q), self.get(k), self.get(v)
        sq = self.shadow_of(q, iq, -1) if iq is not None else None
        sk = self.shadow_of(k, ik, -1) if ik is not None else None
        if sq is not None and sk is not None:
            a, b = sq.select(-2, 0), sk.select(-2, 0)     # [..., H, d]
            if a.dim() >= 2 and b.dim() >= 2 and a.shape[-2] != b.shape[-2] and a.shape[-2] % b.shape[-2] == 0:
                b = b.repeat_interleave(a.shape[-2] // b.shape[-2], dim=-2)   # grouped-query heads
            try:
                a, b = torch.broadcast_tensors(a, b)
                self._merge_pairs(a, b)
                mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                im = self.get(mask) if isinstance(mask, Tensor) else None
                if im is not None and im.sh is not None and im.pidx is None:
                    self._join_heads(a, im.sh)
                elif im is not None and im.pidx is not None:
                    self._score_table(a, *im.pidx)
            except RuntimeError:
                pass
        if iv is not None and isinstance(out, Tensor):
            sv = self.shadow_of(v, iv, -1).select(-2, 0)   # [..., Hkv, dv]
            if sv.dim() >= 2 and out.dim() >= 3 and sv.shape[-2] != out.shape[-3] \
                    and out.shape[-3] % sv.shape[-2] == 0:
                sv = sv.repeat_interleave(out.shape[-3] // sv.shape[-2], dim=-2)
            try:
                self.set(out, _Info(sh=torch.broadcast_to(sv.unsqueeze(-2), out.shape).clone(),
                                    depth=max(iv.depth, iq.depth if iq else 0)))
            except RuntimeError:
                pass

    def _scores_op(self, name, ins, out) -> None:
        """Follow attention scores through ``* scale`` / ``+ mask`` (the output
        is still the scores); a per-head tracked term added to them is a score
        bias (:meth:`_join_heads`), a parameter added to them one too
        (:meth:`_score_table`), a parameter multiplied in a per-head scale
        (:meth:`_score_scale`)."""
        units = None
        for t in ins:
            hit = self.scores.get(id(t))
            if hit is not None and hit[0] is t:
                units = hit[1]
                break
        if units is None or not isinstance(out, Tensor) or (name not in _ADD and name not in _MUL):
            return
        if name in _ADD:
            for t in ins:
                i = self.get(t)
                if i is not None and i.sh is not None and i.pidx is None and t is not out:
                    self._join_heads(units, i.sh)
                elif i is not None and i.pidx is not None and t is not out:
                    self._score_table(units, *i.pidx)
        elif name in _MUL:
            for t in ins:
                i = self.get(t)
                if i is not None and i.pidx is not None and t is not out:
                    self._score_scale(units, *i.pidx)
        self.scores[id(out)] = (out, units)

    def _head_dim(self, units: Tensor, p: int, idx: Tensor) -> tuple[int, int] | None:
        """(H, d) when parameter ``p`` (not yet placed), met elementwise with
        attention scores ``[..., H, Lq, Lk]`` at entries ``idx``, acts on one
        head per entry, the head being its index along dim ``d``; else None."""
        st = self.state
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

    def _score_scale(self, units: Tensor, p: int, idx: Tensor) -> None:
        """A parameter multiplied into the attention scores, one entry per head
        (Swinv2's ``logit_scale``, ``[H, 1, 1]``): noted now, placed after the
        run (:meth:`place_score_scales`), when it is known whether each head's
        q/k units have become one node (a score bias joins them): the entries
        of head h are then node-held (NORM_WEIGHT) by that node. A scale on a
        head whose units stay separate is left alone (on any single unit it
        would break the symmetry of permuting the units within the head)."""
        found = self._head_dim(units, p, idx)
        if found is not None:
            self.score_scales.append((units, p, found))

    def place_score_scales(self) -> None:
        st = self.state
        for units, p, (H, d) in self.score_scales:
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

    def _score_table(self, units: Tensor, p: int, idx: Tensor) -> None:
        """A parameter (or a view of one) added to the attention scores, each
        entry biasing one head: Swin's relative-position bias table
        ``table[rel_index]`` -> ``[1, H, L, L]``, a learned ``[H, L, L]`` bias.

        The same structure as T5's table (an embedding from distance buckets
        to heads): the parameter's head dim indexes H new head nodes, its
        other dims (flattened) index new INPUT position nodes, entry
        ``table[r, h]`` is the edge ``r -> h`` (EMBEDDING), and head node h is
        joined with head h's q/k units (:meth:`_join_heads`). ``idx`` gives
        the parameter entry of each score element, ``[..., H, Lq, Lk]``. Left
        alone (fallback) unless every entry it touches biases a single head
        and the heads follow one dim of the parameter."""
        st = self.state
        found = self._head_dim(units, p, idx)
        if found is None:
            return        # (or a table several attentions read: its first reader's heads)
        H, d = found
        shape = tuple(st.param_shapes[p])
        A, B = math.prod(shape[:d]), math.prod(shape[d + 1:])
        heads = st.new_nodes(H, NodeType.HIDDEN, 0)
        self._join_heads(units, heads.view(H, 1, 1))   # fresh head nodes: it cannot refuse them
        pos = st.new_nodes(A * B, NodeType.INPUT, 0)   # one per relative position (table row)
        st.add_edges(st.params[p], (A, H, B), pos.view(A, 1, B), heads.view(1, H, 1), EdgeKind.EMBEDDING)

    def _join_heads(self, units: Tensor, bias: Tensor) -> None:
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
        if bias.dim() < 3 or units.dim() < 2 or not (_const_along(bias, -1) and _const_along(bias, -2)):
            return
        heads = bias[..., 0, 0]                               # [..., H]
        H = int(units.shape[-2])
        if heads.shape[-1] != H or bool((heads < 0).any()):
            return
        per_head = heads.reshape(-1, H)
        if not bool((per_head == per_head[:1]).all()):
            return
        first = per_head[0].tolist()
        roots = [self.state.find(n) for n in first]
        joined = {self.state.find(n) for n in self.head_nodes}
        if len(set(roots)) != H or joined.intersection(roots) \
                or any(self.state.node_type_of(r) != NodeType.HIDDEN for r in roots):
            return
        try:
            hn, u = torch.broadcast_tensors(heads.unsqueeze(-1), units)
        except RuntimeError:
            return
        ok = u >= 0
        self._merge_pairs(hn[ok], u[ok])
        self.head_nodes.extend(first)

    def _glu(self, args, kwargs, out) -> None:
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        i = self.get(x)
        if i is None or not isinstance(out, Tensor):
            return
        sh = self.shadow_of(x, i, dim)
        a, b = sh.chunk(2, dim)
        self._merge_pairs(a, b)
        self.set(out, _Info(sh=a.clone(), depth=i.depth))

    def _reduce(self, args, kwargs, out, tracked) -> None:
        x = args[0] if args else None
        i = self.get(x)
        o = out[0] if isinstance(out, tuple) else out
        if i is None or i.sh is None or not isinstance(o, Tensor) or not o.is_floating_point():
            if i is not None and i.lazy is not None and isinstance(o, Tensor) and o.shape == x.shape:
                self.set(o, _Info(lazy=i.lazy, depth=i.depth))
            return
        dim = args[1] if len(args) > 1 and not isinstance(args[1], (float, str)) else kwargs.get("dim")
        if dim is None:
            return
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        dims = [dim] if isinstance(dim, int) else list(dim)
        hi, lo = i.sh.amax(dims, keepdim=keep), i.sh.amin(dims, keepdim=keep)
        r = torch.where(hi == lo, hi, torch.full_like(hi, -1))
        if tuple(r.shape) == tuple(o.shape):
            self.set(o, _Info(sh=r, depth=i.depth))


def _stretched_dims(shape, out_shape) -> tuple[int, ...]:
    """Dims of ``out_shape`` a tensor of ``shape`` is broadcast along (size 1 or absent -> > 1)."""
    pad = len(out_shape) - len(shape)
    full = (1,) * pad + tuple(shape)
    return tuple(d for d in range(len(out_shape)) if full[d] == 1 and out_shape[d] > 1)


def _without_collapsing(shs: list[Tensor], stretched: list[tuple[int, ...]]) -> list[Tensor]:
    """The shadows an elementwise op may merge pairwise: not one broadcast
    along a dim where another operand's units vary -- a per-token scalar gate
    ``sigmoid(g(x))[..., 1] * y[..., H]`` (Qwen2-MoE's shared expert), a
    dueling head's ``V[..., 1] + A[..., n]``: merging would make all of
    ``y``'s units one node. (If every operand is such, only the first is kept.)"""
    dims = set().union(*stretched)
    if not dims:
        return shs
    varies = [{d for d in dims if s.stride(d) != 0 and not _const_along(s, d)} for s in shs]
    keep = [s for k, s in enumerate(shs)
            if not any(set(stretched[k]) & varies[j] for j in range(len(shs)) if j != k)]
    return keep or shs[:1]


def _const_along(sh: Tensor, dim: int) -> bool:
    return sh.shape[dim] <= 1 or bool((sh == sh.narrow(dim, 0, 1)).all())


def _keep_matching_dims(sh: Tensor, shape) -> Tensor | None:
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


def _along(nodes: Tensor, shape, fd: int) -> Tensor:
    """Shadow of ``shape`` whose dim ``fd`` carries ``nodes``."""
    nd = len(shape)
    if nd == 0:
        return nodes.view(())
    fd = fd % nd
    view = [1] * nd
    view[fd] = int(nodes.shape[0])
    return nodes.view(view).expand(tuple(shape))


def _apply_to(func, name, args, kwargs, subs: dict, fill: int, spread: bool = True):
    """``func`` applied with tracked tensors replaced by their shadows and
    untracked tensors in a cat/stack list by ``fill``-filled long tensors
    (``spread``: or by the units of the tracked pieces, see ``filler``)."""
    def sub(x):
        if isinstance(x, Tensor):
            s = subs.get(id(x))
            if s is not None:
                return s
        return x

    if name in _LIST_ARG:
        items = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        known = [subs[id(t)] for t in items if id(t) in subs]

        def filler(t):
            # an untracked piece (a cls token) concatenated along a dim the units
            # do not depend on takes the units of the other pieces
            if spread and name in ("cat", "concat", "concatenate") and isinstance(dim, int) and known:
                k = known[0]
                d = dim % k.dim() if k.dim() else 0
                if k.dim() == t.dim() and _const_along(k, d) and all(
                        k.shape[i] == t.shape[i] for i in range(k.dim()) if i != d):
                    return k.narrow(d, 0, 1).expand(tuple(t.shape))
            return torch.full(t.shape, fill, dtype=torch.long)
        new = [subs[id(t)] if id(t) in subs else filler(t) for t in items]
        args = (new,) + tuple(args[1:]) if args else args
        if not args:
            kwargs = {**kwargs, "tensors": new}
        return func(*args, **kwargs)
    first = args[0] if args else None
    rest = list(args[1:])
    if name in ("to", "type", "type_as", "float", "half", "bfloat16", "double", "cpu", "cuda"):
        return sub(first)
    if name == "pad":
        kwargs = {**kwargs, "value": fill} if kwargs.get("mode", rest[1] if len(rest) > 1 else "constant") \
            == "constant" else kwargs
        if len(rest) > 2:
            rest = rest[:2]
    return func(sub(first), *rest, **kwargs)   # other tensor args (expand_as's target) stay real


def _pairs(out, res):
    if isinstance(out, Tensor):
        return [(out, res)] if isinstance(res, Tensor) else []
    if isinstance(out, (tuple, list)) and isinstance(res, (tuple, list)):
        return [(o, r) for o, r in zip(out, res) if isinstance(o, Tensor) and isinstance(r, Tensor)]
    return []


def run(state, model: nn.Module, example_inputs, mapper_for, feature_dim_for) -> tuple[Any, list[str]]:
    """Run ``model`` on ``example_inputs`` under the recorder, mark the nodes
    of its outputs; returns the problems noted (ops or mappers that failed)."""
    rec = Recorder(state, model, mapper_for, feature_dim_for)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    for pos, t in enumerate(_tensors((args, kwargs))):
        rec.set(t, _Info(lazy=LazyNodes(NodeType.INPUT, group=pos)))
    modes = {m: m.training for m in model.modules()}
    rec.install()
    try:
        model.eval()
        with torch.no_grad(), _Mode(rec):
            out = model(*args, **kwargs)
    finally:
        rec.remove()
        for m, training in modes.items():
            m.training = training
    try:
        rec.place_score_scales()
    except Exception as e:  # never fail the build over it: the scales fall back
        rec.errors.append(f"score scales: {type(e).__name__}: {e}")
    nodes: list[int] = []
    for t in _tensors(_plain(out)):
        i = rec.get(t)
        if i is None or i.sh is None or not t.is_floating_point() or t.dim() == 0:
            continue
        fd = -1
        if t.dim() > 2:
            col1 = rec.columns(i.sh, 1)
            last = i.sh.movedim(-1, 0).reshape(t.shape[-1], -1)
            if not bool((last == last[:, :1]).all()) and bool((i.sh.movedim(1, 0).reshape(t.shape[1], -1) == col1.view(-1, 1)).all()):
                fd = 1
        nodes.extend(rec.columns(i.sh, fd).tolist())
    state.mark_outputs(nodes)
    return rec.errors


def _plain(out):
    """Model outputs as plain containers (HF ModelOutput is a dict; caches are skipped)."""
    if isinstance(out, dict):
        return [v for k, v in out.items() if k not in ("past_key_values",)]
    return out
