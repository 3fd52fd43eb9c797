"""The ``torch.optim.Optimizer`` both learned optimizers derive from.

:class:`LearnedOptimizerBase` is the torch.optim side: parameter groups and
their options, ``self.state`` (views into the flat statistics), following the
model to another device, and ``step()``. The step itself is in
:mod:`l2o.optim_step`, the state dict in :mod:`l2o.optim_state`, the backend
that evaluates the metanetwork in :mod:`l2o.fast` (chosen by ``impl``).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from . import features as F_
from . import optim_state, optim_step
from .fast.backend import make_backend
from .graph.param_graph import ParamGraph
from .lopt import LearnedOptimizer


@contextlib.contextmanager
def float32_default():
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


def as_param_groups(params) -> list[dict]:
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


def tensors_of(group: dict) -> list[Tensor]:
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    for t in tensors:
        if not isinstance(t, Tensor):   # e.g. a list of modules: torch.optim would fail later, less clearly
            raise TypeError(f"optimizer params must be tensors (or (name, tensor) pairs), got {type(t).__name__}"
                            + ("; pass module.parameters(), or the model itself" if isinstance(t, nn.Module) else ""))
    return tensors


def check_hyperparameters(group: dict) -> None:
    lr, wd, betas = group["lr"], group["weight_decay"], group["betas"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"invalid learning-rate multiplier: {lr}")
    if not wd >= 0.0:
        raise ValueError(f"invalid weight_decay value: {wd}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (two values in [0, 1); recorded only, see l2o.optim's docstring)")


class LearnedOptimizerBase(torch.optim.Optimizer):
    """Runs a :class:`~l2o.lopt.LearnedOptimizer` over a fixed flat layout.

    ``params`` are all tensors of the layout, in ``graph.param_names`` order;
    ``param_groups`` (torch.optim's iterable of tensors or group dicts, or
    None for one group of all of them) choose which of them move and with
    which ``lr`` / ``weight_decay`` (see :mod:`l2o.optim`). ``impl`` picks
    the backend of the no-grad step (:func:`l2o.fast.select_impl`:
    ``"auto"``, ``"forward"``, ``"chunked"`` or ``"fused"``); ``self.backend``
    is the one in use, its ``name`` the choice ``"auto"`` made;
    ``backend_options``: keywords of a chunked backend
    (:class:`l2o.fast.backend.ChunkedBackend`).
    """

    def __init__(self, params: list[nn.Parameter], graph: ParamGraph, lopt: LearnedOptimizer,
                 lr: float | Tensor = 1.0, model: nn.Module | None = None, param_groups=None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), impl: str = "auto",
                 backend_options: dict | None = None):
        # differentiable=False as torch.optim's own (torch's __setstate__ adds it otherwise)
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), differentiable=False)
        check_hyperparameters(defaults)
        if len(params) != len(graph.param_names):
            raise ValueError(f"layout covers {len(graph.param_names)} tensors, got {len(params)} parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__} needs all parameters on one device, got {sorted(map(str, devices))} "
                             "(model-parallel / device_map='auto' models are not supported)")
        if any(p.is_complex() for p in params):
            raise TypeError(f"{type(self).__name__} does not support complex parameters")
        self._ready = False
        self.impl, self.backend, self._backend_options = impl, None, dict(backend_options or {})
        self._has_model = model is not None
        device = params[0].device
        self.graph = graph.to(device)
        self._params = params            # model order == graph.param_names order
        self._flat_params = [params[i] for i in graph.flat_order]
        self._flat_index = {id(p): k for k, p in enumerate(self._flat_params)}
        groups = [{"params": list(params)}] if param_groups is None else as_param_groups(param_groups)
        super().__init__(groups, defaults)
        # to notice layers added to / parameters replaced in the model after construction
        self._model_ref = weakref.ref(model) if model is not None else None
        self._param_ids = tuple(id(p) for p in model.parameters()) if model is not None else None
        # float32 whatever the default dtype it was created under (the step runs in float32)
        self.lopt = lopt.to(device=device, dtype=torch.float32).eval()
        for p in self.lopt.parameters():
            p.requires_grad_(False)
        with float32_default():  # the statistics and the step's plan, whatever the caller's default dtype
            self._flat_state = self._initial_state(params)
            # per-tensor step counters (flat order), on the CPU like torch.optim's
            # non-capturable "step": reading them never synchronises a GPU
            self._steps = torch.zeros(self.graph.num_tensors, dtype=torch.float32)
            # per-tensor log step multipliers of the step-size controller (LearnedOptimizer.adapt)
            self._log_lr = torch.zeros(self.graph.num_tensors, device=device) if self.lopt.adapt else None
            self._ready = True
        self._prepare_backend()

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
        state.pop("_flat_buffers", None)  # workspaces of the flat step
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
            check_hyperparameters(group)
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

    def _prepare_backend(self) -> None:
        """Build the backend ``impl`` picks for this graph on this device (it
        owns the step's workspace) and point ``self.state`` at the flat
        statistics. A chunked backend keeps the graph lean
        (:mod:`l2o.fast.lean`): its plan is built first, then the per-entry
        index tensors are dropped, and the optimizer keeps that graph."""
        with float32_default():
            self.backend = make_backend(self.lopt, self.graph, self.graph.device, self.impl, lean=True,
                                        **getattr(self, "_backend_options", {}))
        self.graph = self.backend.graph
        self._point_state_views()

    def state_dict(self) -> dict:
        """torch.optim's state dict plus the metanetwork (:mod:`l2o.optim_state`)."""
        return optim_state.state_dict(self, super().state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        optim_state.load_state_dict(self, state_dict, super().load_state_dict, self._owned)

    def _owned(self, k: int) -> tuple[int, int]:
        """The flat entries of tensor ``k`` whose statistics this optimizer keeps: all of them."""
        sl = self.graph.tensor_slices[k]
        return sl.start, sl.stop

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
        self._prepare_backend()

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with float32_default():  # after the closure: the caller's forward keeps its default dtype
            self._learned_step()
        return loss

    def _learned_step(self) -> None:
        """The gradients of the tensors that may move (in a group, requiring
        grad), stepped by the backend's form (:mod:`l2o.optim_step`)."""
        self._check_unchanged()
        self._sync_device()
        group_of = self._group_index()
        # tensors in no group and frozen ones are left alone whatever their .grad holds
        grads = [p.grad if gi >= 0 and p.requires_grad else None for p, gi in zip(self._flat_params, group_of)]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               "(e.g. nn.Embedding(sparse=True)); use dense gradients")
        if self.backend.per_tensor:
            optim_step.step_by_runs(self, grads, group_of)
        else:
            optim_step.step_flat(self, grads, group_of)
