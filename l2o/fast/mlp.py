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
(:mod:`.kernel_calls`) the network runs per run in C instead (``l2o_mlp_step``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..graph.param_graph import ParamGraph
from ..mlp_lopt import MLPLOpt
from ..update_rule import finish_folded_, fold_head
from .controller import controlled_sink
from .features import (Entries, Sink, adam_row, direct_target, entry_features_, fold_input_scale, inverse_rms,
                       relative_scale, run_frame, step_constants, tensor_sums)
from .kernel_calls import FusedKernels
from .plan import ChunkPlan


def kernel_widths(lopt: MLPLOpt) -> dict[str, int]:
    """The widths of the fused kernels this metanetwork needs (:func:`.kernel_calls.load`)."""
    return {"mh": lopt.hidden}


@torch.no_grad()
def run_step(lopt: MLPLOpt, plan: ChunkPlan, graph: ParamGraph, params: list[Tensor], grads: list[Tensor | None],
             state: dict[str, Tensor], sink: Sink, write: list[bool] | None = None,
             kernels: FusedKernels | None = None, shard=None) -> dict[str, Tensor]:
    """One step (:meth:`l2o.fast.backend.ChunkedBackend.step_entries`):
    advances ``state`` (in place, for the tensors ``write`` allows) and hands
    every run's update of the tensors written to ``sink(k, start, stop, update)``."""
    if shard is not None:
        raise NotImplementedError("the per-parameter MLP has no sharded step")
    entries = Entries(plan, params, grads, write)
    dev = state["m"].device
    before = dict(state)   # the controller reads the clock the step began with
    consts = step_constants(state, plan)
    sums, controller_sums = tensor_sums(plan, entries, state, consts, kernels,
                                        lopt.adapt_momentum_index if lopt.adapt else None)
    if lopt.adapt:
        sink = controlled_sink(lopt, before, state, controller_sums, sink, write)
    inv_rms, scale = inverse_rms(plan, sums), relative_scale(lopt, plan, sums)
    t = F_.time_features(state["step"])
    w_out, b_out = fold_head(lopt.out.weight, lopt.out.bias, lopt.out_scale, lopt.max_log_step)
    w_in = fold_input_scale(lopt.inp.weight, inv_rms)                                  # [T, H, F]
    b_in = lopt.inp.bias + lopt.time(t)                                                # [H]
    if kernels is not None:
        network = kernels.mlp_network(w_in.contiguous(), b_in.contiguous(), lopt.mid.weight.contiguous(),
                                      lopt.mid.bias.contiguous(), w_out.contiguous(), b_out, lopt.nominal_weight(),
                                      float(lopt.max_log_step))
    else:
        w_in_t, w_mid = w_in.transpose(1, 2), lopt.mid.weight.t()                      # [T, F, H], [H, H]
    hidden, nominal = lopt.hidden, lopt.nominal_weight()
    for run in plan.stat_runs:
        k, s, e = run.tensor, run.start, run.stop
        x = entry_features_(plan, entries, state, consts, k, s, e, run_frame(plan, 0, e - s, dev), kernels,
                            write_back=True)
        if not entries.write[k]:
            continue
        update = plan.scratch("update", 1, e - s, dev)[0]
        if kernels is not None:
            # the kernel applies the update itself where the sink says where (no update written and read back)
            target = direct_target(sink, k, s, e, 1.0 if scale is None else float(scale[k]))
            if target is not None:
                target.nonfinite(network(x, k, update, apply=(target.param, target.lr, target.decay)))
                continue
            network(x, k, update)
        else:
            z1 = torch.addmm(b_in, x.t(), w_in_t[k], out=plan.scratch("z1", e - s, hidden, dev)).relu_()
            z2 = torch.addmm(lopt.mid.bias, z1, w_mid, out=plan.scratch("z2", e - s, hidden, dev)).relu_()
            out = torch.addmm(b_out, w_out, z2.t(), out=plan.scratch("out", 2, e - s, dev))
            finish_folded_(update, out[0], out[1], adam_row(x), nominal, lopt.max_log_step)
        if scale is not None:
            update.mul_(scale[k])
        sink(k, s, e, update)
    return state
