"""The learned-optimizer contract shared by the GMN and the graph-free baseline.

A learned optimizer is an ``nn.Module`` that maps one training step's inputs to
an update, functionally::

    state = lopt.init_state(flat_params)
    update, state = lopt(graph, flat_params, flat_grads, state)
    flat_params = flat_params + lr * update

Flat vectors are laid out by the :class:`~l2o.graph.ParamGraph`. Subclasses only
implement :meth:`predict`, which turns per-entry features into two numbers per
entry, a direction ``d`` and a log-magnitude ``s``. The update is

.. math::
    \\Delta = -\\exp(\\hat s)\\,\\big(w_{nom}\\,a + \\alpha\\,d\\big), \\qquad
    \\hat s = c\\tanh(s / c)

where ``a`` is the bias-corrected Adam direction (the *nominal* term, Harrison
et al. 2022) with learned weight ``w_nom = exp(log_nominal)`` (initially Adam's
usual 1e-3), ``alpha`` a small output scale (Metz et al. 2022) and ``c`` bounds
the learned log step multiplier. With the output layers initialised near zero a
fresh learned optimizer is Adam(lr=1e-3) plus a small perturbation: it trains,
and meta-training only has to learn how to do better.

With ``relative=True`` the update is measured in units of each parameter
tensor's scale (as in Adafactor's relative step and Celo):

.. math::
    \Delta_{rel} = \Delta \cdot \sqrt{\mathrm{rms}(W)^2 + \rho^2}

where ``rms(W)`` is the root-mean-square of the tensor the entry belongs to,
before the step, and ``rho`` (``scale_floor``) keeps zero-initialised tensors
moving. Every input feature is already RMS-normalised, so a relative learned
optimizer is invariant to rescaling a tensor (above the floor): it cannot
learn one absolute step size that only suits the scales of its meta-training
models, which is where the absolute form lost to per-task tuned Adam.

With ``adapt=True`` each tensor ``k`` also carries a log step multiplier
``\ell_k`` (state ``log_lr``) that a step-size controller moves every step:

.. math::
    \ell_k \leftarrow \mathrm{clip}\big(\ell_k + \beta\,\cos(g_t, m_{t-1})_k,\ \pm b\big),
    \qquad \Delta_k \leftarrow e^{\ell_k}\,\Delta_k

where ``cos`` is the cosine between the tensor's new gradient and its
momentum (Adam's ``beta1`` one) before this step: the same sign means the
last steps were too short to turn the gradient (grow), the opposite sign
means they overshot (shrink). This is the hypergradient of the loss with
respect to a per-tensor log learning rate, normalised (Baydin et al. 2018,
"online learning-rate adaptation with hypergradient descent"); ``beta`` is
``adapt_rate`` (a fixed constant unless ``adapt_learned``: meta-learned over
truncated unrolls it grew 10x within 1,000 outer steps -- a larger rate always
pays over a 10-step truncation -- and the optimizer diverged on longer runs).
It is how the optimizer finds each task's
step size on its own, which is what per-task tuning buys Adam.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import features as F_
from .fast import native, use_fast_path
from .fast.features import Sink
from .graph.param_graph import ParamGraph


class LearnedOptimizer(nn.Module):
    kind: str = "base"

    def __init__(self, out_scale: float = 1e-3, nominal: bool = True, nominal_lr: float = 1e-3,
                 max_log_step: float = 3.0, relative: bool = False, scale_floor: float = 1e-2,
                 adapt: bool = False, adapt_rate: float = 0.1, adapt_bound: float = 3.0,
                 adapt_learned: bool = False):
        super().__init__()
        if not scale_floor > 0:
            raise ValueError(f"scale_floor must be > 0, got {scale_floor}")
        if adapt and not (adapt_rate > 0 and adapt_bound > 0):
            raise ValueError(f"adapt_rate and adapt_bound must be > 0, got {adapt_rate}, {adapt_bound}")
        self.relative = bool(relative)
        self.scale_floor = float(scale_floor)
        self.adapt = bool(adapt)
        self.adapt_rate, self.adapt_bound = float(adapt_rate), float(adapt_bound)
        self.adapt_learned = bool(adapt_learned)
        if self.adapt:  # registered only when used: weights saved without it keep loading
            self.log_adapt_rate = nn.Parameter(torch.tensor(math.log(adapt_rate)), requires_grad=self.adapt_learned)
        self.out_scale = float(out_scale)
        self.nominal = bool(nominal)
        self.max_log_step = float(max_log_step)
        self.nominal_lr = float(nominal_lr)  # initial value; the learned one is in log_nominal
        self.log_nominal = nn.Parameter(torch.tensor(math.log(nominal_lr)), requires_grad=self.nominal)

    # -------------------------------------------------------------- contract
    def config(self) -> dict[str, Any]:
        """Constructor arguments; ``type(self)(**config())`` rebuilds the module."""
        return {
            "out_scale": self.out_scale,
            "nominal": self.nominal,
            "nominal_lr": self.nominal_lr,
            "max_log_step": self.max_log_step,
            # absent from configs saved before relative updates existed: their defaults rebuild them
            **({"relative": True, "scale_floor": self.scale_floor} if self.relative else {}),
            **({"adapt": True, "adapt_rate": self.adapt_rate, "adapt_bound": self.adapt_bound,
                "adapt_learned": self.adapt_learned} if self.adapt else {}),
        }

    def init_state(self, flat_params: Tensor) -> dict[str, Tensor]:
        return F_.init_state(flat_params)

    def predict(self, graph: ParamGraph, x: Tensor, t: Tensor) -> Tensor:
        """[n, 2] (direction, log-magnitude) from entry features ``x`` [n, F]
        and time features ``t`` [T]."""
        raise NotImplementedError

    def forward(self, graph: ParamGraph, params: Tensor, grad: Tensor,
                state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        log_lr = self.adapted_log_lr(graph, grad, state)   # reads the momentum before this step
        scale = self.update_scale(graph, params, log_lr)
        state = F_.update_state(state, grad)
        adam = F_.adam_direction(state)
        x = F_.entry_features(params, grad, state, adam, graph.tensor_id, graph.num_tensors)
        out = self.predict(graph, x, F_.time_features(state["step"]))
        direction, log_step = out[:, 0], out[:, 1]
        log_step = self.max_log_step * torch.tanh(log_step / self.max_log_step)
        step = self.out_scale * direction
        if self.nominal:
            step = step + self.log_nominal.exp() * adam
        update = -(step * log_step.exp())
        if scale is not None:
            update = update * scale
        if log_lr is not None:
            state = {**state, "log_lr": log_lr}
        return update, state

    def update_scale(self, graph: ParamGraph, params: Tensor, log_lr: Tensor | None) -> Tensor | None:
        """[n] what each entry's update is multiplied by (None: nothing):
        ``sqrt(rms(W)^2 + scale_floor^2)`` of the tensor ``W`` holding it when
        ``relative``, times ``exp(log_lr)`` of that tensor when ``adapt``."""
        per_tensor = None
        if self.relative:
            p = params.float()
            sums = p.new_zeros(graph.num_tensors).index_add_(0, graph.tensor_id, p * p)
            per_tensor = (sums / _entry_counts(graph) + self.scale_floor ** 2).sqrt()
        if log_lr is not None:
            per_tensor = log_lr.exp() if per_tensor is None else per_tensor * log_lr.exp()
        return None if per_tensor is None else per_tensor.index_select(0, graph.tensor_id)

    def adapted_log_lr(self, graph: ParamGraph, grad: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """[T] the per-tensor log step multipliers after this step's controller
        update (None without ``adapt``); ``state`` is the state *before* the
        step. A tensor with a zero gradient (skipped) keeps its multiplier."""
        if not self.adapt:
            return None
        g, m = grad.float(), state["m"][F_.ADAM_BETA1_INDEX]
        sums = g.new_zeros(3, graph.num_tensors)
        sums[0].index_add_(0, graph.tensor_id, g * m)
        sums[1].index_add_(0, graph.tensor_id, g * g)
        sums[2].index_add_(0, graph.tensor_id, m * m)
        return self._advance_log_lr(state, sums)

    def _advance_log_lr(self, state: dict[str, Tensor], sums: Tensor) -> Tensor:
        """The controller's update from each tensor's ``<g, m>``, ``<g, g>``, ``<m, m>`` (``sums`` [3, T])."""
        cos = sums[0] / (sums[1] * sums[2] + 1e-30).sqrt()
        prev = state.get("log_lr")
        prev = sums.new_zeros(sums.shape[1]) if prev is None else prev
        return (prev + self.log_adapt_rate.exp() * cos).clamp(-self.adapt_bound, self.adapt_bound)

    # ------------------------------------------------------ no-grad stepping
    # A subclass with a chunked implementation (l2o/fast) names it here:
    # chunked_step(lopt, graph, params, grad, state) -> (update, state), the
    # flat form, whose function carries ``run_step(lopt, graph, entries, state,
    # sink, write) -> state``, the per-tensor form the optimizers use;
    # chunked_frame(lopt, graph, device) -> (plan, run-sized frame).
    chunked_step = None
    chunked_frame = None

    def kernel_widths(self) -> dict[str, int] | None:
        """The widths of this metanetwork's fused C kernels
        (:func:`l2o.fast.native.load` keywords), or None when it has none."""
        return None

    def kernels(self, device: torch.device):
        """The fused C kernels of this metanetwork for ``device``
        (:mod:`l2o.fast.native`: CPU and float32 only), or None."""
        widths = self.kernel_widths()
        if widths is None or torch.device(device).type != "cpu":
            return None
        if any(p.dtype != torch.float32 for p in self.parameters()):
            return None
        return native.load(F_.NUM_ENTRY_FEATURES, **widths)

    def _uses_chunked_step(self, graph: ParamGraph, device: torch.device) -> bool:
        if self.chunked_step is None:
            return False
        n, t = graph.num_params, graph.num_tensors
        # the kernels are looked up (and built, once) only where they decide the path
        return use_fast_path(n, device, t) or (use_fast_path(n, device, t, fused=True)
                                                and self.kernels(device) is not None)

    def uses_run_step(self, graph: ParamGraph, device: torch.device) -> bool:
        """Whether :meth:`step_entries` applies (the chunked path, with a per-tensor form)."""
        return (self._uses_chunked_step(graph, device)
                and getattr(type(self).chunked_step, "run_step", None) is not None)

    def step_no_grad(self, graph: ParamGraph, params: Tensor, grad: Tensor,
                     state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """What ``forward`` returns, for optimizers that need no autograd. On
        the chunked path (:mod:`l2o.fast`) ``state``'s buffers are updated in
        place; its working set beyond the returned update is a few run-sized
        blocks (no model-sized temporaries)."""
        if not self._uses_chunked_step(graph, params.device):
            return self(graph, params, grad, state)
        log_lr = self.adapted_log_lr(graph, grad, state)  # before the step changes the momenta in place
        update, state = self.chunked_step(graph, params, grad, state)
        if log_lr is not None:
            update.mul_(log_lr.exp().index_select(0, graph.tensor_id))
            state["log_lr"] = log_lr
        return update, state

    def step_entries(self, graph: ParamGraph, params: list[Tensor], grads: list[Tensor | None],
                     state: dict[str, Tensor], sink: Sink, write: list[bool] | None = None) -> dict[str, Tensor]:
        """:meth:`step_no_grad` without flat copies (needs :meth:`uses_run_step`):
        ``params`` / ``grads`` are 1-D tensors per tensor of ``graph``'s flat
        order (a ``None`` gradient reads as zeros); ``state`` (flat ``m``,
        ``v``, ``step`` and optionally ``tensor_step`` [T], each tensor's count
        before this step, for its bias correction) advances in place for the
        tensors ``write`` allows (default all), and each update run of those
        tensors goes to ``sink(k, start, stop, update)`` (flat indices; the
        update is a workspace, valid during the call, relative scale included).
        Every update is computed from ``params`` as they were when the step
        began: a sink may change a run's parameters once it has its update."""
        if self.adapt:
            sink = self.controlled_sink(graph, grads, state, sink, write)
        return type(self).chunked_step.run_step(self, graph, params, grads, state, sink, write)

    def controlled_sink(self, graph: ParamGraph, grads: list[Tensor | None], state: dict[str, Tensor], sink: Sink,
                        write: list[bool] | None = None, shard=None) -> Sink:
        """The controller's step (``adapt``) for :meth:`step_entries`: sets
        ``state["log_lr"]`` from the momenta *before* the step and returns
        ``sink`` with each tensor's update scaled by its multiplier. Tensors
        ``write`` leaves alone keep their multiplier. With a ``shard``
        (:class:`l2o.fast.features.Shard`) ``state["m"]`` covers the owned
        entries only: each rank sums its part and the sums are all-reduced,
        so every rank holds the same multipliers."""
        m = state["m"][F_.ADAM_BETA1_INDEX]
        lo = shard.lo if shard is not None else 0
        sums = m.new_zeros(3, graph.num_tensors)
        for k, (sl, g) in enumerate(zip(graph.tensor_slices, grads)):  # tensor by tensor: no flat copy
            s, e = shard.clip(sl.start, sl.stop) if shard is not None else (sl.start, sl.stop)
            if g is not None and e > s:
                gk, mk = g[s - sl.start:e - sl.start].float(), m[s - lo:e - lo]
                sums[:, k] = torch.stack([torch.dot(gk, mk), torch.dot(gk, gk), torch.dot(mk, mk)])
        if shard is not None:
            shard.all_reduce(sums)
        log_lr = self._advance_log_lr(state, sums)
        if write is not None:
            keep = ~torch.tensor(write, device=log_lr.device)
            log_lr[keep] = state["log_lr"][keep] if "log_lr" in state else 0.0
        state["log_lr"] = log_lr
        multiplier = log_lr.exp().tolist()

        def scaled(k: int, s: int, e: int, u: Tensor) -> None:
            sink(k, s, e, u.mul_(multiplier[k]))
        return scaled

    def flat_workspace(self, graph: ParamGraph, device: torch.device) -> dict[str, Tensor] | None:
        """Kept for compatibility: the chunked step no longer keeps model-sized
        workspaces, so there is nothing to share; always ``None``."""
        return None

    def folded_head(self, head: nn.Linear) -> tuple[Tensor, Tensor]:
        """``head``'s (weight, bias as a column) with the constants of the
        update formula folded in, for :meth:`finish_update_`: the direction row
        times ``-alpha``, the log-magnitude row times ``2 / c``."""
        scale = head.weight.new_tensor([-self.out_scale, 2.0 / self.max_log_step]).unsqueeze(1)
        return head.weight * scale, (head.bias.unsqueeze(1) * scale)

    def nominal_weight(self) -> float:
        """The learned weight of the nominal Adam term (0 without one), for
        the no-grad step's update formula."""
        return float(self.log_nominal.exp()) if self.nominal else 0.0

    def finish_update_(self, out: Tensor, direction: Tensor, log_step: Tensor, adam: Tensor) -> Tensor:
        """``forward``'s final formula, in place, from the outputs of
        :meth:`folded_head`; writes the update into ``out`` (``log_step`` is
        overwritten). Uses ``c tanh(s / c) = 2c sigmoid(2s / c) - c``:
        sigmoid is several times cheaper than tanh on CPU."""
        c = self.max_log_step
        magnitude = log_step.sigmoid_().mul_(2.0 * c).sub_(c).exp_()
        if self.nominal:
            torch.add(direction, adam, alpha=-self.nominal_weight(), out=out)
        else:
            out.copy_(direction)
        return out.mul_(magnitude)


def _entry_counts(graph: ParamGraph) -> Tensor:
    """[T] entries of each tensor (cached on the graph: it is static)."""
    cached = getattr(graph, "_l2o_entry_counts", None)
    if cached is None or cached.device != graph.tensor_id.device:
        cached = torch.bincount(graph.tensor_id, minlength=graph.num_tensors).clamp(min=1).float()
        graph._l2o_entry_counts = cached
    return cached


def small_init_(linear: nn.Linear, scale: float = 1e-2) -> nn.Linear:
    """Output layers start near zero so a fresh optimizer is its nominal term."""
    with torch.no_grad():
        linear.weight.mul_(scale)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear
