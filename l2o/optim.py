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

* State lives in two flat buffers (momenta ``m`` [num_momenta, n],
  feature-major, second moment ``v`` [n]) laid out by the ParamGraph;
  ``self.state[p]`` holds *views* into them (``m`` as [num_momenta, *p.shape])
  and ``step``, the tensor's own float32 step counter (a CPU 0-d view into
  one vector of counters), so ``state_dict()`` has per-parameter tensors
  while ``step`` works on the flat buffers. On CPU (the chunked step of
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

import contextlib
import copy
import os
import warnings
import weakref
from collections import OrderedDict
from itertools import chain
from typing import Callable

import torch
from torch import Tensor, nn

from . import checkpoint
from .graph.param_graph import ParamGraph
from .layout import tensor_layout
from . import features as F_
from .fast.lean import lean_graph
from .lopt import LearnedOptimizer


def _resolve_lopt(weights, kind: str) -> LearnedOptimizer:
    if weights == "pretrained":
        return checkpoint.load_pretrained(kind)
    if weights is None:
        return checkpoint.make_lopt(kind)
    if isinstance(weights, LearnedOptimizer):
        return copy.deepcopy(weights)  # the optimizer freezes and moves its own copy, never the caller's
    if isinstance(weights, (str, os.PathLike)):
        return checkpoint.load_lopt(weights, expect_kind=kind)
    raise TypeError(f"weights must be 'pretrained', None, a path or a LearnedOptimizer module, "
                    f"got {type(weights).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers,
    whose forward fx cannot trace; parameters are the same objects."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _float32_default():
    """The metanetwork's step under ``torch.set_default_dtype(torch.float32)``:
    a caller's ``set_default_dtype(torch.float64)`` must not turn its
    workspaces (created without a dtype) into float64 beside float32 weights."""
    dtype = torch.get_default_dtype()
    if dtype == torch.float32:
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


# warnings.warn's stacklevel from _learned_step to the code calling opt.step():
# _learned_step <- step <- torch.no_grad's wrapper <- torch.optim's step hook wrapper <- caller
_CALLER = 5


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite. NaN and inf propagate through a sum, so a
    finite sum settles it in one streaming reduction (isfinite is several
    passes); only a sum that overflowed needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _param_groups(params) -> list[dict]:
    """``params`` as torch.optim takes it (tensors, ``(name, tensor)`` pairs
    or group dicts) as a list of group dicts."""
    if isinstance(params, Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [dict(g) for g in groups]


def _tensors_of(group: dict) -> list[Tensor]:
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    return [p[1] if isinstance(p, tuple) else p for p in params]


def _check_hyperparameters(group: dict) -> None:
    lr, wd, betas = group["lr"], group["weight_decay"], group["betas"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"invalid learning-rate multiplier: {lr}")
    if not wd >= 0.0:
        raise ValueError(f"invalid weight_decay value: {wd}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (two values in [0, 1); recorded only, see the module docstring)")


class LearnedOptimizerBase(torch.optim.Optimizer):
    """Runs a :class:`~l2o.lopt.LearnedOptimizer` over a fixed flat layout.

    ``params`` are all tensors of the layout, in ``graph.param_names`` order;
    ``param_groups`` (torch.optim's iterable of tensors or group dicts, or
    None for one group of all of them) choose which of them move and with
    which ``lr`` / ``weight_decay`` (see the module docstring).
    """

    def __init__(self, params: list[nn.Parameter], graph: ParamGraph, lopt: LearnedOptimizer,
                 lr: float | Tensor = 1.0, model: nn.Module | None = None, param_groups=None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
        # differentiable=False as torch.optim's own (torch's __setstate__ adds it otherwise)
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), differentiable=False)
        _check_hyperparameters(defaults)
        if len(params) != len(graph.param_names):
            raise ValueError(f"layout covers {len(graph.param_names)} tensors, got {len(params)} parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__} needs all parameters on one device, got {sorted(map(str, devices))} "
                             "(model-parallel / device_map='auto' models are not supported)")
        if any(p.is_complex() for p in params):
            raise TypeError(f"{type(self).__name__} does not support complex parameters")
        self._ready = False
        self._has_model = model is not None
        device = params[0].device
        self.graph = graph.to(device)
        self._params = params            # model order == graph.param_names order
        self._flat_params = [params[i] for i in graph.flat_order]
        self._flat_index = {id(p): k for k, p in enumerate(self._flat_params)}
        groups = [{"params": list(params)}] if param_groups is None else _param_groups(param_groups)
        super().__init__(groups, defaults)
        # to notice layers added to / parameters replaced in the model after construction
        self._model_ref = weakref.ref(model) if model is not None else None
        self._param_ids = tuple(id(p) for p in model.parameters()) if model is not None else None
        # float32 whatever the default dtype it was created under (the step runs in float32)
        self.lopt = lopt.to(device=device, dtype=torch.float32).eval()
        for p in self.lopt.parameters():
            p.requires_grad_(False)
        with _float32_default():  # the statistics and the step's plan, whatever the caller's default dtype
            self._flat_state = self._initial_state(params)
            # per-tensor step counters (flat order), on the CPU like torch.optim's
            # non-capturable "step": reading them never synchronises a GPU
            self._steps = torch.zeros(self.graph.num_tensors, dtype=torch.float32)
            # per-tensor log step multipliers of the step-size controller (LearnedOptimizer.adapt)
            self._log_lr = torch.zeros(self.graph.num_tensors, device=device) if self.lopt.adapt else None
            self._ready = True
            self._adopt_frame()

    def _initial_state(self, params: list[Tensor]) -> dict[str, Tensor]:
        """Fresh flat statistics ``m``, ``v`` (a sharded optimizer: its entries only)."""
        if type(self.lopt).init_state is LearnedOptimizer.init_state:  # zeros: no flat copy of the parameters
            init = F_.init_state(torch.empty(self.graph.num_params, device=self.graph.device))
        else:
            init = self.lopt.init_state(self.graph.gather([p.detach() for p in params]))
        return {"m": init["m"], "v": init["v"]}

    def __getstate__(self) -> dict:
        # torch's Optimizer keeps only defaults/state/param_groups, but the
        # graph, metanetwork and flat buffers are what this optimizer steps with
        # (copy.deepcopy((model, opt)) must give a working pair). A weak
        # reference to the model neither pickles nor follows a copied model.
        state = dict(self.__dict__)
        state["_model_ref"] = None
        state.pop("_flat_index", None)  # keyed by id(): rebuilt for the copy's tensors
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_flat_params" in self.__dict__:
            self._flat_index = {id(p): k for k, p in enumerate(self._flat_params)}

    # --------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's ``add_param_group``, for tensors of the layout (the
        model's parameters) that are in no group yet, e.g. layers unfrozen
        later; they start from fresh state (zero statistics, step 0)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            for p in group["params"]:
                if id(p) not in self._flat_index:
                    hint = ("the model it was built from" if self._has_model else
                            "the tensors it was built with (pass model= to add a model's parameters later)")
                    raise ValueError(
                        f"{type(self).__name__} can only optimize parameters of {hint}: its graph is built "
                        f"once; got a tensor of shape {tuple(p.shape)} that is not one of them")
        except Exception:
            self.param_groups.pop()
            raise
        if getattr(self, "_ready", False):
            ks = [self._flat_index[id(p)] for p in group["params"]]
            for k in ks:  # never stepped while in no group, but make "fresh" explicit
                r = self.graph.tensor_slices[k]
                self._flat_state["m"][:, r] = 0.0
                self._flat_state["v"][r] = 0.0
                self._steps[k] = 0.0
                if self._log_lr is not None:
                    self._log_lr[k] = 0.0
            self._point_state_views()

    def _group_index(self) -> list[int]:
        """For each tensor (flat order), the index of the group holding it, or -1."""
        where = [-1] * len(self._flat_params)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                where[self._flat_index[id(p)]] = gi
        return where

    # ---------------------------------------------------------------- state
    def _point_state_views(self) -> None:
        """Make ``self.state[p]`` views into the flat buffers, for the tensors in a group."""
        m_chunks = self._flat_state["m"].split(self.graph.numels, dim=1)
        v_chunks = self._flat_state["v"].split(self.graph.numels)
        grouped = self._group_index()
        for k, (p, m, v) in enumerate(zip(self._flat_params, m_chunks, v_chunks)):
            if grouped[k] < 0:
                self.state.pop(p, None)
                continue
            # m: [num_momenta, *p.shape], a view into the feature-major flat buffer
            self.state[p] = {"step": self._steps[k], "m": m.view(m.shape[0], *p.shape), "v": v.view(p.shape)}
            if self._log_lr is not None:
                self.state[p]["log_lr"] = self._log_lr[k]

    def _adopt_frame(self) -> None:
        """Point ``self.state`` at the flat statistics (the chunked step keeps
        no model-sized workspace to share any more: ``_frame`` stays None). On
        the chunked path the graph is kept lean (:mod:`l2o.fast.lean`): its
        plan is built first, then the per-entry index tensors are dropped."""
        self._frame = None
        device = self.graph.device
        if self.lopt.uses_run_step(self.graph, device):
            self.lopt.chunked_frame(self.graph, device)   # the plan, cached on the graph
            self.graph = lean_graph(self.graph)
        self._point_state_views()

    def state_dict(self) -> dict:
        """torch.optim's state dict (``state[i]``: ``step``, ``m``, ``v`` of
        the i-th grouped tensor) plus ``lopt``, the metanetwork's kind, config
        and weights, so a restored optimizer continues identically even when
        it was built with ``weights=None``. Loads with ``torch.load(weights_only=True)``.
        State-dict hooks see the finished dict."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        # A snapshot, not views: m may live in a larger workspace (torch.save would
        # write it whole) and both would keep changing with later steps.
        sd["state"] = {k: {name: t.clone() for name, t in v.items()} for k, v in sd["state"].items()}
        sd["lopt"] = {"kind": self.lopt.kind, "config": self.lopt.config(),
                      "weights": {k: v.detach().clone() for k, v in self.lopt.state_dict().items()}}
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        lopt_record = state_dict.pop("lopt", None)
        if lopt_record is not None:
            if lopt_record["kind"] != self.lopt.kind or lopt_record["config"] != self.lopt.config():
                raise ValueError(
                    f"state_dict was saved with a {lopt_record['kind']} metanetwork of config "
                    f"{lopt_record['config']}, this optimizer has {self.lopt.kind} {self.lopt.config()}")
        raw = state_dict.get("state", {})
        # torch's loader would cast m/v to the parameters' dtype (rounding the
        # float32 statistics of fp16/bf16 models): it gets the rest, they are read here
        ours = ("step", "m", "v", "log_lr")
        stripped = {k: {n: t for n, t in v.items() if n not in ours} for k, v in raw.items()}
        saved_groups = state_dict["param_groups"]
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:  # checks the groups' sizes, copies the groups' options
            super().load_state_dict({**state_dict, "state": stripped})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        saved_of = dict(zip((id(p) for g in self.param_groups for p in g["params"]),
                            chain.from_iterable(g["params"] for g in saved_groups)))
        # state dicts from before per-tensor counters and groups: one counter
        # in the (single) group, no weight_decay / betas
        legacy_step = [g.pop("step", None) for g in self.param_groups][0]
        for g in self.param_groups:
            for key, default in self.defaults.items():
                g.setdefault(key, default)

        num_momenta = self._flat_state["m"].shape[0]
        device = self.graph.device
        m_parts, v_parts, steps = [], [], torch.zeros(self.graph.num_tensors, dtype=torch.float32)
        log_lr = torch.zeros(self.graph.num_tensors)
        missing = []
        for k, p in enumerate(self._flat_params):
            shape = self.graph.param_shapes[self.graph.flat_order[k]]
            if id(p) not in saved_of:  # in no group: fresh
                m_parts.append(torch.zeros(num_momenta, shape.numel()))
                v_parts.append(torch.zeros(shape.numel()))
                continue
            entry = raw.get(saved_of[id(p)], {})
            if "m" not in entry or "v" not in entry:
                missing.append(k)
                continue
            want_m, want_v = (num_momenta, *shape), tuple(shape)
            if tuple(entry["m"].shape) != want_m or tuple(entry["v"].shape) != want_v:
                raise ValueError(
                    f"optimizer state for {self.graph.param_names[self.graph.flat_order[k]]!r} has m "
                    f"{tuple(entry['m'].shape)} / v {tuple(entry['v'].shape)}, expected {want_m} / {want_v} "
                    "(a state_dict of another model, or from l2o before momenta were stored feature-major)")
            m_parts.append(entry["m"].reshape(num_momenta, -1).to("cpu", torch.float32))
            v_parts.append(entry["v"].reshape(-1).to("cpu", torch.float32))
            step = entry.get("step", legacy_step if legacy_step is not None else 0)
            steps[k] = float(step)
            log_lr[k] = float(entry.get("log_lr", 0.0))
        if missing:
            raise ValueError(f"optimizer state_dict lacks learned-optimizer state for {len(missing)} tensors")
        if lopt_record is not None:
            self.lopt.load_state_dict(lopt_record["weights"])
        self._flat_state = {"m": torch.cat(m_parts, dim=1).to(device), "v": torch.cat(v_parts).to(device)}
        self._steps = steps
        self._log_lr = log_lr.to(device) if self.lopt.adapt else None
        with _float32_default():
            self._adopt_frame()
        for hook in post.values():
            hook(self)

    # ----------------------------------------------------------------- step
    def _sync_device(self) -> None:
        """Follow the parameters when the model moved after the optimizer was
        built (``model.cuda()``, Accelerate's ``prepare``)."""
        device = self._flat_params[0].device
        if device == self.graph.device:
            return
        self.graph = self.graph.to(device)
        self.lopt = self.lopt.to(device)
        self._flat_state = {k: v.to(device) for k, v in self._flat_state.items()}
        if self._log_lr is not None:
            self._log_lr = self._log_lr.to(device)
        self._adopt_frame()

    def _check_unchanged(self) -> None:
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and tuple(id(p) for p in model.parameters()) != self._param_ids:
            raise RuntimeError(
                f"the model's parameters changed since {type(self).__name__} was created (a layer was added or "
                "removed, or a parameter replaced); create a new optimizer for the new model")
        for p, shape in zip(self._params, self.graph.param_shapes):
            if p.shape != shape:
                raise RuntimeError(
                    f"parameter shapes changed since {type(self).__name__} was created "
                    f"({tuple(shape)} -> {tuple(p.shape)}); create a new optimizer for the new model")

    def _inactive_tensors(self, grads: list[Tensor | None], flat_g: Tensor) -> tuple[list[int], list[str]]:
        """Indices (in flat order) of tensors to leave alone this step, and
        names of those skipped for non-finite (or square-overflowing) gradients."""
        inactive = [g is None for g in grads]
        bad_names: list[str] = []
        # A square that overflows float32 poisons the second moment and the
        # tensor's feature RMS as surely as a NaN does (and message passing would
        # spread it to every tensor), so a tensor whose sum of squares is not
        # finite is skipped; one norm settles the common case where none is.
        if not bool(torch.isfinite(torch.linalg.vector_norm(flat_g))):
            sq_sums = torch.zeros(self.graph.num_tensors, device=flat_g.device).index_add_(
                0, self.graph.tensor_id, flat_g * flat_g)
            for k in (~torch.isfinite(sq_sums)).nonzero().flatten().tolist():
                inactive[k] = True
                bad_names.append(self.graph.param_names[self.graph.flat_order[k]])
        return [k for k, off in enumerate(inactive) if off], bad_names

    def _flat_buffer(self, name: str) -> Tensor:
        """A persistent float32 vector over all entries: a fresh one per step
        would cost page faults on large models."""
        if self._frame is not None:
            return self._frame[name]
        buffers = self.__dict__.setdefault("_flat_buffers", {})
        device = self.graph.device
        if name not in buffers or buffers[name].device != device:
            buffers[name] = torch.empty(self.graph.num_params, device=device)
        return buffers[name]

    def _step_state(self, active: list[int], device: torch.device) -> dict[str, Tensor]:
        """The learned optimizer's state for this step: the flat statistics,
        the clock ``step`` (the largest counter among the ``active`` tensors)
        and, when those tensors' counters differ, ``entry_step`` (each entry's
        own count, for its bias correction; see :mod:`l2o.features`)."""
        counts = self._steps[active]
        clock = float(counts.max())
        state = dict(self._flat_state, step=torch.tensor(clock, device=device))
        if self._log_lr is not None:
            state["log_lr"] = self._log_lr
        if bool((counts != clock).any()):
            numels = torch.tensor(self.graph.numels)
            state["entry_step"] = self._steps.repeat_interleave(numels, output_size=self.graph.num_params).to(device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _float32_default():  # after the closure: the caller's forward keeps its default dtype
            self._learned_step()
        return loss

    def _learned_step(self) -> None:
        self._check_unchanged()
        self._sync_device()
        group_of = self._group_index()
        # tensors in no group and frozen ones are left alone whatever their .grad holds
        grads = [p.grad if gi >= 0 and p.requires_grad else None for p, gi in zip(self._flat_params, group_of)]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               "(e.g. nn.Embedding(sparse=True)); use dense gradients")
        if self.lopt.uses_run_step(self.graph, self.graph.device):
            self._step_by_runs(grads, group_of)
            return
        flat_g = torch.cat([g.reshape(-1).float() if g is not None else p.new_zeros(p.numel(), dtype=torch.float32)
                            for p, g in zip(self._flat_params, grads)], out=self._flat_buffer("grad"))
        inactive, bad = self._inactive_tensors(grads, flat_g)
        if bad:
            warnings.warn(f"{type(self).__name__}: non-finite gradient (or one whose square overflows float32) "
                          f"in {', '.join(bad)}; skipped the update of these tensors this step",
                          RuntimeWarning, stacklevel=_CALLER)
        if len(inactive) == self.graph.num_tensors:
            return
        off = set(inactive)
        active = [k for k in range(self.graph.num_tensors) if k not in off]

        flat_p = torch.cat([p.detach().reshape(-1).float() for p in self._flat_params], out=self._flat_buffer("param"))
        ranges = [self.graph.tensor_slices[k] for k in inactive]
        for r in ranges:
            flat_g[r] = 0.0
        # step_no_grad may update the statistics in place: keep what skipped tensors must get back
        kept = [(r, self._flat_state["m"][:, r].clone(), self._flat_state["v"][r].clone()) for r in ranges]
        state = self._step_state(active, flat_p.device)
        # the metanetwork always runs in float32, even inside a caller's autocast region
        with torch.autocast(device_type=flat_p.device.type, enabled=False):
            update, new_state = self.lopt.step_no_grad(self.graph, flat_p, flat_g, state)

        for r, m, v in kept:
            new_state["m"][:, r] = m
            new_state["v"][r] = v
            update[r] = 0.0
        if not _all_finite(update):
            warnings.warn(f"{type(self).__name__}: the learned optimizer produced non-finite updates; "
                          "those entries were not changed", RuntimeWarning, stacklevel=_CALLER)
            update = torch.nan_to_num(update, nan=0.0, posinf=0.0, neginf=0.0)
        for key in ("m", "v"):
            if new_state[key] is not self._flat_state[key]:
                self._flat_state[key].copy_(new_state[key])
        if self._log_lr is not None:  # skipped tensors keep their multiplier
            self._log_lr[active] = new_state["log_lr"][active]
        self._steps[active] += 1.0  # in place: self.state[p]["step"] are views

        chunks = update.split(self.graph.numels)
        by_group: dict[int, list[int]] = {}
        for k in active:
            by_group.setdefault(group_of[k], []).append(k)
        for gi, ks in by_group.items():
            group = self.param_groups[gi]
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if lr == 0.0:
                continue
            params = [self._flat_params[k] for k in ks]
            if wd != 0.0:  # decoupled, from the parameters the update was computed at
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, [chunks[k].view(p.shape).to(p.dtype) for k, p in zip(ks, params)], alpha=lr)


    def _bad_gradients(self, grads: list[Tensor | None]) -> list[int]:
        """Indices (flat order) of tensors whose gradient is non-finite or whose
        sum of squares overflows float32; one norm per tensor, no flat copy."""
        present = [k for k, g in enumerate(grads) if g is not None]
        if not present:
            return []
        norms = torch.stack(torch._foreach_norm([grads[k].float() if grads[k].dtype != torch.float32 else grads[k]
                                                 for k in present])).float()
        ok = torch.isfinite(norms * norms)
        if bool(ok.all()):
            return []
        return [present[i] for i in (~ok).nonzero().flatten().tolist()]

    def _run_step(self, params: list[Tensor], grads: list[Tensor | None], state: dict[str, Tensor], sink,
                  write: list[bool]) -> None:
        self.lopt.step_entries(self.graph, params, grads, state, sink, write)

    def _step_by_runs(self, grads: list[Tensor | None], group_of: list[int]) -> None:
        """The chunked step without flat copies (``LearnedOptimizer.step_entries``):
        parameters and gradients are read tensor by tensor and each run's update
        is applied as soon as it is computed, so the step's working set is a few
        run-sized blocks beside the statistics."""
        grads = list(grads)
        bad = self._bad_gradients(grads)
        if bad:
            names = [self.graph.param_names[self.graph.flat_order[k]] for k in bad]
            warnings.warn(f"{type(self).__name__}: non-finite gradient (or one whose square overflows float32) "
                          f"in {', '.join(names)}; skipped the update of these tensors this step",
                          RuntimeWarning, stacklevel=_CALLER + 1)
            for k in bad:
                grads[k] = None
        active = [k for k, g in enumerate(grads) if g is not None]
        if not active:
            return
        counts = self._steps[active]
        clock = float(counts.max())
        device = self.graph.device
        state = dict(self._flat_state, step=torch.tensor(clock, device=device))
        if bool((counts != clock).any()):
            state["tensor_step"] = self._steps.clone()
        if getattr(self, "_log_lr", None) is not None:
            state["log_lr"] = self._log_lr
        write = [g is not None for g in grads]
        params_1d = [p.detach().reshape(-1) for p in self._flat_params]   # views where contiguous
        grads_1d = [g.reshape(-1) if g is not None else None for g in grads]
        hyper = {}
        for k in active:
            group = self.param_groups[group_of[k]]
            hyper[k] = (float(group["lr"]), float(group["weight_decay"]))
        starts = [sl.start for sl in self.graph.tensor_slices]
        pending: dict[int, Tensor] = {}   # updated copies of non-contiguous parameters
        nonfinite = False

        kernels = self.lopt.kernels(device)

        def sink(k: int, s: int, e: int, u: Tensor) -> None:
            nonlocal nonfinite
            lr, wd = hyper[k]
            p = self._flat_params[k]
            if p.is_contiguous():
                target = p.detach().view(-1)
            else:
                if k not in pending:
                    pending[k] = p.detach().reshape(-1).clone()
                target = pending[k]
            seg = target[s - starts[k]:e - starts[k]]
            if (kernels is not None and lr != 0.0 and seg.dtype == torch.float32
                    and u.dtype == torch.float32 and u.is_contiguous()):
                # one pass on this thread: p = p (1 - lr wd) + lr u, non-finite u -> 0
                nonfinite |= kernels.l2o_apply(e - s, seg.data_ptr(), u.data_ptr(), lr, 1.0 - lr * wd) > 0
                return
            if not _all_finite(u):
                nonfinite = True
                torch.nan_to_num_(u, nan=0.0, posinf=0.0, neginf=0.0)
            if lr == 0.0:
                return
            if wd != 0.0:  # decoupled, from the parameters the update was computed at
                seg.mul_(1.0 - lr * wd)
            seg.add_(u.to(p.dtype), alpha=lr)

        with torch.autocast(device_type=device.type, enabled=False):
            self._run_step(params_1d, grads_1d, state, sink, write)
        for k, flat in pending.items():
            self._flat_params[k].detach().copy_(flat.view_as(self._flat_params[k]))
        if getattr(self, "_log_lr", None) is not None:  # skipped tensors keep their multiplier
            self._log_lr[active] = state["log_lr"][active]
        if nonfinite:
            warnings.warn(f"{type(self).__name__}: the learned optimizer produced non-finite updates; "
                          "those entries were not changed", RuntimeWarning, stacklevel=_CALLER + 1)
        self._steps[active] += 1.0  # in place: self.state[p]["step"] are views


LEAN_GRAPH_UNCACHED_PARAMS = 1_000_000


def _model_and_groups(cls_name: str, params, model: nn.Module | None, graph_model: nn.Module | None = None):
    """``(model or None, param groups or None)`` from the two call forms:
    ``Opt(model)`` (one group of all its parameters) and ``Opt(params, model=model)``
    (``graph_model=``: the same, under a name HF Trainer does not intercept)."""
    if graph_model is not None:
        if model is not None and unwrap_model(model) is not unwrap_model(graph_model):
            raise ValueError(f"{cls_name} got two different models (model= and graph_model=)")
        model = graph_model
    if isinstance(params, nn.Module):
        if model is not None and unwrap_model(model) is not unwrap_model(params):
            raise ValueError(f"{cls_name} got two different models (as params and as model=)")
        return unwrap_model(params), None
    return (unwrap_model(model) if model is not None else None), params


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
    """

    def __init__(self, params, weights="pretrained", lr: float | Tensor = 1.0,
                 example_inputs=None, strict: bool = False, *, model: nn.Module | None = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 graph_model: nn.Module | None = None):
        model, groups = _model_and_groups("GMNOptimizer", params, model, graph_model)
        if model is None:
            raise TypeError("GMNOptimizer needs the model (an nn.Module) to build its parameter graph: "
                            "GMNOptimizer(model) or GMNOptimizer(params, model=model); "
                            "for a bare parameter list use l2o.MLPOptimizer")
        from .graph import build_graph

        # a large model's graph is not cached by the builder: once anything
        # reads its per-entry index tensors (32 bytes per parameter, written on
        # first read: l2o/graph/factored.py) the cache would keep them alive
        # beside the optimizer's lean copy
        large = sum(p.numel() for p in model.parameters()) >= LEAN_GRAPH_UNCACHED_PARAMS
        graph = build_graph(model, example_inputs=example_inputs, strict=strict, use_cache=not large)
        named = dict(model.named_parameters())
        all_params = [named[n] for n in graph.param_names]
        super().__init__(all_params, graph, _resolve_lopt(weights, "gmn"), lr=lr, model=model,
                         param_groups=groups, weight_decay=weight_decay, betas=betas)


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
                 betas: tuple[float, float] = (0.9, 0.999), graph_model: nn.Module | None = None):
        model, groups = _model_and_groups("MLPOptimizer", params, model, graph_model)
        if model is not None:
            named = list(model.named_parameters())
            names, all_params = [n for n, _ in named], [p for _, p in named]
        else:
            groups = _param_groups(groups)
            names, all_params, seen = None, [], set()
            for group in groups:
                for p in _tensors_of(group):
                    if id(p) not in seen:
                        seen.add(id(p))
                        all_params.append(p)
        if not all_params:
            raise ValueError("MLPOptimizer got an empty parameter list")
        layout = tensor_layout([p.shape for p in all_params], names)
        super().__init__(all_params, layout, _resolve_lopt(weights, "mlp"), lr=lr, model=model,
                         param_groups=groups, weight_decay=weight_decay, betas=betas)


class ShardedGMNOptimizer(GMNOptimizer):
    """:class:`GMNOptimizer` with its work and state split over the ranks of a
    ``torch.distributed`` process group (DDP / ZeRO-1 style).

    Every rank holds the whole model and the same (DDP-averaged) gradients;
    rank ``r`` owns the flat entries ``[bounds[r], bounds[r+1])``
    (:func:`l2o.fast.gmn.shard_bounds`: nearly equal shares, cut on edge-run
    bounds). A step runs the chunked GMN step on the owned edges and entries
    only; what crosses entries -- each tensor's feature sums of squares
    ``[T, F]``, the node-held entries' features ``[F, M]`` and, per round,
    the messages summed onto nodes ``2 x [edge_dim, N]`` -- is all-reduced,
    so each rank computes the node states of the whole graph and the same
    updates the unsharded optimizer computes, to float rounding (sums in
    another order). Then every owned segment of every tensor is broadcast
    from its owner. The statistics ``m``, ``v`` (20 bytes per parameter)
    exist for the owned entries only: per-rank state falls as ``1/world``.

    ``state_dict()`` holds this rank's shard (``self.state[p]``: ``m`` ``[4, L]``
    and ``v`` ``[L]`` over the owned part of ``p``, flat, with ``shard`` =
    its (start, stop) within ``p``, and the replicated ``log_lr`` of the
    step-size controller, whose per-tensor sums are all-reduced like the
    features'); restoring one is not supported yet, nor ``add_param_group``
    after construction.

    With FSDP2 (``fully_shard``) each rank holds a row shard of every
    parameter (DTensor, dim 0) and its gradient: the owned entries are then
    those rows (a dense block's runs are row ranges, so the same step
    applies with ``Shard`` ranges per tensor instead of one flat range), and
    the broadcast is not needed; see README "Sharded step".
    """

    def __init__(self, params, weights="pretrained", lr: float | Tensor = 1.0, example_inputs=None,
                 strict: bool = False, *, model: nn.Module | None = None, process_group=None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 graph_model: nn.Module | None = None):
        import torch.distributed as dist
        from .fast.features import Shard
        self._pg = process_group
        self._rank, self._world = dist.get_rank(process_group), dist.get_world_size(process_group)

        def all_reduce(t: Tensor) -> None:
            dist.all_reduce(t, group=self._pg)

        self._all_reduce = all_reduce
        self._shard_class = Shard
        super().__init__(params, weights, lr, example_inputs, strict, model=model, weight_decay=weight_decay,
                         betas=betas, graph_model=graph_model)

    def _initial_state(self, params: list[Tensor]) -> dict[str, Tensor]:
        from .fast.gmn import shard_bounds
        self._bounds = shard_bounds(self.graph, self._world)
        lo, hi = self._bounds[self._rank], self._bounds[self._rank + 1]
        self._shard = self._shard_class(lo, hi, self._all_reduce)
        init = F_.init_state(torch.empty(hi - lo, device=self.graph.device))
        return {"m": init["m"], "v": init["v"]}

    def _owned(self, k: int) -> tuple[int, int]:
        """Tensor ``k``'s owned entries (flat indices, possibly empty)."""
        sl = self.graph.tensor_slices[k]
        return max(sl.start, self._shard.lo), min(sl.stop, self._shard.hi)

    def _point_state_views(self) -> None:
        grouped = self._group_index()
        lo = self._shard.lo
        for k, p in enumerate(self._flat_params):
            if grouped[k] < 0:
                self.state.pop(p, None)
                continue
            s, e = self._owned(k)
            e = max(s, e)
            start = self.graph.tensor_slices[k].start
            self.state[p] = {"step": self._steps[k], "m": self._flat_state["m"][:, s - lo:e - lo],
                             "v": self._flat_state["v"][s - lo:e - lo],
                             "shard": torch.tensor([s - start, e - start])}
            if self._log_lr is not None:
                self.state[p]["log_lr"] = self._log_lr[k]

    def _adopt_frame(self) -> None:
        self._frame = None
        from .fast.gmn import gmn_plan
        gmn_plan(self.graph)
        self.graph = lean_graph(self.graph)
        self._point_state_views()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise NotImplementedError("ShardedGMNOptimizer: add_param_group after construction is not supported")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError("ShardedGMNOptimizer: restoring a sharded state is not supported yet")

    def _sync_device(self) -> None:
        if self._flat_params[0].device != self.graph.device:
            raise NotImplementedError("ShardedGMNOptimizer: the model moved after the optimizer was built")

    def _learned_step(self) -> None:
        self._check_unchanged()
        self._sync_device()
        group_of = self._group_index()
        grads = [p.grad if gi >= 0 and p.requires_grad else None for p, gi in zip(self._flat_params, group_of)]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("ShardedGMNOptimizer does not support sparse gradients")
        if any(not p.is_contiguous() for p in self._flat_params):
            raise RuntimeError("ShardedGMNOptimizer needs contiguous parameters")
        self._step_by_runs(grads, group_of)
        self._broadcast_owned()

    def _run_step(self, params, grads, state, sink, write) -> None:
        from .fast.gmn import gmn_run_step
        if self.lopt.adapt:
            sink = self.lopt.controlled_sink(self.graph, grads, state, sink, write, shard=self._shard)
        gmn_run_step(self.lopt, self.graph, params, grads, state, sink, write, shard=self._shard)

    def _broadcast_owned(self) -> None:
        """Every rank's updated segments to every rank (the same order everywhere)."""
        import torch.distributed as dist
        for k, p in enumerate(self._flat_params):
            flat, sl = p.detach().view(-1), self.graph.tensor_slices[k]
            for r in range(self._world):
                s, e = max(sl.start, self._bounds[r]), min(sl.stop, self._bounds[r + 1])
                if e > s:
                    dist.broadcast(flat[s - sl.start:e - sl.start], src=r, group=self._pg)
