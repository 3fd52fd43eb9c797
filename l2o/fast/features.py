"""The statistics and features of the chunked no-grad step.

The step reads each entry's features (``p``, ``g``, the momenta, the Adam
direction, ``sqrt(v)``: :mod:`l2o.features`) in every one of its passes, and
never keeps them for the whole model: :func:`entry_features_` computes them
for one run (a range of entries within one tensor, :mod:`.plan`) into a
run-sized feature-major block ``[F, L]`` (rows in the ``ROW_*`` layout of
:mod:`l2o.features`), from the parameters, the gradient
and the statistics *before* the step (``m <- b m + (1 - b) g`` is recomputed,
not stored), and writes the new statistics back only when asked -- once per
entry, in the step's last pass. So the step's working set is a few run-sized
blocks whatever the model's size, and its state between steps is the
statistics alone (``m`` ``[num_momenta, n]``, ``v`` ``[n]``).

Normalisation is never applied to the entries: since a run lies within one
tensor ``k``, ``W (x / rms_k) = (W diag(1 / rms_k)) x``, so callers fold the
per-tensor scale (from :func:`tensor_sums` over a first pass) into their
first layer's weights (:func:`fold_input_scale`).

Parameters and gradients come tensor by tensor through :class:`Entries`
(from the model's own tensors in ``GMNOptimizer.step``, or from flat vectors),
and the update leaves run by run through a ``sink(k, start, stop, update)``
(:meth:`.backend.ChunkedBackend.step_entries`): no flat copy of the parameters,
gradients or update is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from .. import features as F_
from .kernel_calls import FusedKernels, RunState
from .plan import ChunkPlan
from .shard import Shard, param_starts

NUM_FEATURES = F_.NUM_ENTRY_FEATURES

Sink = Callable[[int, int, int, Tensor], None]
"""``sink(k, start, stop, update)`` takes the update of entries ``[start,
stop)`` of tensor ``k``. A sink that moves parameters may also offer
``direct(k, start, stop) -> DirectApply | None``: where to apply a run's
update at once, so a fused read-out writes the parameters itself instead of
an update for the sink to read back (:func:`direct_target`)."""


@dataclass(frozen=True)
class DirectApply:
    """``param <- param * decay + lr * u`` for one run's update ``u``, done by
    the kernel that computes ``u``; an entry whose ``lr * u`` is not finite
    keeps ``param * decay`` (the count of those told to ``nonfinite``): ``lr``
    carries the sink's gains, which may overflow where ``u`` does not."""
    param: Tensor
    lr: float
    decay: float
    nonfinite: Callable[[int], None]


def direct_target(sink: Sink, k: int, s: int, e: int, gain: float = 1.0) -> DirectApply | None:
    """``sink``'s :class:`DirectApply` for a run whose update it would take
    multiplied by ``gain`` (so ``lr`` carries the gain), or None."""
    direct = getattr(sink, "direct", None)
    target = direct(k, s, e) if direct is not None else None
    return None if target is None else replace(target, lr=target.lr * gain)


class StepConstants:
    """Bias corrections of the step ``t`` (already incremented): the Adam
    direction is ``adam_scale * m / (sqrt(v) + adam_eps)``
    (:func:`l2o.features.adam_bias_correction`)."""

    def __init__(self, t: float):
        self.adam_scale, self.adam_eps = F_.adam_bias_correction(t)


class Entries:
    """Parameters and gradients of a step, tensor by tensor (flat order of the
    plan's graph): ``params[k]`` / ``grads[k]`` are 1-D tensors of tensor
    ``k``'s entries (any float dtype; a ``None`` gradient reads as zeros), and
    ``write[k]`` says whether tensor ``k``'s statistics advance this step
    (a tensor left alone still feeds the message passing, with a zero
    gradient and its statistics decayed, but keeps its state). With a
    ``shard`` the statistics hold its entries only, and ``params[k]`` /
    ``grads[k]`` only them where ``shard.local_params``."""

    def __init__(self, plan: ChunkPlan, params: list[Tensor], grads: list[Tensor | None],
                 write: list[bool] | None = None, shard: Shard | None = None):
        self.plan, self.params, self.grads, self.shard = plan, params, grads, shard
        self.write = [True] * len(params) if write is None else write
        self.starts = param_starts(plan, shard)

    def state_index(self, k: int, s: int) -> int:
        """Where entry ``s`` (flat index, of tensor ``k``) sits in the statistics."""
        return s if self.shard is None else self.shard.state_index(k, s)

    def _chunk(self, t: Tensor, k: int, s: int, e: int) -> Tensor:
        c = t[s - self.starts[k]:e - self.starts[k]]
        return c if c.dtype == torch.float32 and c.is_contiguous() else c.float().contiguous()

    def param(self, k: int, s: int, e: int) -> Tensor:
        """float32 entries ``[s, e)`` (flat indices) of tensor ``k``."""
        return self._chunk(self.params[k], k, s, e)

    def grad(self, k: int, s: int, e: int, device: torch.device, for_kernels: bool = False) -> Tensor | None:
        """float32 gradient entries ``[s, e)``; a missing gradient reads as
        zeros (None for the kernels, which then read none)."""
        g = self.grads[k]
        if g is None:
            return None if for_kernels else self.plan.scratch("zeros", 1, e - s, device)[0].zero_()
        return self._chunk(g, k, s, e)


def step_constants(state: dict[str, Tensor], plan: ChunkPlan) -> list[StepConstants]:
    """Advances ``state["step"]`` (and ``entry_step`` / ``tensor_step`` where
    present) and returns each tensor's bias corrections: from its own count
    where the state has per-entry (``entry_step`` [n], read at each tensor's
    first entry) or per-tensor (``tensor_step`` [T]) counts, else the clock."""
    state["step"] = state["step"] + 1.0
    if "entry_step" in state or "tensor_step" in state:
        if "entry_step" in state:
            state["entry_step"] = state["entry_step"] + 1.0
            firsts = [t.start if t.stop > t.start else 0 for t in plan.tensor_slices]
            steps = state["entry_step"][firsts].tolist() if plan.num_params else []
        else:
            state["tensor_step"] = state["tensor_step"] + 1.0
            steps = state["tensor_step"].tolist()
        by_step = {t: StepConstants(t) for t in set(steps)}
        return [by_step[t] for t in steps]
    return [StepConstants(float(state["step"]))] * plan.num_tensors


def _adam_(out: Tensor, m: Tensor, sqrt_v: Tensor, c: StepConstants) -> Tensor:
    """``out = m̂_0.9 / (sqrt(v̂) + eps)`` (:func:`l2o.features.adam_bias_correction`)."""
    torch.add(sqrt_v, c.adam_eps, out=out)
    return torch.div(m[F_.ADAM_BETA1_INDEX], out, out=out).mul_(c.adam_scale)


def run_frame(plan: ChunkPlan, lead_rows: int, length: int, device: torch.device) -> Tensor:
    """A run-sized ``[lead_rows + F, length]`` workspace (reused): ``lead_rows``
    rows for the caller (the GMN's edge states, so ``[e; x]`` is one block),
    then the features written by :func:`entry_features_`."""
    return plan.scratch(f"frame{lead_rows}", lead_rows + NUM_FEATURES, length, device)


def run_state(entries: Entries, state: dict[str, Tensor], consts: list[StepConstants], k: int, s: int, e: int,
              device: torch.device, write_back: bool = False, for_kernels: bool = False) -> RunState:
    """The statistics before the step of entries ``[s, e)`` (within tensor
    ``k``); ``write_back`` (where ``entries.write[k]``): their advanced values
    are to be stored into ``state``; ``for_kernels``: for a kernel call (a missing
    gradient is None)."""
    i, c = entries.state_index(k, s), consts[k]
    return RunState(entries.param(k, s, e), entries.grad(k, s, e, device, for_kernels), state["m"][:, i:i + e - s],
                    state["v"][i:i + e - s], F_.constant("betas", F_.MOMENTUM_BETAS, device), c.adam_scale,
                    c.adam_eps, write_back and entries.write[k])


def entry_features_(plan: ChunkPlan, entries: Entries, state: dict[str, Tensor], consts: list[StepConstants],
                    k: int, s: int, e: int, x: Tensor | None, kernels: FusedKernels | None = None,
                    write_back: bool = False, sums: Tensor | None = None,
                    controller: tuple[int, Tensor] | None = None) -> Tensor | None:
    """The raw features of entries ``[s, e)`` (within tensor ``k``) into ``x``
    ``[F, e - s]`` (contiguous, rows in :mod:`l2o.features`' ``ROW_*``
    layout), from the statistics before the step; with ``write_back`` (and
    ``entries.write[k]``) the advanced statistics are stored into ``state``.
    ``sums``: where to put each feature row's sum of squares over the run
    (float64 ``[F]``); with the kernels ``x`` may then be None (sums only).
    ``controller = (a, out)``: the step-size controller's ``<g, m_a>``,
    ``<m_a, m_a>`` and ``sum(v)`` over the statistics before the step into
    ``out`` (float64 ``[3]``)."""
    device = state["m"].device
    st = run_state(entries, state, consts, k, s, e, device, write_back, kernels is not None)
    if kernels is not None:
        out = sums if sums is not None else torch.empty(NUM_FEATURES, dtype=torch.float64)
        kernels.stats(*st[:4], x, *st[4:], out, controller=controller)
        return x
    p, g, m, v = st.p, st.g, st.m, st.v
    if controller is not None:
        a, out = controller
        out.copy_(torch.stack([torch.dot(g, m[a]), torch.dot(m[a], m[a]), v.sum()]))
    betas = st.betas.unsqueeze(1)
    b2 = F_.SECOND_MOMENT_BETA
    xm = x[F_.ROW_M0:F_.ROW_M0 + len(F_.MOMENTUM_BETAS)]
    # the forward's ops in its order (l2o.features.update_state), out of place
    torch.mul(m, betas, out=xm).addcmul_(g.unsqueeze(0), 1.0 - betas)
    v_new = torch.mul(v, b2, out=plan.scratch("v_new", 1, e - s, device)[0]).addcmul_(g, g, value=1.0 - b2)
    x[F_.ROW_P].copy_(p)
    x[F_.ROW_G].copy_(g)
    torch.add(v_new, F_.SQRT_EPS, out=x[F_.ROW_SQRT_V]).sqrt_()
    _adam_(x[F_.ROW_ADAM], xm, x[F_.ROW_SQRT_V], consts[k])
    if st.write_back:
        m.copy_(xm)
        v.copy_(v_new)
    if sums is not None:
        sums.copy_(torch.linalg.vector_norm(x, dim=1).double().square_())
    return x


def tensor_sums(plan: ChunkPlan, entries: Entries, state: dict[str, Tensor], consts: list[StepConstants],
                kernels: FusedKernels | None = None,
                controller_m: int | None = None) -> tuple[Tensor, Tensor | None]:
    """First pass: each tensor's per-feature sums of squares ``[T, F]`` of this
    step's features (float64 partial sums per run, summed over the ranks of a
    sharded step); nothing is written back. Given ``controller_m``, in the
    same pass the step-size controller's sums ``[4, T]``
    (:meth:`l2o.lopt.LearnedOptimizer.advance_log_lr`: ``<g, m>``,
    ``<g, g>``, ``<m, m>``, ``sum(v)`` over the statistics before the step,
    ``m`` the momentum ``controller_m``; zeros for a tensor without a
    gradient), else None."""
    device = state["m"].device
    runs = plan.stat_runs
    width = NUM_FEATURES + (0 if controller_m is None else 3)
    run_sums = torch.zeros(len(runs), width, dtype=torch.float64, device=device)
    shard = entries.shard
    for i, run in enumerate(runs):
        s, e = (run.start, run.stop) if shard is None else shard.clip(run.tensor, run.start, run.stop)
        if e > s:   # the kernels need no feature block for the sums alone
            x = None if kernels is not None else run_frame(plan, 0, e - s, device)
            controller = (None if controller_m is None or entries.grads[run.tensor] is None else
                          (controller_m, run_sums[i, NUM_FEATURES:]))
            entry_features_(plan, entries, state, consts, run.tensor, s, e, x, kernels, sums=run_sums[i, :NUM_FEATURES],
                            controller=controller)
    sums = torch.zeros(plan.num_tensors, width, dtype=torch.float64, device=device).index_add_(
        0, plan.stat_run_tensor, run_sums)
    if shard is not None:
        shard.all_reduce(sums)
    if controller_m is None:
        return sums.float(), None
    gm, mm, v = sums[:, NUM_FEATURES:].t()
    return sums[:, :NUM_FEATURES].float(), torch.stack([gm, sums[:, F_.ROW_G], mm, v]).float()


def inverse_rms(plan: ChunkPlan, sums: Tensor) -> Tensor:
    """``1 / (rms_k + eps)`` ``[T, F]`` from :func:`tensor_sums`."""
    return 1.0 / (F_.rms_from_sums(sums, plan.tensor_counts) + F_.RMS_EPS)


def relative_scale(lopt, plan: ChunkPlan, sums: Tensor) -> Tensor | None:
    """``[T]`` the scale of a relative update (``LearnedOptimizer.update_scale``
    per tensor, from the parameter row's sums of squares), or None."""
    if not getattr(lopt, "relative", False):
        return None
    return (sums[:, F_.ROW_P] / plan.tensor_counts + lopt.scale_floor ** 2).sqrt()


def flat_sink(update: Tensor) -> Sink:
    """A sink that writes each run's update into the flat vector ``update``."""
    def sink(k: int, s: int, e: int, u: Tensor) -> None:
        update[s:e].copy_(u)
    return sink


def adam_row(x: Tensor) -> Tensor:
    """The (unnormalised) Adam direction row of a feature block ``[F, L]``."""
    return x[F_.ROW_ADAM]


def fold_input_scale(weight: Tensor, inv_rms: Tensor) -> Tensor:
    """``[T, out, F]``: a Linear's weight ``[out, F]`` with each tensor's
    feature normalisation folded in."""
    return weight.unsqueeze(0) * inv_rms.unsqueeze(1)
