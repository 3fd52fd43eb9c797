"""Chunked no-grad step of the graph metanetwork (:class:`l2o.GMNLOpt`).

The same function as ``GMNLOpt.forward``, reorganised into passes over the
edge runs of a :class:`~l2o.fast.plan.ChunkPlan`, feature-major
(``[width, run length]``) so the tiny matrix products stream over long rows:

1. the per-tensor feature sums (:func:`~l2o.fast.features.tensor_sums`) and
   the node encoder (:meth:`GMNChunkedStep.encode_nodes`);
2. one pass per message-passing round (:meth:`GMNChunkedStep.message_passing`):
   per run ``e_0 = σ(W_f' x + static)`` (first round),
   ``m = σ(W e + S h[src] + D h[dst] + b)``, summed onto both end nodes,
   ``e <- e + m`` in the first ``edge_dim`` rows of the run's ``[e; x]``
   block; then ``GMNConv.update`` on all nodes;
3. the read-out (:meth:`GMNChunkedStep.readout_edges`, ``readout_nodes``):
   ``z = σ([A | B'] [e; x] + ...)``, ``(d', s') = H' z`` through the folded
   head and the update formula (:mod:`l2o.update_rule`), handed to the sink
   run by run (or, where the sink offers it, applied to the parameters by the
   fused pass itself: :class:`~l2o.fast.features.DirectApply`); the new
   statistics are written back in this pass.

Every pass recomputes a run's features ``x`` from the parameters, gradient and
statistics before the step (:func:`~l2o.fast.features.entry_features_`), and
its edge states of the earlier rounds either from ``x`` or from a kept
buffer of ``edge_dim x E`` entries (``edge_states``: :data:`EDGE_STATES`), so without
kept states the step's working set is run-sized. With the fused kernels each pass over a
dense run is one C call (:meth:`GMNChunkedStep.fused_pass`, ``l2o_gmn_pass``
in ``kernels.c``) that keeps every intermediate of a tile of edges --
features, edge states, messages, read-out -- in registers and small buffers,
reading the statistics and writing only the node sums or the update; it is
fed the same row and column tables (:mod:`.gmn_terms`). Scatter runs keep
torch ops and ``[e; x]`` blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import features as F_
from ..gmn import GMNLOpt
from ..graph.blocks import edge_degree, entry_count
from ..graph.param_graph import ParamGraph
from ..update_rule import finish_folded_, fold_head
from .controller import controlled_sink
from .features import (Entries, Sink, adam_row, direct_target, entry_features_, fold_input_scale, inverse_rms,
                       relative_scale, run_frame, run_state, step_constants, tensor_sums)
from .gmn_terms import NodeTerms, StaticEdgeTerms, sum_to_ends_
from .kernel_calls import MAX_ROUNDS, FusedKernels
from .lean import entry_slice
from .plan import ChunkPlan, DenseRun
from .shard import Shard, owned_runs

# Where the edge states (edge_dim x E) live between passes: "recompute" (every
# pass recomputes a run's edge states from its features: the step's memory
# does not grow with the edge width), "float32" (kept: 32 bytes per edge at
# width 8; the step of recomputing to float rounding), "float16" (kept as half floats:
# 16 bytes per edge and less traffic, each state rounded to ~3 significant
# digits and saturated at +-65504), "auto" ("float32" on graphs up to
# STORE_EDGE_STATES_MAX_PARAMS parameters, "recompute" above; a sharded step
# keeps its own edges' only). Times and memory: bench/gpt2_step.py, bench/memory.py.
EDGE_STATES = ("auto", "recompute", "float32", "float16")
STORE_EDGE_STATES_MAX_PARAMS = 4_000_000
HALF_MAX = torch.finfo(torch.float16).max


def check_edge_states(edge_states: str) -> str:
    if edge_states not in EDGE_STATES:
        raise ValueError(f"edge_states must be one of {EDGE_STATES}, got {edge_states!r}")
    return edge_states


def kernel_widths(lopt: GMNLOpt) -> dict[str, int]:
    """The widths of the fused kernels this metanetwork needs (:func:`.kernel_calls.load`)."""
    return {"de": lopt.edge_dim, "hid": lopt.hidden}


class GMNChunkedStep:
    """One step over one plan; :func:`run_step` runs its passes in order."""

    def __init__(self, lopt: GMNLOpt, plan: ChunkPlan, graph: ParamGraph, entries: Entries,
                 state: dict[str, Tensor], kernels: FusedKernels | None, edge_states: str = "auto"):
        shard = entries.shard
        self.lopt, self.plan, self.graph, self.entries, self.state, self.kernels = (
            lopt, plan, graph, entries, state, kernels)
        self.dev, self.de, self.n_edges = state["m"].device, lopt.edge_dim, plan.num_edges
        self.consts = step_constants(state, plan)
        sums, self.controller_sums = tensor_sums(plan, entries, state, self.consts, kernels,
                                                 lopt.adapt_momentum_index if lopt.adapt else None)
        self.inv_rms, self.scale = inverse_rms(plan, sums), relative_scale(lopt, plan, sums)
        self.t = F_.time_features(state["step"])
        runs = [(r.tensor, *(shard.clip(r.tensor, r.start, r.stop) if shard is not None else (r.start, r.stop)))
                for r in plan.stat_runs if r.start >= plan.num_edges]
        # this rank's (tensor, start, stop) runs of node-held entries, in groups of consecutive runs
        self.node_groups = held_groups([(k, s, e) for k, s, e in runs if e > s], plan.chunk)
        self.edge_runs = plan.edge_runs if shard is None else owned_runs(plan, shard)
        self.fusable = kernels is not None and len(lopt.convs) <= MAX_ROUNDS
        self.fused = [self.is_fused(run) for run in self.edge_runs]
        if check_edge_states(edge_states) == "auto":
            edge_states = "float32" if plan.num_params <= STORE_EDGE_STATES_MAX_PARAMS else "recompute"
        if edge_states == "float16" and any(self.fused) and not kernels.half_states:
            raise ValueError("edge_states='float16': this machine's build of the fused kernels has no half "
                             "floats (l2o.fast.native.status()); use 'float32' or 'recompute'")
        # flat: run r's states are entries [De start_r, De stop_r), as [De, L] for the torch
        # ops and in the fused kernels' own order for a fused run
        # a shard keeps its own edges' states: its edge tensors' spans, first in its statistics' order
        owned_edges = plan.num_edges if shard is None else sum(
            hi - lo for (lo, hi), t in zip(shard.spans, plan.tensor_slices) if t.stop <= plan.num_edges)
        self.edge_states = (None if edge_states == "recompute" else
                            plan.fixed("edge_states", (self.de * owned_edges,), self.dev, getattr(torch, edge_states)))
        self.w_enc = fold_input_scale(lopt.edge_feat.weight, self.inv_rms)                  # [T, De, F]
        self.static = StaticEdgeTerms(lopt, graph, lopt.edge_feat.bias + lopt.edge_time(self.t))
        self.w_msg = [conv.edge_lin.weight.contiguous() for conv in lopt.convs]
        self.node_terms: list[NodeTerms] = []

    # ------------------------------------------------------------ node-held
    def held_features(self, group: list[tuple[int, int, int]], write_back: bool = False) -> tuple[Tensor, Tensor]:
        """Raw ``[F, L]`` and normalised ``[L, F]`` features of a group of
        consecutive node-held runs (``L`` entries in all)."""
        s0, e0 = group[0][1], group[-1][2]
        x = run_frame(self.plan, 0, e0 - s0, self.dev)
        for k, s, e in group:   # per run: each tensor has its own bias correction
            entry_features_(self.plan, self.entries, self.state, self.consts, k, s, e, x[:, s - s0:e - s0],
                            self.kernels, write_back=write_back)
        tensor = torch.tensor([k for k, _, _ in group]).repeat_interleave(torch.tensor([e - s for _, s, e in group]))
        return x, x.t() * self.inv_rms.index_select(0, tensor.to(self.dev))

    def held_slice(self, name: str, s: int, e: int) -> Tensor:
        return entry_slice(self.graph, name, s - self.n_edges, e - self.n_edges)

    def encode_nodes(self) -> Tensor:
        """``GMNLOpt.encode_nodes``: the node terms, plus the encoder terms of
        the node-held entries (biases, norms, fallback tensors) group by group."""
        lopt, graph = self.lopt, self.graph
        h = lopt.encode_nodes(graph, self.inv_rms.new_empty(0, F_.NUM_ENTRY_FEATURES), self.t)  # node terms alone
        if self.plan.num_params == self.n_edges:
            return h
        held = h.new_zeros(graph.num_nodes, lopt.node_dim)
        for group in self.node_groups:
            s, e = group[0][1], group[-1][2]
            _, x_entry = self.held_features(group)
            held.index_add_(0, self.held_slice("entry_node", s, e),
                            lopt.entry_in(x_entry) + lopt.entry_in_kind(self.held_slice("entry_kind", s, e)))
        if self.entries.shard is not None:
            self.entries.shard.all_reduce(held)
        return h + held / entry_count(graph).clamp(min=1).unsqueeze(1).to(h.dtype)

    # ------------------------------------------------------- fused runs
    def kept(self, run) -> Tensor | None:
        """The run's kept edge states (a view: ``[De, L]``, flat on a fused
        run), or None when recomputed."""
        if self.edge_states is None:
            return None
        at = self.entries.state_index(run.tensor, run.start)
        kept = self.edge_states[self.de * at:self.de * (at + run.stop - run.start)]
        return kept if self.is_fused(run) else kept.view(self.de, -1)

    def is_fused(self, run) -> bool:
        """Whether the run's passes are fused kernel calls (dense runs), else torch ops."""
        return self.fusable and isinstance(run, DenseRun)

    def fused_pass(self, run: DenseRun, rounds: int, write_back: bool = False, **out) -> int:
        """``rounds`` rounds over a dense run in one kernel call
        (:meth:`FusedKernels.gmn_pass`), features and edge states kept in
        registers; ``out``: its ``sums`` or ``readout`` (and ``apply``)."""
        kept = self.kept(run)
        # kept states: read after every round but a round pass's own
        first = 0 if kept is None else rounds if "readout" in out else rounds - 1
        layers = [(self.w_msg[layer], *self.node_terms[layer].tables(run)) if layer >= first else None
                  for layer in range(rounds)]
        return self.kernels.gmn_pass(
            run_state(self.entries, self.state, self.consts, run.tensor, run.start, run.stop, self.dev, write_back,
                      for_kernels=True),
            run.groups * run.rows, run.cols, run.rows, (self.w_enc[run.tensor], *self.static.table(run)), layers,
            first, kept, **out)

    def fused_round(self, run: DenseRun, layer: int, acc: tuple[Tensor, Tensor]) -> None:
        row_sum = acc[0].new_zeros(self.de, run.groups * run.rows)
        col_sum = acc[0].new_zeros(self.de, run.groups * run.cols)
        self.fused_pass(run, layer + 1, sums=(row_sum, col_sum))
        acc_row, acc_col = (acc[1], acc[0]) if run.row_end == "dst" else acc
        run.add_to_rows_(acc_row, row_sum)
        acc_col.index_add_(1, run.col_nodes, col_sum)

    # ------------------------------------------------------------- rounds
    def round_(self, run, fr: Tensor, layer: int, acc: tuple[Tensor, Tensor] | None) -> None:
        """Round ``layer`` over one run (torch ops) whose ``[e; x]`` block is
        ``fr``; the messages are summed onto ``acc`` (src, dst) unless it is None."""
        de, terms, encode = self.de, self.node_terms[layer], layer == 0
        length, state_e = fr.shape[1], fr[:de]
        scratch = self.plan.scratch
        enc = (self.static.linear(scratch("e", de, length, self.dev), self.w_enc[run.tensor], fr[de:], run).relu_()
               if encode else state_e)
        m = terms.linear(scratch("m", de, length, self.dev), self.w_msg[layer], enc, run).relu_()
        if acc is not None:
            sum_to_ends_(m, run, *acc)
        if encode:
            torch.add(enc, m, out=state_e)
        else:
            state_e += m

    def edge_states_of(self, run, fr: Tensor, upto: int) -> None:
        """``fr[:de]`` = the run's edge states after ``upto`` rounds (recomputed
        or read), ``fr[de:]`` its features, for rounds ``upto``, ... to follow."""
        entry_features_(self.plan, self.entries, self.state, self.consts, run.tensor, run.start, run.stop,
                        fr[self.de:], self.kernels, write_back=upto == len(self.lopt.convs))
        if upto == 0:
            return
        kept = self.kept(run)
        if kept is not None:
            fr[:self.de].copy_(kept)
            return
        for layer in range(upto):
            self.round_(run, fr, layer, None)

    def message_passing(self, h: Tensor) -> Tensor:
        """Every round of ``GMNConv`` over the edge runs; returns the final node states."""
        graph, de, shard = self.graph, self.de, self.entries.shard
        deg_src = edge_degree(graph, "src").clamp(min=1).unsqueeze(1)
        deg_dst = edge_degree(graph, "dst").clamp(min=1).unsqueeze(1)
        for layer, conv in enumerate(self.lopt.convs):
            self.node_terms.append(NodeTerms(conv.src_lin(h), conv.dst_lin(h), conv.edge_lin.bias))
            acc = (h.new_zeros(de, graph.num_nodes), h.new_zeros(de, graph.num_nodes))
            for run, fused in zip(self.edge_runs, self.fused):
                if fused:
                    self.fused_round(run, layer, acc)
                    continue
                fr = run_frame(self.plan, de, run.stop - run.start, self.dev)
                self.edge_states_of(run, fr, layer)
                self.round_(run, fr, layer, acc)
                kept = self.kept(run)
                if kept is not None:   # saturated, as the fused pass stores half states
                    kept.copy_(fr[:de] if kept.dtype == fr.dtype else fr[:de].clamp(-HALF_MAX, HALF_MAX))
            if shard is not None:
                shard.all_reduce(acc[0])
                shard.all_reduce(acc[1])
            h = conv.update((acc[1].t() / deg_dst, acc[0].t() / deg_src), h)
        return h

    # ------------------------------------------------------------ read-out
    def readout_edges(self, h: Tensor, sink: Sink) -> None:
        """One product over ``[e; x]`` per run (the normalisation folded into
        ``B``), the folded head and the update formula, handed to ``sink``."""
        lopt, de, plan, dev = self.lopt, self.de, self.plan, self.dev
        w_out = torch.cat([lopt.edge_out_e.weight.expand(self.graph.num_tensors, -1, -1),
                           fold_input_scale(lopt.edge_out_x.weight, self.inv_rms)], dim=2)   # [T, H, De + F]
        terms = NodeTerms(lopt.edge_out_src(h), lopt.edge_out_dst(h), lopt.edge_out_e.bias + lopt.edge_out_time(self.t))
        head_w, head_b = fold_head(lopt.edge_head.weight, lopt.edge_head.bias, lopt.out_scale, lopt.max_log_step)
        head_w, nominal = head_w.contiguous(), lopt.nominal_weight()
        for run, fused in zip(self.edge_runs, self.fused):
            s, e, k = run.start, run.stop, run.tensor
            if not self.entries.write[k]:
                continue
            # the kernel applies the update itself where the sink says where (no update written and read back)
            target = direct_target(sink, k, s, e, 1.0 if self.scale is None else float(self.scale[k])) if fused else None
            update = None if target is not None else plan.scratch("update", 1, e - s, dev)[0]
            if fused:
                readout = (w_out[k], *terms.tables(run), head_w, head_b, nominal, float(lopt.max_log_step), update)
                if target is not None:
                    target.nonfinite(self.fused_pass(run, len(lopt.convs), write_back=True, readout=readout,
                                                     apply=(target.param, target.lr, target.decay)))
                    continue
                self.fused_pass(run, len(lopt.convs), write_back=True, readout=readout)
            else:
                fr = run_frame(plan, de, e - s, dev)
                self.edge_states_of(run, fr, len(lopt.convs))
                z = terms.linear(plan.scratch("z", lopt.hidden, e - s, dev), w_out[run.tensor], fr, run).relu_()
                out = torch.addmm(head_b, head_w, z, out=plan.scratch("out", 2, e - s, dev))
                finish_folded_(update, out[0], out[1], adam_row(fr[de:]), nominal, lopt.max_log_step)
            self.hand_over(k, s, e, update, sink)

    def readout_nodes(self, h: Tensor, sink: Sink) -> None:
        """``GMNLOpt.readout_entries`` group by group, through the folded head; the
        node-held entries' new statistics are written back here."""
        lopt = self.lopt
        h_term, t_term = lopt.entry_out_h(h), lopt.entry_out_time(self.t)
        weight, bias = fold_head(lopt.entry_head.weight, lopt.entry_head.bias, lopt.out_scale, lopt.max_log_step)
        for group in self.node_groups:
            s0, e0 = group[0][1], group[-1][2]
            x, x_entry = self.held_features(group, write_back=True)
            if not any(self.entries.write[k] for k, _, _ in group):
                continue
            z = (lopt.entry_out_x(x_entry) + h_term.index_select(0, self.held_slice("entry_node", s0, e0))
                 + lopt.entry_out_kind(self.held_slice("entry_kind", s0, e0)) + t_term).relu_()
            out = torch.addmm(bias.t(), z, weight.t())
            update = self.plan.scratch("update", 1, e0 - s0, self.dev)[0]
            finish_folded_(update, out[:, 0].contiguous(), out[:, 1].contiguous(), adam_row(x),
                           lopt.nominal_weight(), lopt.max_log_step)
            for k, s, e in group:
                if self.entries.write[k]:
                    self.hand_over(k, s, e, update[s - s0:e - s0], sink)

    def hand_over(self, k: int, s: int, e: int, update: Tensor, sink: Sink) -> None:
        if self.scale is not None:
            update.mul_(self.scale[k])
        sink(k, s, e, update)


def held_groups(runs: list[tuple[int, int, int]], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive ``(tensor, start, stop)`` runs gathered into groups of at
    most ``chunk`` entries (a longer run alone): the node-held entries --
    biases, norms, many small tensors -- then take one feature frame and one
    set of torch ops per group instead of per tensor."""
    groups: list[list[tuple[int, int, int]]] = []
    size = 0
    for run in runs:   # a group's runs are contiguous: one frame holds them (a shard's may leave gaps)
        if not groups or size + run[2] - run[1] > chunk or run[1] != groups[-1][-1][2]:
            groups.append([])
            size = 0
        groups[-1].append(run)
        size += run[2] - run[1]
    return groups


@torch.no_grad()
def run_step(lopt: GMNLOpt, plan: ChunkPlan, graph: ParamGraph, params: list[Tensor], grads: list[Tensor | None],
             state: dict[str, Tensor], sink: Sink, write: list[bool] | None = None,
             kernels: FusedKernels | None = None, shard: Shard | None = None,
             edge_states: str = "auto") -> dict[str, Tensor]:
    """One step (:meth:`l2o.fast.backend.ChunkedBackend.step_entries`):
    advances ``state`` in place (the tensors ``write`` allows) and hands each
    run's update of those tensors to ``sink(k, start, stop, update)``
    (relative scale included), edge runs in flat order, then the node-held tensors.

    ``shard``: this rank's entries (:class:`~l2o.fast.shard.Shard`: whole
    edge runs; ``state`` holds theirs only): the rank processes those edges and entries, and the
    per-tensor sums, node-held features and node aggregates -- all the
    cross-entry information, sized by tensors and nodes -- are summed over
    the ranks, so every rank computes the node states of the whole graph."""
    before = dict(state)   # the step below advances the clock: the controller reads the one the step began with
    step = GMNChunkedStep(lopt, plan, graph, Entries(plan, params, grads, write, shard), state, kernels,
                          edge_states)
    if lopt.adapt:
        sink = controlled_sink(lopt, before, state, step.controller_sums, sink, write)
    h = step.message_passing(step.encode_nodes())
    step.readout_edges(h, sink)
    step.readout_nodes(h, sink)
    return state
