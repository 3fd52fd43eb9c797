"""The eager capture's recorder: what it knows of each tensor, and which
handler each op goes to.

:class:`Recorder` keeps a :class:`~l2o.graph.shadows.TensorInfo` per tensor
the model computes (by ``id``, checked against the tensor itself), reads
values for layer mappers (:meth:`Recorder.val`), gives mapper outputs their
nodes (:meth:`Recorder.assign`), and holds the forward hooks that keep
mapped modules whole. :meth:`Recorder.on_op` sends every other op to its
handler: parameters consumed by an op (:mod:`l2o.graph.param_uses`), shape
and elementwise ops (:mod:`l2o.graph.tensor_ops`), attention products and
score terms (:mod:`l2o.graph.attention_ops`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import attention_ops, param_uses, tensor_ops
from .op_names import MATMUL, REDUCE, SKIP, VIEW_LIKE, op_name
from .param_graph import NodeType
from .shadows import TensorInfo, along, tensors_in
from .state import mapper_failure
from .values import TupleVal, Val


class RecordingMode(TorchFunctionMode):
    """Runs every torch function as usual, then shows it to the recorder
    (outside mapped modules; the recorder's own tensor work is not recorded)."""

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
                rec.errors.append(f"{op_name(func)}: {type(e).__name__}: {e}")
            finally:
                rec.busy = False
        return out


class Recorder:
    def __init__(self, state, model: nn.Module, mapper_for, feature_dim_for, keep_whole):
        self.state = state
        self.model = model
        self.mapper_for = mapper_for
        self.feature_dim_for = feature_dim_for
        self.keep_whole = keep_whole
        self.info: dict[int, tuple[Tensor, TensorInfo]] = {}
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
    def get(self, t) -> TensorInfo | None:
        if not isinstance(t, Tensor):
            return None
        if isinstance(t, nn.Parameter):
            idx = self.state.param_id(t)
            if idx is not None:
                return TensorInfo(pidx=(idx, torch.arange(t.numel()).view(t.shape)))
        hit = self.info.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        return None

    def set(self, t: Tensor, info: TensorInfo) -> None:
        if isinstance(t, Tensor) and not isinstance(t, nn.Parameter):
            self.info[id(t)] = (t, info)

    def is_param(self, t) -> bool:
        """Whether ``t`` is a model parameter itself (not a view of one)."""
        return isinstance(t, nn.Parameter) and self.state.param_id(t) is not None

    def is_activation(self, t) -> bool:
        """Whether ``t`` is a tracked tensor that is not (a view of) a parameter."""
        i = self.get(t) if isinstance(t, Tensor) else None
        return i is not None and i.pidx is None

    def shadow_of(self, t: Tensor, info: TensorInfo | None, fd: int) -> Tensor:
        """Shadow of ``t``; a lazy input gets its nodes on dim ``fd`` now."""
        if info is not None and info.sh is not None:
            return info.sh
        n = int(t.shape[fd]) if t.dim() else 1
        if info is not None and info.lazy is not None:
            lz = info.lazy
            if lz.nodes is None:
                lz.nodes = self.state.new_nodes(n, lz.kind, lz.depth, input_group=lz.group)
                nodes = lz.nodes
            elif int(lz.nodes.shape[0]) != n:
                nodes = self.state.new_nodes(n, NodeType.HIDDEN, lz.depth)
            else:
                nodes = lz.nodes
        else:
            nodes = self.state.new_nodes(n, NodeType.HIDDEN, info.depth if info else 0)
        sh = along(nodes, t.shape, fd)
        if info is not None:
            info.sh, info.lazy = sh, None
        return sh

    def val(self, t, fd: int = -1) -> Any:
        """A layer mapper's view of tensor ``t``: its nodes along dim ``fd``."""
        if not isinstance(t, Tensor):
            return t
        info = self.get(t)
        if info is None or info.pidx is not None:
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

    def arg_val(self, x, fd: int) -> Any:
        """A leaf module's argument as its mapper sees it: a tensor, or each
        tensor of a plain tuple / list (an LSTM cell's ``(h, c)``), as
        :meth:`val`; anything else as it is."""
        if isinstance(x, Tensor):
            return self.val(x, fd)
        if type(x) in (tuple, list):
            return type(x)(self.val(y, fd) if isinstance(y, Tensor) else y for y in x)
        return x

    def columns(self, sh: Tensor, fd: int) -> Tensor:
        """Node of each index along dim ``fd`` (fresh nodes where none is known)."""
        n = int(sh.shape[fd])
        rows = sh.movedim(fd, -1).reshape(-1, n)
        cols = rows.max(0).values if rows.shape[0] else torch.full((n,), -1)
        if n > 1 and rows.shape[0] > 1 and bool((rows.amin(0) != cols).any()):
            # One parameter column multiplies every row. Where each row holds n distinct
            # units (pieces concatenated or stacked along the batch), the units that meet
            # in a column are one; rows of one repeated unit (a transposed map) are not units.
            srt = rows.sort(1).values
            if bool((srt[:, 0] >= 0).all()) and bool((srt[:, 1:] != srt[:, :-1]).all()):
                self.merge_pairs(rows[:1].expand_as(rows), rows)
        missing = cols < 0
        if bool(missing.any()):
            cols = cols.clone()
            cols[missing] = self.state.new_nodes(int(missing.sum()), NodeType.HIDDEN, 0)
        return cols

    def assign(self, out, val) -> None:
        """Give the output tensor(s) of a mapper or op the nodes of ``val``."""
        if isinstance(out, (tuple, list)):
            items = val.items if isinstance(val, TupleVal) else [val]
            for o, v in zip(out, items):
                self.assign(o, v)
            return
        if not isinstance(out, Tensor) or not isinstance(val, Val):
            return
        nodes = val.nodes
        if nodes is None:
            if val.lazy is not None:
                self.set(out, TensorInfo(lazy=val.lazy, depth=val.depth))
            return
        fd = 1 if (val.fdim == "chan" and out.dim() > 2) else out.dim() - 1
        if out.dim() == 0 or int(out.shape[fd]) != int(nodes.shape[0]):
            return
        self.set(out, TensorInfo(sh=along(nodes, out.shape, fd), depth=val.depth))

    def merge_pairs(self, a: Tensor, b: Tensor) -> None:
        """Merge the nodes at equal positions of shadows ``a`` and ``b``."""
        ok = (a >= 0) & (b >= 0) & (a != b)
        if not bool(ok.any()):
            return
        big = self.state.num_raw_nodes + 1
        key = torch.unique(a[ok] * big + b[ok])     # 1-D unique: much cheaper than unique(dim=0)
        self.state.merge(key // big, key % big)

    def elementwise(self, out, tracked) -> None:
        """Merge the units of tensors met elementwise (:func:`l2o.graph.tensor_ops.elementwise`)."""
        tensor_ops.elementwise(self, out, tracked)

    @staticmethod
    def depth(tracked) -> int:
        return max([i.depth for _, i in tracked] + [0])

    # ------------------------------------------------------------ hooks
    def install(self) -> None:
        for qn, m in self.model.named_modules():
            if not self.keep_whole(m):
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter_module, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._module_done(qn), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _enter_module(self, module, args, kwargs):
        self.leaf_depth += 1

    def _module_done(self, qn):
        def post(module, args, kwargs, out):
            self.leaf_depth -= 1
            if self.leaf_depth or self.busy:
                return None
            self.busy = True
            try:
                fd = self.feature_dim_for(module)
                fd = -1 if fd == "tokens" else fd
                a = [self.arg_val(x, fd) for x in args]
                kw = {k: self.arg_val(x, fd) for k, x in kwargs.items()}
                self.assign(out, self.mapper_for(module)(self.state, module, qn, a, kw))
            except Exception as e:
                self.errors.append(mapper_failure(qn, module, e))
            finally:
                self.busy = False
            return None
        return post

    # -------------------------------------------------------------- ops
    def on_op(self, func, args, kwargs, out) -> None:
        name = op_name(func)
        if name in SKIP:
            return
        ins = tensors_in((args, kwargs))
        if self.scores:
            attention_ops.follow_scores(self, name, ins, out)
        tracked = [(t, i) for t, i in ((t, self.get(t)) for t in ins) if i is not None]
        if not tracked:
            return
        params = [(t, i) for t, i in tracked if i.pidx is not None]
        if params and param_uses.record_param_use(self, name, func, args, kwargs, out, tracked):
            return
        if len(tracked) == 1 and params and isinstance(out, Tensor) and name not in VIEW_LIKE \
                and param_uses.still_param_entries(self, name, ins, out, params[0]):
            return
        if name in VIEW_LIKE:
            tensor_ops.view(self, name, func, args, kwargs, out, tracked)
        elif name in MATMUL:
            attention_ops.matmul(self, args, out)
        elif name == "scaled_dot_product_attention":
            attention_ops.sdpa(self, args, kwargs, out)
        elif name == "glu":
            tensor_ops.glu(self, args, kwargs, out)
        elif name in REDUCE:
            tensor_ops.reduce(self, args, kwargs, out)
        else:
            tensor_ops.elementwise(self, out, tracked)

