"""``torch.optim.Optimizer`` drop-ins driven by a learned optimizer.

    opt = GMNOptimizer(model)                  # shipped pretrained weights
    opt = GMNOptimizer(model, weights=None)    # untrained metanetwork (~Adam, lr 1e-3)
    opt = MLPOptimizer(model.parameters(), weights="mlp.safetensors")
    opt = GMNOptimizer([{"params": decay, "weight_decay": 1e-4},     # the torch.optim form:
                        {"params": no_decay, "weight_decay": 0.0}],  # graph from ``model``,
                       model=model)                                  # groups choose what moves

Semantics (both optimizers; ``lr_g``, ``wd_g`` are the values of the group
holding a tensor at this step, ``u`` the metanetwork's update computed from the
parameters *before* this step)::

    p <- p - lr_g * wd_g * p + lr_g * u(p, g, state)

* ``lr`` multiplies the learned step (1.0 = the step the metanetwork was
  meta-trained to take, roughly Adam at 1e-3 for an untrained one), so
  ``torch.optim.lr_scheduler`` scales it; ``lr=0`` freezes a group exactly.
* ``weight_decay`` is decoupled, as in AdamW (``p.mul_(1 - lr * wd)``), with
  this optimizer's ``lr``: at ``lr=1`` a ``wd`` of ``1e-4`` shrinks the weights
  by 1e-4 per step. To port ``AdamW(lr=eta, weight_decay=lam)``, whose step
  shrinks by ``eta * lam``, use ``weight_decay=eta * lam`` (1e-5 for 1e-3, 0.01).
  It applies exactly to the tensors stepped this time (not to ``grad=None``).
* ``betas`` is accepted and stored so schedulers that cycle momentum
  (``OneCycleLR``, ``CyclicLR``) run, but it is a **no-op**: the statistics use
  the fixed betas the metanetwork was meta-trained with
  (:data:`l2o.features.MOMENTUM_BETAS`, ``SECOND_MOMENT_BETA``); other values
  would feed it inputs it never saw.
* The graph (or flat layout) covers every parameter of ``model``, in groups or
  not: tensors outside every group are inputs to the GMN's message passing but
  never change; :meth:`~LearnedOptimizerBase.add_param_group` adds them later
  (progressive unfreezing) with fresh state.

Design notes:

* Where things are: the classes here build the graph (or flat layout) and
  the metanetwork; :mod:`l2o.optim_base` is the torch.optim side (groups,
  ``self.state``, ``step()``); :mod:`l2o.optim_step` is one step, from the
  gradients to the parameters; :mod:`l2o.optim_state` the state dict. The
  metanetwork is evaluated by a backend of :mod:`l2o.fast`, picked by the
  ``impl`` argument (``"auto"``: :func:`l2o.fast.select_impl`), owned by the
  optimizer (``opt.backend``, with its workspace).
* State lives in two flat buffers (momenta ``m`` [num_momenta, n],
  feature-major, second moment ``v`` [n]) laid out by the ParamGraph;
  ``self.state[p]`` holds *views* into them (``m`` as [num_momenta, *p.shape])
  and ``step``, the tensor's own float32 step counter (a CPU 0-d view into
  one vector of counters), so ``state_dict()`` has per-parameter tensors
  while ``step`` works on the flat buffers. On CPU (the chunked backends of
  ``l2o/fast``) these 20 bytes per parameter are all an optimizer keeps that
  grows with the model: parameters and gradients are read in place, each
  run's update is applied as soon as it is computed, and the optimizer's
  private copy of the graph is lean (``l2o/fast/lean.py``); ``bench/memory.py``.
* Step counters are per tensor: a tensor's counter advances when it is
  stepped. Its own count sets its Adam bias correction (a tensor unfrozen or
  added at step 1000 is bias-corrected as at its first step). The metanetwork
  reads one clock for the whole model (its time features are shared by all
  entries and, for the GMN, mixed by message passing): the largest counter
  among the tensors stepped.
* A tensor whose gradient is ``None`` (unused, frozen), that is in no group,
  or whose gradient is non-finite (or whose square overflows float32) is left
  untouched for that step, and so is its state; non-finite gradients warn.
  Entries whose *update* comes out non-finite are not changed either (with a
  warning); their statistics, which depend on finite gradients only, do advance.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import features as F_
from . import optim_fsdp
from .fast import plan as plan_module
from .fast.backend import fused_kernels, make_backend
from .fast.gmn import check_edge_states
from .fast.shard import Shard, row_shard_spans, shard_bounds
from .layout import tensor_layout
from .optim_args import model_and_groups, resolve_lopt, unwrap_model
from .optim_base import LearnedOptimizerBase, as_param_groups, float32_default, tensors_of
from .optim_step import step_by_runs

__all__ = ["GMNOptimizer", "MLPOptimizer", "ShardedGMNOptimizer", "LearnedOptimizerBase", "unwrap_model"]


LEAN_GRAPH_UNCACHED_PARAMS = 1_000_000


class GMNOptimizer(LearnedOptimizerBase):
    """Graph-metanetwork learned optimizer for ``model``.

    Two forms::

        GMNOptimizer(model)                                   # every parameter, one group
        GMNOptimizer(params_or_param_groups, model=model)     # torch.optim's form

    The graph always comes from ``model`` (built once, over all its
    parameters); ``params`` (tensors, ``named_parameters()`` or group dicts)
    chooses which parameters move and with which options. Tensors in no
    group feed the message passing but never change; add them later with
    :meth:`add_param_group`.

    Args:
        params: the model, or an iterable of its parameters / of group dicts.
        weights: ``"pretrained"`` (shipped weights), a path to a safetensors
            file from ``meta_train.py``, a ``GMNLOpt`` module, or ``None`` for
            a freshly initialised metanetwork.
        lr: multiplier of the learned step (1.0 = as meta-trained); a float
            or a 1-element tensor. Per group.
        example_inputs: passed to :func:`l2o.build_graph` when tracing needs shapes.
        strict: raise on modules the graph builder does not understand.
        model: the ``nn.Module`` whose graph is built (DDP / DataParallel /
            ``torch.compile`` wrappers are unwrapped); required unless
            ``params`` is the model.
        weight_decay: decoupled weight decay per group,
            ``p <- p - lr * weight_decay * p`` each step the tensor is
            stepped, from the parameters the learned update was computed at
            (AdamW's rule with this optimizer's ``lr``; see :mod:`l2o.optim`).
        betas: accepted for schedulers that cycle momentum; a documented
            no-op (the metanetwork's statistics use fixed betas).
        graph_model: another name for ``model``, for HF Trainer's
            ``optimizer_cls_and_kwargs`` (Trainer replaces its parameter groups
            by the model when the kwargs hold a ``"model"`` key).
        impl: the backend of the no-grad step: ``"auto"`` (the cheapest for
            this model on its device, :func:`l2o.fast.select_impl`),
            ``"forward"``, ``"chunked"`` or ``"fused"`` (all compute the
            same function; ``tests/test_backends.py``). ``opt.backend.name``
            says which one runs.
        edge_states: where the chunked and fused steps keep the edge states
            between their passes (:data:`l2o.fast.gmn.EDGE_STATES`):
            ``"auto"`` (kept in float32 up to 4M parameters, recomputed
            above), ``"recompute"``, ``"float32"`` (32 bytes per parameter),
            or ``"float16"`` (16 bytes per parameter, a faster step on
            large models than recomputing, states rounded to half floats;
            README, "Memory and large models").
    """

    def __init__(self, params, weights="pretrained", lr: float | Tensor = 1.0,
                 example_inputs=None, strict: bool = False, *, model: nn.Module | None = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 graph_model: nn.Module | None = None, impl: str = "auto", edge_states: str = "auto"):
        check_edge_states(edge_states)
        model, groups = model_and_groups("GMNOptimizer", params, model, graph_model)
        if model is None:
            raise TypeError("GMNOptimizer needs the model (an nn.Module) to build its parameter graph: "
                            "GMNOptimizer(model) or GMNOptimizer(params, model=model); "
                            "for a bare parameter list use l2o.MLPOptimizer")
        if next(model.parameters(), None) is None:
            raise ValueError(f"GMNOptimizer: the model ({type(model).__name__}) has no parameters (layers kept "
                             "in a plain Python list or dict are not registered: use nn.ModuleList / nn.ModuleDict)")
        from .graph import build_graph

        # a large model's graph is not cached by the builder: once anything
        # reads its per-entry index tensors (32 bytes per parameter, written on
        # first read: l2o/graph/factored.py) the cache would keep them alive
        # beside the optimizer's lean copy
        large = sum(p.numel() for p in model.parameters()) >= LEAN_GRAPH_UNCACHED_PARAMS
        fsdp = optim_fsdp.has_dtensors(model.parameters())
        if fsdp and not isinstance(self, ShardedGMNOptimizer):
            raise TypeError("GMNOptimizer: the model's parameters are DTensors (FSDP2's fully_shard); use "
                            "l2o.optim.ShardedGMNOptimizer, which steps each rank's rows")
        with optim_fsdp.unsharded(model):   # the graph of the whole model (never cached: its tensors are gathered)
            graph = build_graph(model, example_inputs=example_inputs, strict=strict, use_cache=not (large or fsdp))
        named = dict(model.named_parameters())
        all_params = [named[n] for n in graph.param_names]
        super().__init__(all_params, graph, resolve_lopt(weights, "gmn"), lr=lr, model=model,
                         param_groups=groups, weight_decay=weight_decay, betas=betas, impl=impl,
                         backend_options={"edge_states": edge_states})


class MLPOptimizer(LearnedOptimizerBase):
    """Graph-free per-parameter learned optimizer (the ablation of the GMN).

    ``MLPOptimizer(model)``, ``MLPOptimizer(params_or_param_groups)`` (the
    layout is the tensors given) or ``MLPOptimizer(params_or_param_groups,
    model=model)`` (the layout is every parameter of ``model``, so
    :meth:`add_param_group` can add its other parameters later). Options as
    :class:`GMNOptimizer`.
    """

    def __init__(self, params, weights="pretrained", lr: float | Tensor = 1.0, *,
                 model: nn.Module | None = None, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), graph_model: nn.Module | None = None,
                 impl: str = "auto"):
        model, groups = model_and_groups("MLPOptimizer", params, model, graph_model)
        if model is not None:
            named = list(model.named_parameters())
            names, all_params = [n for n, _ in named], [p for _, p in named]
        else:
            groups = as_param_groups(groups)
            names, all_params, seen = None, [], set()
            for group in groups:
                for p in tensors_of(group):
                    if id(p) not in seen:
                        seen.add(id(p))
                        all_params.append(p)
        if not all_params:
            raise ValueError("MLPOptimizer got an empty parameter list")
        layout = tensor_layout([p.shape for p in all_params], names)
        super().__init__(all_params, layout, resolve_lopt(weights, "mlp"), lr=lr, model=model,
                         param_groups=groups, weight_decay=weight_decay, betas=betas, impl=impl)


class ShardedGMNOptimizer(GMNOptimizer):
    """:class:`GMNOptimizer` with its work and state split over the ranks of a
    ``torch.distributed`` process group.

    Two layouts, told apart by the parameters:

    * **DDP / ZeRO-1** (plain tensors): every rank holds the whole model and
      the same (DDP-averaged) gradients; rank ``r`` owns the flat entries
      ``[bounds[r], bounds[r+1])`` (:func:`l2o.fast.shard.shard_bounds`:
      nearly equal shares, cut on edge-run bounds), and after the step every
      owned segment of every tensor is broadcast from its owner.
    * **FSDP2** (``fully_shard``: DTensors sharded along dim 0 over a 1-D
      mesh of this group's ranks): rank ``r`` owns, of every tensor, the rows
      it holds (:func:`l2o.fast.shard.row_shard_spans`); the step reads their
      local values and gradients and writes their update in place, and
      nothing is broadcast. The graph is built once from the whole model
      (each FSDP module's parameters gathered for that recorded run).

    Either way a step runs the chunked GMN step on the owned edges and
    entries only; what crosses entries -- each tensor's feature sums of
    squares ``[T, F]``, the node-held entries' features ``[F, M]`` and, per
    round, the messages summed onto nodes ``2 x [edge_dim, N]`` -- is
    all-reduced, so each rank computes the node states of the whole graph and
    the same updates the unsharded optimizer computes, to float rounding
    (sums in another order). The statistics ``m``, ``v`` (20 bytes per
    parameter) exist for the owned entries only: per-rank state falls as
    ``1/world``. A tensor with a non-finite gradient on any rank is skipped
    on every rank.

    ``state_dict()`` holds this rank's shard (``self.state[p]``: ``m`` ``[4, L]``
    and ``v`` ``[L]`` over the owned part of ``p``, flat, with ``shard`` =
    its (start, stop) within ``p``, and the replicated ``log_lr`` of the
    step-size controller, whose per-tensor sums are all-reduced like the
    features'; with FSDP2, ``m`` ``[4, *p.shape]`` and ``v`` are DTensors
    sharded as ``p`` is, so ``torch.distributed.checkpoint`` saves and
    restores them, also at another world size). ``load_state_dict`` takes this rank's own (same world size)
    or a whole one, which :meth:`full_state_dict` gathers on one rank.
    ``edge_states`` as :class:`GMNOptimizer`'s, over the rank's own edges.
    ``add_param_group`` after construction is not supported.
    """

    def __init__(self, params, weights="pretrained", lr: float | Tensor = 1.0, example_inputs=None,
                 strict: bool = False, *, model: nn.Module | None = None, process_group=None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 graph_model: nn.Module | None = None, impl: str = "auto", edge_states: str = "auto"):
        import torch.distributed as dist
        if impl not in ("auto", "chunked", "fused"):
            raise ValueError(f"ShardedGMNOptimizer runs the chunked step: impl 'auto', 'chunked' or 'fused', got {impl!r}")
        self._pg = process_group
        self._rank, self._world = dist.get_rank(process_group), dist.get_world_size(process_group)
        super().__init__(params, weights, lr, example_inputs, strict, model=model, weight_decay=weight_decay,
                         betas=betas, graph_model=graph_model, impl=impl, edge_states=edge_states)

    def _all_reduce(self, t: Tensor) -> None:
        import torch.distributed as dist
        dist.all_reduce(t, group=self._pg)

    def _initial_state(self, params: list[Tensor]) -> dict[str, Tensor]:
        self._fsdp = optim_fsdp.has_dtensors(self._flat_params)
        if self._fsdp:
            names = [self.graph.param_names[i] for i in self.graph.flat_order]
            optim_fsdp.check_row_sharded(names, self._flat_params, self._world)
            every_rank = row_shard_spans(self.graph.tensor_slices, [tuple(p.shape) for p in self._flat_params],
                                         self._world)
            spans = every_rank[self._rank]
            for name, p, (lo, hi) in zip(names, self._flat_params, spans):
                if optim_fsdp.local(p).numel() != hi - lo:
                    raise ValueError(f"ShardedGMNOptimizer: rank {self._rank} holds {optim_fsdp.local(p).numel()} "
                                     f"entries of {name!r}, fully_shard's dim-0 chunks give it {hi - lo}")
            self._cuts = sorted({i for rank_spans in every_rank for span in rank_spans for i in span})
            self._prepare_backend(views=False)
            self._shard = Shard(spans, self._all_reduce, local_params=True)
        else:
            self._cuts = []
            self._prepare_backend(views=False)
            self._bounds = shard_bounds(self.backend.plan, self._world)
            self._shard = Shard.flat_range(self._bounds[self._rank], self._bounds[self._rank + 1],
                                           self.backend.plan, self._all_reduce)
        init = F_.init_state(torch.empty(self._shard.size, device=self.graph.device))
        return {"m": init["m"], "v": init["v"]}

    def _prepare_backend(self, views: bool = True) -> None:
        """The chunked step always (``"auto"``: fused where the kernels build)."""
        impl = self.impl
        if impl == "auto":
            impl = "fused" if fused_kernels(self.lopt, self.graph.device) is not None else "chunked"
        if self.backend is None:
            with float32_default():
                # the torch ops' run length with the kernels too: shards are cut on run bounds
                self.backend = make_backend(self.lopt, self.graph, self.graph.device, impl, lean=True,
                                            chunk=plan_module.DEFAULT_CHUNK, cuts=self._cuts,
                                            **self._backend_options)
            self.graph = self.backend.graph
        if views:
            self._point_state_views()

    def _owned(self, k: int) -> tuple[int, int]:
        """Tensor ``k``'s owned entries (flat indices, possibly empty)."""
        return self._shard.spans[k]

    def _point_state_views(self) -> None:
        grouped = self._group_index()
        for k, p in enumerate(self._flat_params):
            if grouped[k] < 0:
                self.state.pop(p, None)
                continue
            s, e = self._owned(k)
            i, start = self._shard.state_index(k, s), self.graph.tensor_slices[k].start
            m, v = self._flat_state["m"][:, i:i + e - s], self._flat_state["v"][i:i + e - s]
            if self._fsdp:   # sharded like p: what torch.distributed.checkpoint saves and reshards
                self.state[p] = {"step": self._steps[k], **optim_fsdp.state_like(p, m, v)}
            else:
                self.state[p] = {"step": self._steps[k], "m": m, "v": v,
                                 "shard": torch.tensor([s - start, e - start])}
            if self._log_lr is not None:
                self.state[p]["log_lr"] = self._log_lr[k]

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise NotImplementedError("ShardedGMNOptimizer: add_param_group after construction is not supported")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores this rank's part from either this rank's ``state_dict()``
        (a checkpoint per rank, same world size) or a whole one
        (:meth:`full_state_dict`, or an unsharded ``GMNOptimizer``'s), of
        which each rank keeps its own entries (:meth:`_owned`)."""
        super().load_state_dict(state_dict)

    def full_state_dict(self, to: int = 0) -> dict | None:
        """The unsharded optimizer's state dict, gathered on rank ``to`` of the
        group (``None`` on the other ranks; a collective: every rank calls it).
        It restores into a ``GMNOptimizer`` or a ``ShardedGMNOptimizer`` of any
        world size or layout. Every rank holds the whole statistics (20 bytes
        per parameter) while they are summed."""
        import torch.distributed as dist
        sd = self.state_dict()
        num_momenta = self._flat_state["m"].shape[0]
        whole = torch.zeros(num_momenta + 1, self.graph.num_params, device=self.graph.device)
        for k, (s, e) in enumerate(self._shard.spans):
            i = self._shard.state_index(k, s)
            whole[:num_momenta, s:e] = self._flat_state["m"][:, i:i + e - s]
            whole[num_momenta, s:e] = self._flat_state["v"][i:i + e - s]
        dst = to if self._pg is None else dist.get_global_rank(self._pg, to)
        dist.reduce(whole, dst=dst, group=self._pg)   # the ranks' parts are disjoint: the sum is their union
        if self._rank != to:
            return None
        whole = whole.cpu()
        index_of = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for k, p in enumerate(self._flat_params):
            if id(p) in index_of:
                sl = self.graph.tensor_slices[k]
                entry = sd["state"][index_of[id(p)]]
                entry.pop("shard", None)
                entry["m"] = whole[:num_momenta, sl].reshape(num_momenta, *p.shape).clone()
                entry["v"] = whole[num_momenta, sl].reshape(p.shape).clone()
        return sd

    def _sync_device(self) -> None:
        if optim_fsdp.local(self._flat_params[0]).device != self.graph.device:
            raise NotImplementedError("ShardedGMNOptimizer: the model moved after the optimizer was built")

    def _learned_step(self) -> None:
        self._check_unchanged()
        self._sync_device()
        group_of = self._group_index()
        params = [optim_fsdp.local(p) for p in self._flat_params]
        grads = [optim_fsdp.local(p.grad) if gi >= 0 and p.requires_grad and p.grad is not None else None
                 for p, gi in zip(self._flat_params, group_of)]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("ShardedGMNOptimizer does not support sparse gradients")
        if any(not p.is_contiguous() for p in params):
            raise RuntimeError("ShardedGMNOptimizer needs contiguous parameters")
        step_by_runs(self, grads, group_of, shard=self._shard, params=params)
        if not self._fsdp:
            self._broadcast_owned()

    def _broadcast_owned(self) -> None:
        """Every rank's updated segments to every rank (the same order everywhere)."""
        import torch.distributed as dist
        for k, p in enumerate(self._flat_params):
            flat, sl = p.detach().view(-1), self.graph.tensor_slices[k]
            for r in range(self._world):
                s, e = max(sl.start, self._bounds[r]), min(sl.stop, self._bounds[r + 1])
                if e > s:
                    dist.broadcast(flat[s - sl.start:e - sl.start], src=r, group=self._pg)
