r"""The learned-optimizer contract shared by the GMN and the graph-free baseline.

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

(:func:`l2o.update_rule.learned_update`, where the formula is defined once)
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
    \ell_k \leftarrow \mathrm{clip}\big((1-\lambda)\,\ell_k + \beta\,\cos(g_t, m_{t-1})_k,\ \pm b\big),
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

The hypergradient is greedy: it picks the step that lowers the *next* loss,
which in the noise-dominated late phase of a run is ever smaller (Wu et al.
2018, short-horizon bias). With ``lambda = 0`` a small negative mean cosine
walks ``ell`` to ``-b`` over a few thousand steps, and 10,000-step runs stall
there (docs/experiments.md, v10). ``lambda`` (``adapt_decay``) leaks the
multiplier back toward the nominal step, so it settles at
``beta E[cos] / lambda`` instead: it moves as far as the evidence is strong,
not as far as the run is long.

Near zero loss the opposite happens: a cross-entropy gradient keeps its
direction, the cosine stays positive and the multipliers climb to ``+b`` until
the loss spikes. ``gamma`` (``adapt_spike``) subtracts
``gamma relu(log(|g_t|^2 / sum(v_hat)) - log 4)`` from ``ell_k``: a tensor whose
squared gradient norm jumps above four times its running average (Adam's
second moment) shrinks its step at once, in proportion to the jump.
``alpha`` (``adapt_fade``) tells "steps too short" from "loss already ~0"
by the gradient-norm trend: the cosine's move is multiplied by
``min(1, |g_t|^2 / sum(v_hat))^alpha``, so a tensor whose gradient has faded
far below its running average (a loss converging toward zero) holds its
multiplier instead of climbing, while one whose gradient keeps its size moves
at the full rate.
``adapt_beta`` picks which kept momentum the cosine reads. ``adapt_beta``,
``adapt_decay`` and ``adapt_spike`` lost to the plain controller on the
validation split at 400 and 2,000 steps (docs/experiments.md, v10) and are off
in the shipped weights; ``adapt_fade = 1`` tied it on wins, was selected on
loss ratio (v11) and is on in the shipped GMN (off by default here).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import features as F_
from .graph.param_graph import ParamGraph
from .update_rule import learned_update


# A tensor's squared gradient norm this many times its running average counts as a spike.
SPIKE_RATIO = 4.0


class LearnedOptimizer(nn.Module):
    """The metanetwork contract (module docstring). This module and its
    subclasses define the math once, as a differentiable forward; the no-grad
    step of the optimizers implements it in ``l2o/fast`` (the backends), which
    sits above the metanetworks: nothing here imports it."""
    kind: str = "base"

    def __init__(self, out_scale: float = 1e-3, nominal: bool = True, nominal_lr: float = 1e-3,
                 max_log_step: float = 3.0, relative: bool = False, scale_floor: float = 1e-2,
                 adapt: bool = False, adapt_rate: float = 0.1, adapt_bound: float = 3.0,
                 adapt_learned: bool = False, adapt_decay: float = 0.0, adapt_beta: float = 0.9,
                 adapt_spike: float = 0.0, adapt_fade: float = 0.0):
        super().__init__()
        if not scale_floor > 0:
            raise ValueError(f"scale_floor must be > 0, got {scale_floor}")
        if adapt and not (adapt_rate > 0 and adapt_bound > 0):
            raise ValueError(f"adapt_rate and adapt_bound must be > 0, got {adapt_rate}, {adapt_bound}")
        if not 0.0 <= adapt_decay < 1.0:
            raise ValueError(f"adapt_decay must be in [0, 1), got {adapt_decay}")
        if not adapt_spike >= 0.0:
            raise ValueError(f"adapt_spike must be >= 0, got {adapt_spike}")
        if not adapt_fade >= 0.0:
            raise ValueError(f"adapt_fade must be >= 0, got {adapt_fade}")
        if adapt_beta not in F_.MOMENTUM_BETAS:
            raise ValueError(f"adapt_beta must be one of the kept momenta {F_.MOMENTUM_BETAS}, got {adapt_beta}")
        self.relative = bool(relative)
        self.scale_floor = float(scale_floor)
        self.adapt = bool(adapt)
        self.adapt_rate, self.adapt_bound = float(adapt_rate), float(adapt_bound)
        self.adapt_learned = bool(adapt_learned)
        self.adapt_decay = float(adapt_decay)
        self.adapt_beta = float(adapt_beta)
        self.adapt_spike = float(adapt_spike)
        self.adapt_fade = float(adapt_fade)
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
            # absent from configs saved before the leak existed: 0 rebuilds them
            **({"adapt_decay": self.adapt_decay} if self.adapt and self.adapt_decay else {}),
            **({"adapt_beta": self.adapt_beta} if self.adapt and self.adapt_beta != 0.9 else {}),
            **({"adapt_spike": self.adapt_spike} if self.adapt and self.adapt_spike else {}),
            **({"adapt_fade": self.adapt_fade} if self.adapt and self.adapt_fade else {}),
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
        update = learned_update(out[:, 0], out[:, 1], adam, self.out_scale,
                                self.log_nominal.exp() if self.nominal else None, self.max_log_step)
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
            counts = torch.bincount(graph.tensor_id, minlength=graph.num_tensors).clamp(min=1).float()
            per_tensor = (sums / counts + self.scale_floor ** 2).sqrt()
        if log_lr is not None:
            per_tensor = log_lr.exp() if per_tensor is None else per_tensor * log_lr.exp()
        return None if per_tensor is None else per_tensor.index_select(0, graph.tensor_id)

    def adapted_log_lr(self, graph: ParamGraph, grad: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """[T] the per-tensor log step multipliers after this step's controller
        update (None without ``adapt``); ``state`` is the state *before* the
        step. A tensor with an all-zero gradient gets no cosine (its multiplier
        only leaks, with ``adapt_decay``); the optimizers keep the multiplier of
        a tensor they skip."""
        if not self.adapt:
            return None
        g, m = grad.float(), state["m"][self.adapt_momentum_index]
        sums = g.new_zeros(4, graph.num_tensors)
        sums[0].index_add_(0, graph.tensor_id, g * m)
        sums[1].index_add_(0, graph.tensor_id, g * g)
        sums[2].index_add_(0, graph.tensor_id, m * m)
        if self.reads_second_moment:   # no pass over v without a reader
            sums[3].index_add_(0, graph.tensor_id, state["v"])
        return self.advance_log_lr(state, sums)

    @property
    def adapt_momentum_index(self) -> int:
        """Which kept momentum (``features.MOMENTUM_BETAS``) the controller's cosine reads."""
        return F_.MOMENTUM_BETAS.index(self.adapt_beta)

    @property
    def reads_second_moment(self) -> bool:
        """Whether the controller reads each tensor's ``sum(v)`` (row 3 of its sums)."""
        return bool(self.adapt_spike or self.adapt_fade)

    def advance_log_lr(self, state: dict[str, Tensor], sums: Tensor) -> Tensor:
        """The controller's update from each tensor's ``<g, m>``, ``<g, g>``,
        ``<m, m>`` and ``sum(v)`` (``sums`` [4, T]; ``v`` before this step,
        summed only when :attr:`reads_second_moment`)."""
        cos = sums[0] / (sums[1] * sums[2] + 1e-30).sqrt()
        prev = state.get("log_lr")
        prev = sums.new_zeros(sums.shape[1]) if prev is None else prev
        move = self.log_adapt_rate.exp() * cos
        if self.reads_second_moment:
            log_ratio = self.gradient_log_ratio(state, sums)
        if self.adapt_fade:
            move = move * (self.adapt_fade * log_ratio.clamp(max=0.0)).exp()
        log_lr = (1.0 - self.adapt_decay) * prev + move
        if self.adapt_spike:
            log_lr = log_lr - self.adapt_spike * (log_ratio - math.log(SPIKE_RATIO)).clamp(min=0.0)
        return log_lr.clamp(-self.adapt_bound, self.adapt_bound)

    @staticmethod
    def gradient_log_ratio(state: dict[str, Tensor], sums: Tensor) -> Tensor:
        """[T] ``log(|g|^2 / sum(v_hat))``: each tensor's squared gradient norm
        against its running average (Adam's bias-corrected second moment);
        0 where there is no average yet (before the first step)."""
        seen = 1.0 - F_.SECOND_MOMENT_BETA ** state["step"].float()
        average = sums[3] / seen.clamp(min=1e-12)
        log_ratio = (sums[1] + 1e-30).log() - (average + 1e-30).log()
        return torch.where(sums[3] > 0, log_ratio, torch.zeros_like(log_ratio))

    def nominal_weight(self) -> float:
        """The learned weight of the nominal Adam term (0 without one), for
        the no-grad step's update formula."""
        return float(self.log_nominal.exp()) if self.nominal else 0.0


def small_init_(linear: nn.Linear, scale: float = 1e-2) -> nn.Linear:
    """Output layers start near zero so a fresh optimizer is its nominal term."""
    with torch.no_grad():
        linear.weight.mul_(scale)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear
