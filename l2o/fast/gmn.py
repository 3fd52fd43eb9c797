"""Chunked no-grad step of the graph metanetwork (:class:`l2o.GMNLOpt`).

The same function as ``GMNLOpt.forward``, reorganised into passes over the
edge runs of a :class:`~l2o.fast.plan.ChunkPlan`, feature-major
(``[width, run length]``) so the tiny matrix products stream over long rows:

1. statistics (:func:`~l2o.fast.features.update_statistics_`);
2. encode the edges and send the first round of messages: per run
   ``e_0 = σ(W_f' x + static)``, ``m_1 = σ(W_1 e_0 + S h[src] + D h[dst] + b)``,
   summed onto both end nodes, ``e_1 = e_0 + m_1`` kept in the first
   ``edge_dim`` rows of the persistent frame (the only edge-sized state);
3. one pass per further round, updating those rows in place;
4. read out: ``z = σ([A | B'] [e; x] + ...)``, ``(d, s) = H z`` and the
   update, written straight into the output.

Node updates between passes are the small ``GMNConv.update`` on all nodes.
On a dense block (:mod:`l2o.graph.blocks`) a run is ``[groups, rows, cols]``:
node terms broadcast along rows and columns and sums reduce along them, so
no per-edge gather or scatter happens; other edges use plain index ops.
With the fused kernels (:mod:`.native`) passes 2-4 take each dense block
whole in C (:func:`_fused_round`, :func:`_fused_readout`), fed the same
per-block row and column tables; scatter edges keep the torch runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..graph.blocks import edge_degree
from ..graph.param_graph import ParamGraph
from .native import address, check
from .features import adam_row, feature_frame, fold_input_scale, update_statistics_
from .plan import ChunkPlan, DenseRun, ScatterRun, chunk_plan


class _NodeTerms:
    """``S h[src] + D h[dst] + b`` of one run, written into its ``[D, L]``
    output buffer before the product is accumulated onto it (``addmm_``):
    one pass over the run instead of a product plus two broadcast adds. On
    dense runs the column term (with the bias) is gathered once per column
    table and step, the row term is broadcast along each row."""

    def __init__(self, src_term: Tensor, dst_term: Tensor, bias: Tensor):
        self.src_t, self.dst_t = src_term.t().contiguous(), dst_term.t().contiguous()
        self.bias = bias.unsqueeze(1)
        self._cols: dict[int, Tensor] = {}

    def _col_table(self, run: DenseRun, col_t: Tensor) -> Tensor:
        col = self._cols.get(id(run.col_nodes))
        if col is None:
            col = self._cols[id(run.col_nodes)] = col_t.index_select(1, run.col_nodes).add_(self.bias)
        return col

    def tables(self, run: DenseRun) -> tuple[Tensor, Tensor]:
        """Contiguous row ``[D, groups * rows]`` and column (with the bias)
        ``[D, groups * cols]`` terms of a dense run, for the fused kernels."""
        row_t, col_t = (self.dst_t, self.src_t) if run.row_end == "dst" else (self.src_t, self.dst_t)
        return run.rows_of(row_t).contiguous(), self._col_table(run, col_t)

    def linear(self, out: Tensor, weight: Tensor, inp: Tensor, run: DenseRun | ScatterRun) -> Tensor:
        """``out = weight @ inp + node terms`` (``out`` ``[D, L]``)."""
        if isinstance(run, ScatterRun):
            torch.add(self.src_t.index_select(1, run.src), self.dst_t.index_select(1, run.dst), out=out)
            out += self.bias
        else:
            d = out.shape[0]
            row_t, col_t = (self.dst_t, self.src_t) if run.row_end == "dst" else (self.src_t, self.dst_t)
            col = self._col_table(run, col_t)
            torch.add(col.view(d, run.groups, 1, run.cols),
                      run.rows_of(row_t).reshape(d, run.groups, run.rows, 1),
                      out=out.view(d, run.groups, run.rows, run.cols))
        return out.addmm_(weight, inp)


def _sum_to_ends_(m: Tensor, run: DenseRun | ScatterRun, acc_src: Tensor, acc_dst: Tensor) -> None:
    """Add one run's messages ``[D, L]`` onto both end nodes (``acc_* [D, N]``)."""
    if isinstance(run, ScatterRun):
        acc_src.index_add_(1, run.src, m)
        acc_dst.index_add_(1, run.dst, m)
        return
    d = m.shape[0]
    acc_row, acc_col = (acc_dst, acc_src) if run.row_end == "dst" else (acc_src, acc_dst)
    m4 = m.view(d, run.groups, run.rows, run.cols)
    run.add_to_rows_(acc_row, m4.sum(3).view(d, -1))
    acc_col.index_add_(1, run.col_nodes, m4.sum(2).view(d, -1))


class _StaticEdgeTerms:
    """``E_kind[kind] + W_p pos + b`` of the edge encoder, per run; computed
    once per block per step when kind and position depend on the column only."""

    def __init__(self, lopt, graph: ParamGraph, bias: Tensor):
        self.lopt, self.graph, self.bias, self._cache = lopt, graph, bias, {}

    def _compute(self, kind: Tensor, pos: Tensor) -> Tensor:
        term = self.lopt.edge_kind(kind) + self.bias
        if bool(pos.any()):
            term = term + self.lopt.edge_pos(pos)
        return term.t()

    def table(self, run: DenseRun) -> tuple[Tensor, int, int]:
        """For the fused kernels: a contiguous table and the (feature, row)
        strides at which edge ``(i, j)`` of ``run`` finds its term: ``[D, cols]``
        with row stride 0 when the terms depend on the column only."""
        if run.static_cols is None:
            g = self.graph
            term = self._compute(g.edge_kind[run.start:run.stop], g.edge_pos[run.start:run.stop]).contiguous()
            return term, run.stop - run.start, run.cols
        key = id(run.static_cols[0])
        if key not in self._cache:
            self._cache[key] = self._compute(*run.static_cols)
        return self._cache[key].contiguous(), run.cols, 0

    def linear(self, out: Tensor, weight: Tensor, inp: Tensor, run: DenseRun | ScatterRun) -> Tensor:
        """``out = weight @ inp + static terms`` (``out`` ``[D, L]``)."""
        if isinstance(run, ScatterRun):
            out.copy_(self._compute(run.edge_kind, run.edge_pos))
        elif run.static_cols is None:  # varies within a row: per-edge terms
            g = self.graph
            out.copy_(self._compute(g.edge_kind[run.start:run.stop], g.edge_pos[run.start:run.stop]))
        else:
            key = id(run.static_cols[0])
            if key not in self._cache:
                self._cache[key] = self._compute(*run.static_cols)
            d = out.shape[0]
            out.view(d, run.groups * run.rows, run.cols).copy_(self._cache[key].unsqueeze(1))
        return out.addmm_(weight, inp)


def _fused_round(kernels, frame: Tensor, de: int, run: DenseRun, layer: int, w_enc: Tensor,
                 static: _StaticEdgeTerms, w_msg: Tensor, node_terms: _NodeTerms,
                 acc_src: Tensor, acc_dst: Tensor) -> None:
    """One message-passing round over a whole dense block in C (the loop body
    of :func:`gmn_step`, fused)."""
    rows, n_cols = run.groups * run.rows, run.groups * run.cols
    row_t, col_t = node_terms.tables(run)
    row_sum, col_sum = frame.new_zeros(de, rows), frame.new_zeros(de, n_cols)
    if layer == 0:
        stat, stat_ld, stat_rs = static.table(run)
        w = w_enc[run.tensor].contiguous()
        x, w_ptr, stat_ptr = address(frame, de, run.start), w.data_ptr(), stat.data_ptr()
    else:
        x = w_ptr = stat_ptr = None
        stat_ld = stat_rs = 0
    w_msg = w_msg.contiguous()
    check(kernels.l2o_gmn_round(x, w_ptr, stat_ptr, stat_ld, stat_rs, w_msg.data_ptr(), row_t.data_ptr(),
                                col_t.data_ptr(), address(frame, 0, run.start), frame.stride(0), row_sum.data_ptr(),
                                col_sum.data_ptr(), rows, run.cols, run.rows, torch.get_num_threads()))
    acc_row, acc_col = (acc_dst, acc_src) if run.row_end == "dst" else (acc_src, acc_dst)
    run.add_to_rows_(acc_row, row_sum)
    acc_col.index_add_(1, run.col_nodes, col_sum)


def _fused_readout(kernels, lopt, frame: Tensor, de: int, run: DenseRun, w_out: Tensor, node_terms: _NodeTerms,
                   head_w: Tensor, head_b: Tensor, nominal: float, update: Tensor) -> None:
    row_t, col_t = node_terms.tables(run)
    w = w_out[run.tensor].contiguous()
    head_w = head_w.contiguous()
    check(kernels.l2o_gmn_readout(address(frame, 0, run.start), frame.stride(0),
                                  w.data_ptr(), row_t.data_ptr(), col_t.data_ptr(), head_w.data_ptr(),
                                  float(head_b[0, 0]), float(head_b[1, 0]), nominal, float(lopt.max_log_step),
                                  address(update, run.start), run.groups * run.rows, run.cols, run.rows,
                                  torch.get_num_threads()))


def gmn_frame(lopt, graph: ParamGraph, device: torch.device) -> tuple[ChunkPlan, Tensor]:
    """The plan and persistent frame of :func:`gmn_step`: rows ``[0, edge_dim)``
    edge states (edge columns only), then the raw features."""
    plan = chunk_plan(graph)
    return plan, feature_frame(plan, lopt.edge_dim, device)


@torch.no_grad()
def gmn_step(lopt, graph: ParamGraph, params: Tensor, grad: Tensor,
             state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    dev = params.device
    plan, frame = gmn_frame(lopt, graph, dev)
    de, n_nodes, n_edges = lopt.edge_dim, graph.num_nodes, plan.num_edges
    kernels = lopt.kernels(dev)
    inv_rms = update_statistics_(plan, params, grad, state, frame[de:], kernels)
    t = F_.time_features(state["step"])
    update = plan.scratch("update", 1, plan.num_params, dev)[0]  # valid until the next step

    x_entry = (frame[de:, n_edges:].t() * inv_rms.index_select(0, graph.tensor_id[n_edges:]))  # [M, F]
    h = lopt.encode_nodes(graph, x_entry, t)
    w_enc = fold_input_scale(lopt.edge_feat.weight, inv_rms)                  # [T, De, F]
    static = _StaticEdgeTerms(lopt, graph, lopt.edge_feat.bias + lopt.edge_time(t))
    deg_src = edge_degree(graph, "src").clamp(min=1).unsqueeze(1)
    deg_dst = edge_degree(graph, "dst").clamp(min=1).unsqueeze(1)

    fused = [whole is not None and kernels is not None for whole, _ in plan.blocks]
    torch_runs = [run for use, (_, runs) in zip(fused, plan.blocks) if not use for run in runs]
    fused_blocks = [whole for use, (whole, _) in zip(fused, plan.blocks) if use]

    for layer, conv in enumerate(lopt.convs):
        node_terms = _NodeTerms(conv.src_lin(h), conv.dst_lin(h), conv.edge_lin.bias)
        acc_src, acc_dst = h.new_zeros(de, n_nodes), h.new_zeros(de, n_nodes)
        for run in fused_blocks:
            _fused_round(kernels, frame, de, run, layer, w_enc, static, conv.edge_lin.weight, node_terms,
                         acc_src, acc_dst)
        for run in torch_runs:
            s, e = run.start, run.stop
            state_e = frame[:de, s:e]
            if layer == 0:  # encode the edges of this run
                enc = static.linear(plan.scratch("e", de, e - s, dev), w_enc[run.tensor], frame[de:, s:e], run)
                enc.relu_()
            else:
                enc = state_e
            m = node_terms.linear(plan.scratch("m", de, e - s, dev), conv.edge_lin.weight, enc, run).relu_()
            _sum_to_ends_(m, run, acc_src, acc_dst)
            if layer == 0:
                torch.add(enc, m, out=state_e)
            else:
                state_e += m
        h = conv.update((acc_dst.t() / deg_dst, acc_src.t() / deg_src), h)

    # read out: one product over [e; x], with the normalisation folded into B
    w_out = torch.cat([lopt.edge_out_e.weight.expand(graph.num_tensors, -1, -1),
                       fold_input_scale(lopt.edge_out_x.weight, inv_rms)], dim=2)   # [T, H, De + F]
    node_terms = _NodeTerms(lopt.edge_out_src(h), lopt.edge_out_dst(h),
                            lopt.edge_out_e.bias + lopt.edge_out_time(t))
    head_w, head_b = lopt.folded_head(lopt.edge_head)
    nominal = lopt.nominal_weight()
    for run in fused_blocks:
        _fused_readout(kernels, lopt, frame, de, run, w_out, node_terms, head_w, head_b, nominal, update)
    for run in torch_runs:
        s, e = run.start, run.stop
        z = node_terms.linear(plan.scratch("z", lopt.hidden, e - s, dev), w_out[run.tensor], frame[:, s:e], run)
        z.relu_()
        out = torch.addmm(head_b, head_w, z, out=plan.scratch("out", 2, e - s, dev))
        lopt.finish_update_(update[s:e], out[0], out[1], adam_row(frame[de:, s:e]))

    if x_entry.shape[0]:
        out = lopt.readout_entries(graph, x_entry, h, t, folded=True)
        lopt.finish_update_(update[n_edges:], out[:, 0].contiguous(), out[:, 1].contiguous(),
                            adam_row(frame[de:, n_edges:]))
    return update, state
