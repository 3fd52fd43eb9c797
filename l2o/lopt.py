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
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import features as F_
from .fast import native, use_fast_path
from .fast.features import frame_views
from .graph.param_graph import ParamGraph


class LearnedOptimizer(nn.Module):
    kind: str = "base"

    def __init__(self, out_scale: float = 1e-3, nominal: bool = True, nominal_lr: float = 1e-3,
                 max_log_step: float = 3.0, relative: bool = False, scale_floor: float = 1e-2):
        super().__init__()
        if not scale_floor > 0:
            raise ValueError(f"scale_floor must be > 0, got {scale_floor}")
        self.relative = bool(relative)
        self.scale_floor = float(scale_floor)
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
        }

    def init_state(self, flat_params: Tensor) -> dict[str, Tensor]:
        return F_.init_state(flat_params)

    def predict(self, graph: ParamGraph, x: Tensor, t: Tensor) -> Tensor:
        """[n, 2] (direction, log-magnitude) from entry features ``x`` [n, F]
        and time features ``t`` [T]."""
        raise NotImplementedError

    def forward(self, graph: ParamGraph, params: Tensor, grad: Tensor,
                state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
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
        if self.relative:
            update = update * self.tensor_scale(graph, params)
        return update, state

    def tensor_scale(self, graph: ParamGraph, params: Tensor) -> Tensor:
        """[n] the scale a relative update is measured in: ``sqrt(rms(W)^2 +
        scale_floor^2)`` of the tensor ``W`` holding each entry."""
        p = params.float()
        sums = p.new_zeros(graph.num_tensors).index_add_(0, graph.tensor_id, p * p)
        counts = torch.bincount(graph.tensor_id, minlength=graph.num_tensors).clamp(min=1).to(p.dtype)
        return (sums / counts + self.scale_floor ** 2).sqrt().index_select(0, graph.tensor_id)

    # ------------------------------------------------------ no-grad stepping
    # A subclass with a chunked implementation (l2o/fast) names it here:
    # chunked_step(lopt, graph, params, grad, state) -> (update, state) and
    # chunked_frame(lopt, graph, device) -> (plan, frame whose last F rows are the features).
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

    def step_no_grad(self, graph: ParamGraph, params: Tensor, grad: Tensor,
                     state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """What ``forward`` returns, for optimizers that need no autograd. On
        the chunked path (:mod:`l2o.fast`) ``state``'s buffers are updated in
        place and the returned update is a workspace of ``graph`` that the
        next call overwrites (clone it to keep it). The workspace belongs to
        one optimizer state at a time: optimizers use a private copy of their graph."""
        if not self._uses_chunked_step(graph, params.device):
            return self(graph, params, grad, state)
        scale = self.tensor_scale(graph, params) if self.relative else None  # before params change
        update, state = self.chunked_step(graph, params, grad, state)
        if scale is not None:
            update.mul_(scale)
        return update, state

    def flat_workspace(self, graph: ParamGraph, device: torch.device) -> dict[str, Tensor] | None:
        """Where an optimizer should keep its flat parameters, gradients and
        momenta so that :meth:`step_no_grad` reads them without a copy
        (views into ``graph``'s chunked-step workspace, see
        :func:`l2o.fast.features.frame_views`; one optimizer per graph);
        ``None`` when that step is not used."""
        if not self._uses_chunked_step(graph, device):
            return None
        return frame_views(self.chunked_frame(graph, device)[1][-F_.NUM_ENTRY_FEATURES:])

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


def small_init_(linear: nn.Linear, scale: float = 1e-2) -> nn.Linear:
    """Output layers start near zero so a fresh optimizer is its nominal term."""
    with torch.no_grad():
        linear.weight.mul_(scale)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear
