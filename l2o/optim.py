"""``torch.optim.Optimizer`` drop-ins driven by a learned optimizer.

    opt = GMNOptimizer(model)                  # shipped pretrained weights
    opt = GMNOptimizer(model, weights=None)    # untrained metanetwork (~Adam, lr 1e-3)
    opt = MLPOptimizer(model.parameters(), weights="mlp.safetensors")

Design notes:

* State lives in two flat buffers (momenta ``m`` [num_momenta, n],
  feature-major, second moment ``v`` [n]) laid out by the ParamGraph;
  ``self.state[p]`` holds *views* into them (``m`` as [num_momenta, *p.shape]),
  so ``state_dict()`` has per-parameter tensors while ``step`` works on the
  flat buffers. On CPU the flat params, grads and ``m`` sit inside the chunked
  step's workspace (``l2o/fast``), which each optimizer owns through its
  private copy of the graph; that costs ~70 bytes per parameter held between
  steps for the GMN (~40 for the MLP baseline) instead of a larger transient peak.
* ``lr`` (per param group) multiplies the learned step, so
  ``torch.optim.lr_scheduler`` works unchanged; ``lr=1.0`` is the step the
  metanetwork was meta-trained to take.
* A tensor whose gradient is ``None`` (unused, frozen) or non-finite (or
  whose square overflows float32) is left untouched for that step, and so is
  its state; non-finite gradients warn. Entries whose *update* comes out
  non-finite are not changed either (with a warning); their statistics, which
  depend on finite gradients only, do advance.
"""
from __future__ import annotations

import copy
import os
import warnings
import weakref
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import checkpoint
from .graph.param_graph import ParamGraph
from .layout import tensor_layout
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


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite. NaN and inf propagate through a sum, so a
    finite sum settles it in one streaming reduction (isfinite is several
    passes); only a sum that overflowed needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class LearnedOptimizerBase(torch.optim.Optimizer):
    """Runs a :class:`~l2o.lopt.LearnedOptimizer` over a fixed flat layout."""

    def __init__(self, params: list[nn.Parameter], graph: ParamGraph, lopt: LearnedOptimizer,
                 lr: float = 1.0, model: nn.Module | None = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning-rate multiplier: {lr}")
        if len(params) != len(graph.param_names):
            raise ValueError(f"layout covers {len(graph.param_names)} tensors, got {len(params)} parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__} needs all parameters on one device, got {sorted(map(str, devices))} "
                             "(model-parallel / device_map='auto' models are not supported)")
        self._ready = False
        super().__init__(params, dict(lr=lr))
        self._ready = True
        # to notice layers added to / parameters replaced in the model after construction
        self._model_ref = weakref.ref(model) if model is not None else None
        self._param_ids = tuple(id(p) for p in model.parameters()) if model is not None else None
        device = params[0].device
        self.graph = graph.to(device)
        self.lopt = lopt.to(device).eval()
        for p in self.lopt.parameters():
            p.requires_grad_(False)
        self._params = params            # model order == graph.param_names order
        self._flat_params = [params[i] for i in graph.flat_order]
        self._flat_state = self.lopt.init_state(self.graph.gather([p.detach() for p in params]))
        self.param_groups[0].setdefault("step", 0)
        self._adopt_frame()

    def __getstate__(self) -> dict:
        # torch's Optimizer keeps only defaults/state/param_groups, but the
        # graph, metanetwork and flat buffers are what this optimizer steps with
        # (copy.deepcopy((model, opt)) must give a working pair). A weak
        # reference to the model neither pickles nor follows a copied model.
        state = dict(self.__dict__)
        state["_model_ref"] = None
        return state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise NotImplementedError(
                f"{type(self).__name__} optimizes one fixed set of parameters (its graph is built once); "
                "create a new optimizer for a different set")
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- state
    def _point_state_views(self) -> None:
        """Make ``self.state[p]`` views into the flat buffers."""
        m_chunks = self._flat_state["m"].split(self.graph.numels, dim=1)
        v_chunks = self._flat_state["v"].split(self.graph.numels)
        for p, m, v in zip(self._flat_params, m_chunks, v_chunks):
            # m: [num_momenta, *p.shape], a view into the feature-major flat buffer
            self.state[p] = {"m": m.view(m.shape[0], *p.shape), "v": v.view(p.shape)}

    def _adopt_frame(self) -> None:
        """Keep the flat params, grads and momenta where the learned
        optimizer's no-grad step reads them (saves a copy of each per step on
        large models); then point ``self.state`` at the momenta."""
        self._frame = self.lopt.flat_workspace(self.graph, self.graph.device)
        if self._frame is not None:
            self._frame["m"].copy_(self._flat_state["m"])
            self._flat_state["m"] = self._frame["m"]
        self._point_state_views()

    def state_dict(self) -> dict:
        # The metanetwork's weights travel with the state, so a restored
        # optimizer continues identically even when it was built with weights=None.
        sd = super().state_dict()
        # A snapshot, not views: m may live in a larger workspace (torch.save would
        # write it whole) and both would keep changing with later steps.
        sd["state"] = {k: {name: t.clone() for name, t in v.items()} for k, v in sd["state"].items()}
        sd["lopt"] = {"kind": self.lopt.kind, "config": self.lopt.config(),
                      "weights": {k: v.detach().clone() for k, v in self.lopt.state_dict().items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lopt_record = state_dict.pop("lopt", None)
        if lopt_record is not None:
            if lopt_record["kind"] != self.lopt.kind or lopt_record["config"] != self.lopt.config():
                raise ValueError(
                    f"state_dict was saved with a {lopt_record['kind']} metanetwork of config "
                    f"{lopt_record['config']}, this optimizer has {self.lopt.kind} {self.lopt.config()}")
            self.lopt.load_state_dict(lopt_record["weights"])
        raw = state_dict.get("state", {})
        missing = [k for k in self.graph.flat_order if "m" not in raw.get(k, {}) or "v" not in raw.get(k, {})]
        if missing:
            raise ValueError(f"optimizer state_dict lacks learned-optimizer state for {len(missing)} tensors")
        num_momenta = self._flat_state["m"].shape[0]
        for k in self.graph.flat_order:
            shape = self.graph.param_shapes[k]
            want_m, want_v = (num_momenta, *shape), tuple(shape)
            if tuple(raw[k]["m"].shape) != want_m or tuple(raw[k]["v"].shape) != want_v:
                raise ValueError(
                    f"optimizer state for {self.graph.param_names[k]!r} has m {tuple(raw[k]['m'].shape)} / "
                    f"v {tuple(raw[k]['v'].shape)}, expected {want_m} / {want_v} (a state_dict of another model, "
                    "or from l2o before momenta were stored feature-major)")
        # Read m/v from the saved dict itself: torch's loader casts state to the
        # parameters' dtype, which would round float32 statistics of fp16/bf16 models.
        device = self.graph.device
        flat = {
            "m": torch.cat([raw[k]["m"].reshape(raw[k]["m"].shape[0], -1) for k in self.graph.flat_order], dim=1),
            "v": torch.cat([raw[k]["v"].reshape(-1) for k in self.graph.flat_order]),
        }
        super().load_state_dict(state_dict)
        self._flat_state = {key: v.to(device=device, dtype=torch.float32) for key, v in flat.items()}
        self._flat_state["step"] = torch.tensor(float(self.param_groups[0]["step"]), device=device)
        self._adopt_frame()

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
        inactive = [g is None or not p.requires_grad for p, g in zip(self._flat_params, grads)]
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_unchanged()
        self._sync_device()
        grads = [p.grad for p in self._flat_params]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               "(e.g. nn.Embedding(sparse=True)); use dense gradients")
        flat_g = torch.cat([g.reshape(-1).float() if g is not None else p.new_zeros(p.numel(), dtype=torch.float32)
                            for p, g in zip(self._flat_params, grads)], out=self._flat_buffer("grad"))
        inactive, bad = self._inactive_tensors(grads, flat_g)
        if bad:
            warnings.warn(f"{type(self).__name__}: non-finite gradient (or one whose square overflows float32) "
                          f"in {', '.join(bad)}; skipped the update of these tensors this step",
                          RuntimeWarning, stacklevel=3)
        if len(inactive) == self.graph.num_tensors:
            return loss

        flat_p = torch.cat([p.detach().reshape(-1).float() for p in self._flat_params], out=self._flat_buffer("param"))
        ranges = [self.graph.tensor_slices[k] for k in inactive]
        for r in ranges:
            flat_g[r] = 0.0
        # step_no_grad may update the statistics in place: keep what skipped tensors must get back
        kept = [(r, self._flat_state["m"][:, r].clone(), self._flat_state["v"][r].clone()) for r in ranges]
        group = self.param_groups[0]
        state = dict(self._flat_state, step=torch.tensor(float(group["step"]), device=flat_p.device))
        # the metanetwork always runs in float32, even inside a caller's autocast region
        with torch.autocast(device_type=flat_p.device.type, enabled=False):
            update, new_state = self.lopt.step_no_grad(self.graph, flat_p, flat_g, state)

        for r, m, v in kept:
            new_state["m"][:, r] = m
            new_state["v"][r] = v
            update[r] = 0.0
        if not _all_finite(update):
            warnings.warn(f"{type(self).__name__}: the learned optimizer produced non-finite updates; "
                          "those entries were not changed", RuntimeWarning, stacklevel=3)
            update = torch.nan_to_num(update, nan=0.0, posinf=0.0, neginf=0.0)
        for key in ("m", "v"):
            if new_state[key] is not self._flat_state[key]:
                self._flat_state[key].copy_(new_state[key])
        group["step"] += 1

        chunks = update.split(self.graph.numels)
        updates = [c.view(p.shape).to(p.dtype) for p, c in zip(self._flat_params, chunks)]
        torch._foreach_add_(self._flat_params, updates, alpha=group["lr"])
        return loss


class GMNOptimizer(LearnedOptimizerBase):
    """Graph-metanetwork learned optimizer for ``model``.

    Args:
        model: the ``nn.Module`` to train; its parameter graph is built once.
        weights: ``"pretrained"`` (shipped weights), a path to a safetensors
            file from ``meta_train.py``, a ``GMNLOpt`` module, or ``None`` for
            a freshly initialised metanetwork.
        lr: multiplier of the learned step (1.0 = as meta-trained).
        example_inputs: passed to :func:`l2o.build_graph` when tracing needs shapes.
        strict: raise on modules the graph builder does not understand.
    """

    def __init__(self, model: nn.Module, weights="pretrained", lr: float = 1.0,
                 example_inputs=None, strict: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError("GMNOptimizer needs the model (an nn.Module) to build its parameter graph; "
                            "for a bare parameter list use l2o.MLPOptimizer")
        from .graph import build_graph

        model = unwrap_model(model)
        graph = build_graph(model, example_inputs=example_inputs, strict=strict)
        named = dict(model.named_parameters())
        params = [named[n] for n in graph.param_names]
        super().__init__(params, graph, _resolve_lopt(weights, "gmn"), lr=lr, model=model)


class MLPOptimizer(LearnedOptimizerBase):
    """Graph-free per-parameter learned optimizer (the ablation of the GMN).

    ``params`` is an iterable of tensors or an ``nn.Module``.
    """

    def __init__(self, params: Iterable[nn.Parameter] | nn.Module, weights="pretrained",
                 lr: float = 1.0):
        names, model = None, None
        if isinstance(params, nn.Module):
            model = params
            names, params = zip(*params.named_parameters()) if any(True for _ in params.parameters()) else ((), ())
        params = list(params)
        if params and isinstance(params[0], dict):
            raise TypeError("MLPOptimizer takes one list of parameters, not param-group dicts")
        if not params:
            raise ValueError("MLPOptimizer got an empty parameter list")
        layout = tensor_layout([p.shape for p in params], names)
        super().__init__(params, layout, _resolve_lopt(weights, "mlp"), lr=lr, model=model)
