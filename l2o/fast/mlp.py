"""Chunked no-grad step of the graph-free baseline (:class:`l2o.MLPLOpt`).

Per run of entries of tensor ``k``:

.. math::
    z_1 = \\sigma\\big((W_1 \\operatorname{diag}(1/\\mathrm{rms}_k))\\,x + b_1 + U t\\big),\\quad
    z_2 = \\sigma(W_2 z_1 + b_2),\\quad (d, s) = W_3 z_2 + b_3

Two passes over the entries: the per-tensor feature sums (for the RMS
normalisation), then per run the features again, the network, the new
statistics written back and the update handed to the sink. The hidden
activations are entry-major (``[L, H]``): for a square hidden layer MKL's
GEMM is ~1.5x faster in that orientation than feature-major, while the
features and the two outputs stay feature-major rows. Runs are half the
GMN's so ``z_1``/``z_2`` stay in cache. With the fused kernels
(:mod:`.native`) the network runs per run in C instead (``l2o_mlp_step``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..graph.param_graph import ParamGraph
from .features import (Entries, Sink, adam_row, entry_features_, flat_sink, fold_input_scale, inverse_rms,
                       relative_scale, run_frame, step_constants, tensor_sums)
from .native import address, check
from . import plan as plan_module
from .plan import ChunkPlan, chunk_plan


def mlp_plan(graph: ParamGraph) -> ChunkPlan:
    return chunk_plan(graph, max(1, plan_module.DEFAULT_CHUNK // 2))


def mlp_frame(lopt, graph: ParamGraph, device: torch.device) -> tuple[ChunkPlan, Tensor]:
    """The plan and a run-sized feature frame of :func:`mlp_run_step`."""
    plan = mlp_plan(graph)
    return plan, run_frame(plan, 0, plan.max_run, device)


@torch.no_grad()
def mlp_run_step(lopt, graph: ParamGraph, params: list[Tensor], grads: list[Tensor | None],
                 state: dict[str, Tensor], sink: Sink, write: list[bool] | None = None) -> dict[str, Tensor]:
    """One step (``LearnedOptimizer.step_entries``): advances ``state`` (in
    place, for the tensors ``write`` allows) and hands every run's update of the
    tensors written to ``sink(k, start, stop, update)``."""
    plan = mlp_plan(graph)
    entries = Entries(plan, params, grads, write)
    dev = state["m"].device
    kernels = lopt.kernels(dev)
    consts = step_constants(state, plan)
    sums = tensor_sums(plan, entries, state, consts, kernels)
    inv_rms, scale = inverse_rms(plan, sums), relative_scale(lopt, plan, sums)
    t = F_.time_features(state["step"])
    w_out, b_out = lopt.folded_head(lopt.out)
    if kernels is not None:
        w_in = fold_input_scale(lopt.inp.weight, inv_rms).contiguous()       # [T, H, F]
        b_in = (lopt.inp.bias + lopt.time(t)).contiguous()
        w_mid, b_mid = lopt.mid.weight.contiguous(), lopt.mid.bias.contiguous()
        head_w, nominal = w_out.contiguous(), lopt.nominal_weight()
    else:
        w_in_t = fold_input_scale(lopt.inp.weight, inv_rms).transpose(1, 2)   # [T, F, H]
        b_in = lopt.inp.bias + lopt.time(t)                                    # [H]
        w_mid = lopt.mid.weight.t()
    hidden = lopt.hidden
    for run in plan.stat_runs:
        k, s, e = run.tensor, run.start, run.stop
        x = entry_features_(plan, entries, state, consts, k, s, e, run_frame(plan, 0, e - s, dev), kernels,
                            write_back=True)
        if not entries.write[k]:
            continue
        update = plan.scratch("update", 1, e - s, dev)[0]
        if kernels is not None:
            check(kernels.l2o_mlp_step(e - s, x.data_ptr(), x.stride(0), address(w_in, k), b_in.data_ptr(),
                                       w_mid.data_ptr(), b_mid.data_ptr(), head_w.data_ptr(), float(b_out[0, 0]),
                                       float(b_out[1, 0]), nominal, float(lopt.max_log_step), update.data_ptr(),
                                       torch.get_num_threads()))
        else:
            z1 = torch.addmm(b_in, x.t(), w_in_t[k], out=plan.scratch("z1", e - s, hidden, dev)).relu_()
            z2 = torch.addmm(lopt.mid.bias, z1, w_mid, out=plan.scratch("z2", e - s, hidden, dev)).relu_()
            out = torch.addmm(b_out, w_out, z2.t(), out=plan.scratch("out", 2, e - s, dev))
            lopt.finish_update_(update, out[0], out[1], adam_row(x))
        if scale is not None:
            update.mul_(scale[k])
        sink(k, s, e, update)
    return state


@torch.no_grad()
def mlp_step(lopt, graph: ParamGraph, params: Tensor, grad: Tensor,
             state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The flat form (``LearnedOptimizer.step_no_grad``): returns the update
    ``[n]`` (relative scale included) and ``state``, advanced in place."""
    update = torch.empty(graph.num_params, device=params.device)
    split = graph.numels
    state = mlp_run_step(lopt, graph, list(params.split(split)), list(grad.split(split)), state, flat_sink(update))
    return update, state


mlp_step.run_step = mlp_run_step  # LearnedOptimizer.step_entries finds the per-tensor form here
