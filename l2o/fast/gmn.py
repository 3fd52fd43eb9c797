"""Chunked no-grad step of the graph metanetwork (:class:`l2o.GMNLOpt`).

The same function as ``GMNLOpt.forward``, reorganised into passes over the
edge runs of a :class:`~l2o.fast.plan.ChunkPlan`, feature-major
(``[width, run length]``) so the tiny matrix products stream over long rows:

1. the per-tensor feature sums (:func:`~l2o.fast.features.tensor_sums`);
2. encode the edges and send the first round of messages: per run
   ``e_0 = σ(W_f' x + static)``, ``m_1 = σ(W_1 e_0 + S h[src] + D h[dst] + b)``,
   summed onto both end nodes, ``e_1 = e_0 + m_1`` in the first ``edge_dim``
   rows of the run's ``[e; x]`` block;
3. one pass per further round;
4. read out: ``z = σ([A | B'] [e; x] + ...)``, ``(d, s) = H z`` and the
   update, handed to the sink run by run; the new statistics are written
   back in this pass.

Every pass recomputes a run's features ``x`` from the parameters, gradient and
statistics before the step (:func:`~l2o.fast.features.entry_features_`), and
its edge states of the earlier rounds either from ``x`` (graphs above
``STORE_EDGE_STATES_MAX_PARAMS``) or from a kept ``[edge_dim, E]`` buffer, so
the step's working set is run-sized.

Node updates between passes are the small ``GMNConv.update`` on all nodes.
On a dense block (:mod:`l2o.graph.blocks`) a run is ``[groups, rows, cols]``:
node terms broadcast along rows and columns and sums reduce along them, so
no per-edge gather or scatter happens; other edges use plain index ops.
With the fused kernels (:mod:`.native`) passes 2-4 take each dense run
whole in C (:func:`_fused_round`, :func:`_fused_readout`), fed the same
row and column tables; scatter edges keep the torch runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..graph.blocks import edge_degree, entry_count
from ..graph.param_graph import ParamGraph
from .lean import entry_slice
from .native import address, check
from .features import (Entries, Shard, Sink, adam_row, entry_features_, flat_sink, fold_input_scale, inverse_rms,
                       relative_scale, run_frame, step_constants, tensor_sums)
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

    def _slices(self, run) -> tuple[Tensor, Tensor]:
        return (entry_slice(self.graph, "edge_kind", run.start, run.stop),
                entry_slice(self.graph, "edge_pos", run.start, run.stop))

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
            term = self._compute(*self._slices(run)).contiguous()
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
            out.copy_(self._compute(*self._slices(run)))
        else:
            key = id(run.static_cols[0])
            if key not in self._cache:
                self._cache[key] = self._compute(*run.static_cols)
            d = out.shape[0]
            out.view(d, run.groups * run.rows, run.cols).copy_(self._cache[key].unsqueeze(1))
        return out.addmm_(weight, inp)


def _fused_round(kernels, fr: Tensor, de: int, run: DenseRun, encode: bool, w_enc: Tensor,
                 static: _StaticEdgeTerms, w_msg: Tensor, node_terms: _NodeTerms,
                 acc_src: Tensor | None, acc_dst: Tensor | None) -> None:
    """One message-passing round over one dense run in C (the loop body of
    :func:`gmn_run_step`, fused); ``fr`` is the run's ``[e; x]`` block.
    ``acc_*`` None: the messages are only needed for the edge states."""
    rows, n_cols = run.groups * run.rows, run.groups * run.cols
    row_t, col_t = node_terms.tables(run)
    if acc_src is None:  # discarded
        row_sum, col_sum = fr.new_empty(de, rows), fr.new_empty(de, n_cols)
    else:
        row_sum, col_sum = fr.new_zeros(de, rows), fr.new_zeros(de, n_cols)
    if encode:
        stat, stat_ld, stat_rs = static.table(run)
        w = w_enc[run.tensor].contiguous()
        x, w_ptr, stat_ptr = address(fr, de, 0), w.data_ptr(), stat.data_ptr()
    else:
        x = w_ptr = stat_ptr = None
        stat_ld = stat_rs = 0
    check(kernels.l2o_gmn_round(x, w_ptr, stat_ptr, stat_ld, stat_rs, w_msg.data_ptr(), row_t.data_ptr(),
                                col_t.data_ptr(), fr.data_ptr(), fr.stride(0), row_sum.data_ptr(),
                                col_sum.data_ptr(), rows, run.cols, run.rows, torch.get_num_threads()))
    if acc_src is not None:
        acc_row, acc_col = (acc_dst, acc_src) if run.row_end == "dst" else (acc_src, acc_dst)
        run.add_to_rows_(acc_row, row_sum)
        acc_col.index_add_(1, run.col_nodes, col_sum)


def _fused_readout(kernels, lopt, fr: Tensor, run: DenseRun, w_out: Tensor, node_terms: _NodeTerms,
                   head_w: Tensor, head_b: Tensor, nominal: float, update: Tensor) -> None:
    row_t, col_t = node_terms.tables(run)
    w = w_out[run.tensor].contiguous()
    check(kernels.l2o_gmn_readout(fr.data_ptr(), fr.stride(0), w.data_ptr(), row_t.data_ptr(), col_t.data_ptr(),
                                  head_w.data_ptr(), float(head_b[0, 0]), float(head_b[1, 0]), nominal,
                                  float(lopt.max_log_step), update.data_ptr(), run.groups * run.rows, run.cols,
                                  run.rows, torch.get_num_threads()))


def gmn_plan(graph: ParamGraph) -> ChunkPlan:
    return chunk_plan(graph)


def gmn_frame(lopt, graph: ParamGraph, device: torch.device) -> tuple[ChunkPlan, Tensor]:
    """The plan and a run-sized ``[edge_dim + F, max_run]`` frame of
    :func:`gmn_run_step` (the step keeps no model-sized frame)."""
    plan = gmn_plan(graph)
    return plan, run_frame(plan, lopt.edge_dim, plan.max_run, device)


# Keep the edge states [edge_dim, E] between passes (32 bytes per edge at
# width 8) on graphs up to this many parameters; above, every pass recomputes
# a run's edge states from its features (about 1.6x the no-grad step's time,
# and the step's memory no longer grows with the edge width). bench/memory.py.
STORE_EDGE_STATES_MAX_PARAMS = 4_000_000


def _round_torch(plan: ChunkPlan, fr: Tensor, de: int, run, encode: bool, w_enc: Tensor, static: _StaticEdgeTerms,
                 w_msg: Tensor, node_terms: _NodeTerms, acc_src: Tensor | None, acc_dst: Tensor | None) -> None:
    """The torch form of :func:`_fused_round` (scatter runs, or no kernels)."""
    dev, length = fr.device, fr.shape[1]
    state_e = fr[:de]
    if encode:
        enc = static.linear(plan.scratch("e", de, length, dev), w_enc[run.tensor], fr[de:], run).relu_()
    else:
        enc = state_e
    m = node_terms.linear(plan.scratch("m", de, length, dev), w_msg, enc, run).relu_()
    if acc_src is not None:
        _sum_to_ends_(m, run, acc_src, acc_dst)
    if encode:
        torch.add(enc, m, out=state_e)
    else:
        state_e += m


@torch.no_grad()
def gmn_run_step(lopt, graph: ParamGraph, params: list[Tensor], grads: list[Tensor | None],
                 state: dict[str, Tensor], sink: Sink, write: list[bool] | None = None,
                 store_edge_states: bool | None = None, shard: Shard | None = None) -> dict[str, Tensor]:
    """One step (``LearnedOptimizer.step_entries``): advances ``state`` in
    place (the tensors ``write`` allows) and hands each run's update of those tensors to
    ``sink(k, start, stop, update)`` (relative scale included), edge runs in
    flat order and then the node-held tensors.

    Passes: the feature sums; then one per message-passing round and one for
    the read-out, each recomputing a run's features (and, unless the edge
    states are stored, its earlier rounds' edge states) in a run-sized block.

    ``shard``: this rank's entries ``[lo, hi)`` (whole edge runs; ``state``
    holds theirs only): the rank processes those edges and entries, and the
    per-tensor sums, node-held features and node aggregates -- all the
    cross-entry information, sized by tensors and nodes -- are summed over
    the ranks, so every rank computes the node states of the whole graph."""
    plan = gmn_plan(graph)
    entries = Entries(plan, params, grads, write, shard)
    dev = state["m"].device
    de, n_nodes, n_edges, n = lopt.edge_dim, graph.num_nodes, plan.num_edges, plan.num_params
    if store_edge_states is None:
        store_edge_states = n <= STORE_EDGE_STATES_MAX_PARAMS and shard is None
    store_edge_states = store_edge_states and shard is None
    kernels = lopt.kernels(dev)
    consts = step_constants(state, plan)
    sums = tensor_sums(plan, entries, state, consts, kernels)
    inv_rms, scale = inverse_rms(plan, sums), relative_scale(lopt, plan, sums)
    t = F_.time_features(state["step"])

    # node-held entries (biases, norms, fallback tensors), run by run: their
    # encoder terms summed onto the nodes holding them (GMNLOpt.encode_nodes)
    node_runs = [(r.tensor, *(shard.clip(r.start, r.stop) if shard is not None else (r.start, r.stop)))
                 for r in plan.stat_runs if r.start >= n_edges]
    node_runs = [(k, s, e) for k, s, e in node_runs if e > s]   # (tensor, start, stop), this rank's

    def node_features(k: int, s: int, e: int, write_back: bool = False) -> tuple[Tensor, Tensor]:
        """Raw ``[F, L]`` and normalised ``[L, F]`` features of node-held entries ``[s, e)``."""
        x = entry_features_(plan, entries, state, consts, k, s, e, run_frame(plan, 0, e - s, dev), kernels,
                            write_back=write_back)
        return x, x.t() * inv_rms[k]

    def held_slice(name: str, s: int, e: int) -> Tensor:
        return entry_slice(graph, name, s - n_edges, e - n_edges)

    h = lopt.encode_nodes(graph, inv_rms.new_empty(0, F_.NUM_ENTRY_FEATURES), t)   # the node terms alone
    if n > n_edges:
        held = h.new_zeros(n_nodes, lopt.node_dim)
        for k, s, e in node_runs:
            _, x_entry = node_features(k, s, e)
            held.index_add_(0, held_slice("entry_node", s, e),
                            lopt.entry_in(x_entry) + lopt.entry_in_kind(held_slice("entry_kind", s, e)))
        if shard is not None:
            shard.all_reduce(held)
        h = h + held / entry_count(graph).clamp(min=1).unsqueeze(1).to(h.dtype)
    w_enc = fold_input_scale(lopt.edge_feat.weight, inv_rms)                  # [T, De, F]
    static = _StaticEdgeTerms(lopt, graph, lopt.edge_feat.bias + lopt.edge_time(t))
    deg_src = edge_degree(graph, "src").clamp(min=1).unsqueeze(1)
    deg_dst = edge_degree(graph, "dst").clamp(min=1).unsqueeze(1)
    edge_states = plan.fixed("edge_states", (de, n_edges), dev) if store_edge_states else None
    edge_runs = plan.edge_runs if shard is None else _owned_runs(plan, shard)
    use_kernel = [kernels is not None and isinstance(run, DenseRun) for run in edge_runs]
    w_msg = [conv.edge_lin.weight.contiguous() for conv in lopt.convs]

    def edge_states_of(run, fr: Tensor, upto: int, use: bool) -> None:
        """``fr[:de]`` = the run's edge states after ``upto`` rounds (recomputed
        or read), ``fr[de:]`` its features, for rounds ``upto``, ... to follow."""
        s, e = run.start, run.stop
        entry_features_(plan, entries, state, consts, run.tensor, s, e, fr[de:], kernels,
                        write_back=upto == len(lopt.convs))
        if upto == 0:
            return
        if edge_states is not None:
            fr[:de].copy_(edge_states[:, s:e])
            return
        for layer in range(upto):
            args = (fr, de, run, layer == 0, w_enc, static, w_msg[layer], node_terms[layer], None, None)
            _fused_round(kernels, *args) if use else _round_torch(plan, *args)

    node_terms: list[_NodeTerms] = []
    for layer, conv in enumerate(lopt.convs):
        node_terms.append(_NodeTerms(conv.src_lin(h), conv.dst_lin(h), conv.edge_lin.bias))
        acc_src, acc_dst = h.new_zeros(de, n_nodes), h.new_zeros(de, n_nodes)
        for run, use in zip(edge_runs, use_kernel):
            fr = run_frame(plan, de, run.stop - run.start, dev)
            edge_states_of(run, fr, layer, use)
            args = (fr, de, run, layer == 0, w_enc, static, w_msg[layer], node_terms[layer], acc_src, acc_dst)
            _fused_round(kernels, *args) if use else _round_torch(plan, *args)
            if edge_states is not None:
                edge_states[:, run.start:run.stop].copy_(fr[:de])
        if shard is not None:
            shard.all_reduce(acc_src)
            shard.all_reduce(acc_dst)
        h = conv.update((acc_dst.t() / deg_dst, acc_src.t() / deg_src), h)

    # read out: one product over [e; x], with the normalisation folded into B
    w_out = torch.cat([lopt.edge_out_e.weight.expand(graph.num_tensors, -1, -1),
                       fold_input_scale(lopt.edge_out_x.weight, inv_rms)], dim=2)   # [T, H, De + F]
    readout_terms = _NodeTerms(lopt.edge_out_src(h), lopt.edge_out_dst(h),
                               lopt.edge_out_e.bias + lopt.edge_out_time(t))
    head_w, head_b = lopt.folded_head(lopt.edge_head)
    head_w = head_w.contiguous()
    nominal = lopt.nominal_weight()
    for run, use in zip(edge_runs, use_kernel):
        s, e = run.start, run.stop
        if not entries.write[run.tensor]:
            continue
        fr = run_frame(plan, de, e - s, dev)
        edge_states_of(run, fr, len(lopt.convs), use)
        update = plan.scratch("update", 1, e - s, dev)[0]
        if use:
            _fused_readout(kernels, lopt, fr, run, w_out, readout_terms, head_w, head_b, nominal, update)
        else:
            z = readout_terms.linear(plan.scratch("z", lopt.hidden, e - s, dev), w_out[run.tensor], fr, run)
            z.relu_()
            out = torch.addmm(head_b, head_w, z, out=plan.scratch("out", 2, e - s, dev))
            lopt.finish_update_(update, out[0], out[1], adam_row(fr[de:]))
        if scale is not None:
            update.mul_(scale[run.tensor])
        sink(run.tensor, s, e, update)

    if node_runs:  # GMNLOpt.readout_entries, run by run; the new statistics are written back here
        h_term, t_term = lopt.entry_out_h(h), lopt.entry_out_time(t)
        weight, bias = lopt.folded_head(lopt.entry_head)
        for k, s, e in node_runs:
            x, x_entry = node_features(k, s, e, write_back=True)
            if not entries.write[k]:
                continue
            z = (lopt.entry_out_x(x_entry) + h_term.index_select(0, held_slice("entry_node", s, e))
                 + lopt.entry_out_kind(held_slice("entry_kind", s, e)) + t_term).relu_()
            out = torch.addmm(bias.t(), z, weight.t())
            update = plan.scratch("update", 1, e - s, dev)[0]
            lopt.finish_update_(update, out[:, 0].contiguous(), out[:, 1].contiguous(), adam_row(x))
            if scale is not None:
                update.mul_(scale[k])
            sink(k, s, e, update)
    return state


def _owned_runs(plan: ChunkPlan, shard: Shard) -> list:
    """The edge runs inside ``[shard.lo, shard.hi)`` (a shard's edge bounds must fall on run bounds)."""
    runs = []
    for run in plan.edge_runs:
        if run.start >= shard.lo and run.stop <= shard.hi:
            runs.append(run)
        elif run.start < shard.hi and run.stop > shard.lo:
            raise ValueError(f"shard [{shard.lo}, {shard.hi}) cuts the edge run [{run.start}, {run.stop})")
    return runs


def shard_bounds(graph: ParamGraph, world: int) -> list[int]:
    """``world + 1`` flat positions splitting the entries into ``world`` nearly
    equal ranges whose bounds fall on edge runs' bounds (any position among
    the node-held entries)."""
    plan = gmn_plan(graph)
    cuts = sorted({0, plan.num_edges, *(r.start for r in plan.edge_runs)}) + list(
        range(plan.num_edges, plan.num_params + 1))
    cuts = sorted(set(cuts))
    bounds = [0]
    for r in range(1, world):
        target = plan.num_params * r // world
        bounds.append(max(bounds[-1], cuts[_nearest(cuts, target)]))
    bounds.append(plan.num_params)
    return bounds


def _nearest(sorted_values: list[int], target: int) -> int:
    import bisect
    i = bisect.bisect_left(sorted_values, target)
    if i == len(sorted_values) or (i > 0 and target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i


@torch.no_grad()
def gmn_step(lopt, graph: ParamGraph, params: Tensor, grad: Tensor,
             state: dict[str, Tensor], store_edge_states: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The flat form (``LearnedOptimizer.step_no_grad``): returns the update
    ``[n]`` (relative scale included) and ``state``, advanced in place."""
    update = torch.empty(graph.num_params, device=params.device)
    split = graph.numels
    state = gmn_run_step(lopt, graph, list(params.split(split)), list(grad.split(split)), state, flat_sink(update),
                         store_edge_states=store_edge_states)
    return update, state


gmn_step.run_step = gmn_run_step  # LearnedOptimizer.step_entries finds the per-tensor form here
