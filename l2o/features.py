"""Per-step optimizer statistics and the features a learned optimizer reads.

Everything here works on *flat* vectors (all parameter entries of a model
concatenated, see :class:`l2o.graph.ParamGraph`) and is purely functional, so
the same code runs inside ``GMNOptimizer.step`` (no grad) and inside the
unrolled, differentiated inner loop of meta-training.

Per entry, following the small_fc_lopt / LOLv2 family (Metz et al. 2022):

* the parameter value ``p`` and gradient ``g``;
* momenta ``m_b = b m_b + (1 - b) g`` at ``MOMENTUM_BETAS``;
* the second moment ``v = b2 v + (1 - b2) g^2`` and the bias-corrected Adam
  direction ``a = m̂_0.9 / (sqrt(v̂) + eps)``;
* every feature divided by its root-mean-square over the tensor it belongs to,
  so inputs are scale-free across layers, models and losses.

Time enters as ``tanh(t / tau - 1)`` for ``tau`` in ``TIME_SCALES``: one vector
per step shared by every entry (the metanetworks fold it into biases).

The state's ``step`` is that clock. A state may also hold ``entry_step`` [n],
each entry's own count of statistics updates (the optimizers pass it when
their tensors' counters differ, e.g. a tensor unfrozen or added later): it
then replaces ``step`` in the Adam bias correction, so a tensor's first step
is bias-corrected as a first step whatever the clock says.
"""
from __future__ import annotations

import torch
from torch import Tensor

MOMENTUM_BETAS = (0.5, 0.9, 0.99, 0.999)
ADAM_BETA1_INDEX = 1          # MOMENTUM_BETAS[1] == 0.9 is Adam's beta1
SECOND_MOMENT_BETA = 0.999
ADAM_EPS = 1e-8
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)

# The feature layout: which row (feature-major) or column (entry-major) of an
# entry's features holds what. Every implementation of the step reads it from
# here: the forward (entry_features), the chunked step (l2o/fast) and the C
# kernels (l2o/fast/kernels.c, built with these values as -D defines).
ROW_P = 0                                    # the parameter value
ROW_G = 1                                    # its gradient
ROW_M0 = 2                                   # the momenta, one row per MOMENTUM_BETAS
ROW_ADAM = ROW_M0 + len(MOMENTUM_BETAS)      # the bias-corrected Adam direction
ROW_SQRT_V = ROW_ADAM + 1                    # sqrt(v)
NUM_ENTRY_FEATURES = ROW_SQRT_V + 1
NUM_TIME_FEATURES = len(TIME_SCALES)
RMS_EPS = 1e-12
# sqrt has an infinite derivative at 0; a tiny shift keeps meta-gradients finite
# for entries whose gradient has always been zero.
SQRT_EPS = 1e-30


_CONSTANTS: dict[tuple[str, torch.device], Tensor] = {}


def constant(name: str, values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small constant tensor, created once per device (no host-to-device copy per step)."""
    key = (name, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, device=device, dtype=torch.float32)
    return _CONSTANTS[key]


def init_state(flat_params: Tensor) -> dict[str, Tensor]:
    """Zero statistics for a flat parameter vector (float32 whatever the params' dtype)."""
    n = flat_params.shape[0]
    z = dict(device=flat_params.device, dtype=torch.float32)
    return {
        # feature-major: each momentum is one contiguous row, which the
        # chunked no-grad step (l2o/fast) reads and updates 4-8x faster
        "m": torch.zeros(len(MOMENTUM_BETAS), n, **z),
        "v": torch.zeros(n, **z),
        "step": torch.zeros((), **z),
    }


def update_state(state: dict[str, Tensor], grad: Tensor) -> dict[str, Tensor]:
    """One step of the running statistics (out of place, differentiable)."""
    betas = constant("betas", MOMENTUM_BETAS, grad.device).unsqueeze(1)
    g = grad.float()
    m = state["m"] * betas + (1.0 - betas) * g.unsqueeze(0)
    v = state["v"] * SECOND_MOMENT_BETA + (1.0 - SECOND_MOMENT_BETA) * g * g
    out = {"m": m, "v": v, "step": state["step"] + 1.0}
    if "entry_step" in state:
        out["entry_step"] = state["entry_step"] + 1.0
    return out


def adam_bias_correction(t: float) -> tuple[float, float]:
    """``(scale, eps)`` with which the Adam direction of step ``t`` (``>= 1``)
    is ``scale * m / (sqrt(v) + eps)`` from the *uncorrected* ``m``, ``v``:

    ``m̂ / (sqrt(v̂) + eps) = (c_m / sqrt(c_v)) m / (sqrt(v) + eps / sqrt(c_v))``
    with ``c_m = 1 / (1 - b1^t)``, ``c_v = 1 / (1 - b2^t)``. The no-grad step
    uses this form (it reuses the ``sqrt(v)`` feature row); it equals
    :func:`adam_direction` up to the ``SQRT_EPS`` inside the root, which moves
    by a factor ``c_v``: far below float32 resolution next to ``eps``."""
    b1 = MOMENTUM_BETAS[ADAM_BETA1_INDEX]
    m_scale = 1.0 / (1.0 - b1 ** t)
    v_scale = 1.0 / (1.0 - SECOND_MOMENT_BETA ** t)
    return m_scale / v_scale ** 0.5, ADAM_EPS / v_scale ** 0.5


def adam_direction(state: dict[str, Tensor]) -> Tensor:
    """Bias-corrected Adam direction m̂ / (sqrt(v̂) + eps) from an updated state
    (``step >= 1``). This is the nominal term of the learned update. The
    bias correction counts ``entry_step`` where the state has it."""
    t = state.get("entry_step", state["step"]).clamp(min=1.0)
    b1 = MOMENTUM_BETAS[ADAM_BETA1_INDEX]
    m_hat = state["m"][ADAM_BETA1_INDEX] / (1.0 - b1 ** t)
    v_hat = state["v"] / (1.0 - SECOND_MOMENT_BETA ** t)
    return m_hat / ((v_hat + SQRT_EPS).sqrt() + ADAM_EPS)


def rms_from_sums(sums_of_squares: Tensor, counts: Tensor) -> Tensor:
    """[T, F] root-mean-squares from each tensor's per-feature sums of squares
    and its entry count (at least 1)."""
    return (sums_of_squares / counts.unsqueeze(1) + SQRT_EPS).sqrt()


def per_tensor_rms(x: Tensor, tensor_id: Tensor, num_tensors: int) -> Tensor:
    """Root-mean-square of each column of ``x`` [n, F] over each tensor's
    entries, broadcast back to the entries: one index_add, one gather."""
    sums = x.new_zeros(num_tensors, x.shape[1]).index_add_(0, tensor_id, x * x)
    counts = torch.bincount(tensor_id, minlength=num_tensors).clamp(min=1).to(x.dtype)
    return rms_from_sums(sums, counts).index_select(0, tensor_id)


def entry_features(params: Tensor, grad: Tensor, state: dict[str, Tensor], adam_dir: Tensor,
                   tensor_id: Tensor, num_tensors: int) -> Tensor:
    """[n, NUM_ENTRY_FEATURES] per-entry inputs, RMS-normalised per tensor,
    in the layout of ``ROW_*``.

    ``state`` is the *updated* state of this step (momenta include ``grad``).
    """
    columns = {ROW_P: params.float().unsqueeze(1), ROW_G: grad.float().unsqueeze(1), ROW_M0: state["m"].t(),
               ROW_ADAM: adam_dir.unsqueeze(1), ROW_SQRT_V: (state["v"] + SQRT_EPS).sqrt().unsqueeze(1)}
    raw = torch.cat([columns[row] for row in sorted(columns)], dim=1)
    return raw / (per_tensor_rms(raw, tensor_id, num_tensors) + RMS_EPS)


def time_features(step: Tensor) -> Tensor:
    """[NUM_TIME_FEATURES] encoding of the step count at several time scales
    ([R, NUM_TIME_FEATURES] for a vector of R runs' step counts)."""
    taus = constant("taus", TIME_SCALES, step.device)
    return torch.tanh(step.float().unsqueeze(-1) / taus - 1.0)
