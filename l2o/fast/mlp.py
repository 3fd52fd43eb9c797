"""Chunked no-grad step of the graph-free baseline (:class:`l2o.MLPLOpt`).

Per run of entries of tensor ``k``:

.. math::
    z_1 = \\sigma\\big((W_1 \\operatorname{diag}(1/\\mathrm{rms}_k))\\,x + b_1 + U t\\big),\\quad
    z_2 = \\sigma(W_2 z_1 + b_2),\\quad (d, s) = W_3 z_2 + b_3

The hidden activations are entry-major (``[L, H]``): for a square hidden
layer MKL's GEMM is ~1.5x faster in that orientation than feature-major,
while the features (read from the frame) and the two outputs stay
feature-major rows. Runs are half the GMN's so ``z_1``/``z_2`` stay in cache.
With the fused kernels (:mod:`.native`) the whole network runs per tensor
in C instead (:func:`_fused_mlp`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..graph.param_graph import ParamGraph
from .features import adam_row, feature_frame, fold_input_scale, update_statistics_
from .native import address, check
from . import plan as plan_module
from .plan import ChunkPlan, chunk_plan


def _fused_mlp(kernels, lopt, plan: ChunkPlan, x_all: Tensor, inv_rms: Tensor, t: Tensor) -> Tensor:
    """The whole network per tensor in C (native.py): one pass over the entries."""
    update = plan.scratch("update", 1, plan.num_params, x_all.device)[0]
    w_in = fold_input_scale(lopt.inp.weight, inv_rms).contiguous()       # [T, H, F]
    b_in = (lopt.inp.bias + lopt.time(t)).contiguous()
    w_mid, b_mid = lopt.mid.weight.contiguous(), lopt.mid.bias.contiguous()
    head_w, head_b = lopt.folded_head(lopt.out)
    head_w = head_w.contiguous()
    nominal = lopt.nominal_weight()
    for k, t_slice in enumerate(plan.tensor_slices):
        n = t_slice.stop - t_slice.start
        if n:
            check(kernels.l2o_mlp_step(n, address(x_all, 0, t_slice.start), x_all.stride(0), address(w_in, k),
                                       b_in.data_ptr(), w_mid.data_ptr(), b_mid.data_ptr(), head_w.data_ptr(),
                                       float(head_b[0, 0]), float(head_b[1, 0]), nominal, float(lopt.max_log_step),
                                       address(update, t_slice.start), torch.get_num_threads()))
    return update


def mlp_frame(lopt, graph: ParamGraph, device: torch.device) -> tuple[ChunkPlan, Tensor]:
    """The plan and persistent feature frame of :func:`mlp_step`."""
    plan = chunk_plan(graph, max(1, plan_module.DEFAULT_CHUNK // 2))
    return plan, feature_frame(plan, 0, device)


@torch.no_grad()
def mlp_step(lopt, graph: ParamGraph, params: Tensor, grad: Tensor,
             state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    dev = params.device
    plan, x_all = mlp_frame(lopt, graph, dev)
    kernels = lopt.kernels(dev)
    inv_rms = update_statistics_(plan, params, grad, state, x_all, kernels)
    t = F_.time_features(state["step"])
    if kernels is not None:
        return _fused_mlp(kernels, lopt, plan, x_all, inv_rms, t), state
    w_in = fold_input_scale(lopt.inp.weight, inv_rms).transpose(1, 2)   # [T, F, H]
    b_in = lopt.inp.bias + lopt.time(t)                                  # [H]
    w_mid = lopt.mid.weight.t()
    w_out, b_out = lopt.folded_head(lopt.out)
    hidden = lopt.hidden
    update = plan.scratch("update", 1, plan.num_params, dev)[0]  # valid until the next step
    for run in plan.stat_runs:
        s, e = run.start, run.stop
        x = x_all[:, s:e]
        z1 = torch.addmm(b_in, x.t(), w_in[run.tensor], out=plan.scratch("z1", e - s, hidden, dev)).relu_()
        z2 = torch.addmm(lopt.mid.bias, z1, w_mid, out=plan.scratch("z2", e - s, hidden, dev)).relu_()
        out = torch.addmm(b_out, w_out, z2.t(), out=plan.scratch("out", 2, e - s, dev))
        lopt.finish_update_(update[s:e], out[0], out[1], adam_row(x))
    return update, state
