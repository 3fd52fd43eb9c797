"""The statistics pass of the chunked no-grad step.

:func:`update_statistics_` computes what :mod:`l2o.features` computes, run by
run and in place: it advances the momenta and second moment in the caller's
state buffers and writes every entry's *unnormalised* features, feature-major,
into a persistent ``[F, n]`` frame that the later passes read as strided views
(no per-pass rebuilding). It returns each tensor's inverse feature RMS,
``1 / (rms_k + eps)`` ``[T, F]``.

Normalisation is never applied to the entries: since a run lies within one
tensor ``k``, ``W (x / rms_k) = (W diag(1 / rms_k)) x``, so callers fold the
per-tensor scale into their first layer's weights (:func:`fold_input_scale`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from .native import address, check
from .plan import ChunkPlan

NUM_FEATURES = F_.NUM_ENTRY_FEATURES
_P, _G, _M0, _ADAM, _SQRT_V = 0, 1, 2, 2 + len(F_.MOMENTUM_BETAS), 3 + len(F_.MOMENTUM_BETAS)


class StepConstants:
    """Bias corrections of the step ``t`` (already incremented)."""

    def __init__(self, t: float):
        b1 = F_.MOMENTUM_BETAS[F_.ADAM_BETA1_INDEX]
        m_scale = 1.0 / (1.0 - b1 ** t)
        v_scale = 1.0 / (1.0 - F_.SECOND_MOMENT_BETA ** t)
        # m̂ / (sqrt(v̂) + eps) == (m_scale / sqrt(v_scale)) m / (sqrt(v) + eps / sqrt(v_scale)),
        # so the Adam row reuses the sqrt(v) feature (the 1e-30 inside the root
        # moves by a factor v_scale: far below float32 resolution next to eps)
        self.adam_scale = m_scale / v_scale ** 0.5
        self.adam_eps = F_.ADAM_EPS / v_scale ** 0.5


def _adam_(out: Tensor, m: Tensor, sqrt_v: Tensor, c: StepConstants) -> Tensor:
    """``out = m̂_0.9 / (sqrt(v̂) + eps)``, as :func:`l2o.features.adam_direction`."""
    torch.add(sqrt_v, c.adam_eps, out=out)
    return torch.div(m[F_.ADAM_BETA1_INDEX], out, out=out).mul_(c.adam_scale)


def feature_frame(plan: ChunkPlan, lead_rows: int, device: torch.device) -> Tensor:
    """The persistent ``[lead_rows + F, n]`` workspace: ``lead_rows`` rows for
    the caller (the GMN keeps its edge states there, so ``[e; x]`` of a run is
    one strided view), then the features written by :func:`update_statistics_`."""
    return plan.scratch("frame", lead_rows + NUM_FEATURES, plan.num_params, device)


def frame_views(x_all: Tensor) -> dict[str, Tensor]:
    """Rows of a feature block ``[F, n]`` where a caller may keep the flat
    parameters (``"param"``), gradients (``"grad"``) and momenta (``"m"``,
    ``[num_momenta, n]``) so that :func:`update_statistics_` need not copy them."""
    return {"param": x_all[_P], "grad": x_all[_G], "m": x_all[_M0:_ADAM]}


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _unit_stride(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)


def _statistics_fused(kernels, plan: ChunkPlan, params: Tensor, grad: Tensor, m_all: Tensor, v_all: Tensor,
                      x_all: Tensor, consts: list[StepConstants]) -> Tensor:
    """The statistics pass in C (native.py), one call per tensor; returns the
    features' sums of squares per tensor ``[T, F]``."""
    betas = F_._constant("betas", F_.MOMENTUM_BETAS, params.device)
    sums = torch.zeros(plan.num_tensors, NUM_FEATURES, dtype=torch.float64)
    threads = torch.get_num_threads()
    for k, t in enumerate(plan.tensor_slices):
        if t.stop > t.start:
            c = consts[k]
            check(kernels.l2o_stats(t.stop - t.start, address(params, t.start), address(grad, t.start),
                                    address(m_all, 0, t.start), m_all.stride(0), address(v_all, t.start),
                                    address(x_all, 0, t.start), x_all.stride(0), betas.data_ptr(),
                                    F_.SECOND_MOMENT_BETA, 1.0 - F_.SECOND_MOMENT_BETA, F_._SQRT_EPS,
                                    c.adam_scale, c.adam_eps, F_.ADAM_BETA1_INDEX, address(sums, k), threads))
    return sums.float()


def _statistics_torch(plan: ChunkPlan, params: Tensor, grad: Tensor, m_all: Tensor, v_all: Tensor,
                      x_all: Tensor, consts: list[StepConstants]) -> Tensor:
    """The statistics pass as torch ops, run by run; returns the features'
    sums of squares per tensor ``[T, F]``."""
    device = params.device
    betas = F_._constant("betas", F_.MOMENTUM_BETAS, device).unsqueeze(1)
    one_minus = 1.0 - betas  # in float32, as l2o.features computes it
    b2 = F_.SECOND_MOMENT_BETA
    # inputs the optimizer already keeps in the frame (frame_views) need no copy
    copy_p, copy_g, copy_m = (not _same(a, b) for a, b in ((params, x_all[_P]), (grad, x_all[_G]),
                                                           (m_all, x_all[_M0:_ADAM])))
    norms = plan.fixed("run_norms", (len(plan.stat_runs), NUM_FEATURES), device)
    for i, run in enumerate(plan.stat_runs):
        s, e = run.start, run.stop
        g, m, v, x = grad[s:e], m_all[:, s:e], v_all[s:e], x_all[:, s:e]
        m.mul_(betas).addcmul_(g.unsqueeze(0), one_minus)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        if copy_p:
            x[_P].copy_(params[s:e])
        if copy_g:
            x[_G].copy_(g)
        if copy_m:
            x[_M0:_ADAM].copy_(m)
        torch.add(v, F_._SQRT_EPS, out=x[_SQRT_V]).sqrt_()
        _adam_(x[_ADAM], m, x[_SQRT_V], consts[run.tensor])
        torch.linalg.vector_norm(x, dim=1, out=norms[i])
    return torch.zeros(plan.num_tensors, NUM_FEATURES, device=device).index_add_(
        0, plan.stat_run_tensor, norms.square_())


def update_statistics_(plan: ChunkPlan, params: Tensor, grad: Tensor, state: dict[str, Tensor],
                       x_all: Tensor, kernels=None) -> Tensor:
    """One step of ``state["m"]``/``state["v"]`` in place (``state["step"]``
    is advanced too, and ``state["entry_step"]`` where present: it sets each
    tensor's bias correction, read at the tensor's first entry); writes the raw
    features into ``x_all`` ``[F, n]`` and returns the inverse per-tensor RMS
    ``[T, F]`` of the features of this step.
    ``kernels``: the fused C kernels (:mod:`.native`), or None for torch ops."""
    state["step"] = state["step"] + 1.0
    if "entry_step" in state:
        state["entry_step"] = state["entry_step"] + 1.0
        firsts = [t.start if t.stop > t.start else 0 for t in plan.tensor_slices]
        steps = state["entry_step"][firsts].tolist() if plan.num_params else []
        by_step = {t: StepConstants(t) for t in set(steps)}
        consts = [by_step[t] for t in steps]
    else:
        consts = [StepConstants(float(state["step"]))] * plan.num_tensors
    inputs = (plan, params, grad, state["m"], state["v"], x_all, consts)
    if kernels is not None and _unit_stride(params, grad, state["m"], state["v"], x_all):
        sums = _statistics_fused(kernels, *inputs)
    else:
        sums = _statistics_torch(*inputs)
    return 1.0 / (F_.rms_from_sums(sums, plan.tensor_counts) + F_._RMS_EPS)


def adam_row(x: Tensor) -> Tensor:
    """The (unnormalised) Adam direction row of a feature block ``[F, L]``."""
    return x[_ADAM]


def fold_input_scale(weight: Tensor, inv_rms: Tensor) -> Tensor:
    """``[T, out, F]``: a Linear's weight ``[out, F]`` with each tensor's
    feature normalisation folded in."""
    return weight.unsqueeze(0) * inv_rms.unsqueeze(1)
