"""Several parameter graphs as one: the disjoint union a metanetwork runs over in one pass.

Meta-training unrolls several small inner runs at once. One metanetwork pass
over the disjoint union of their graphs costs about what one pass over a
single small graph costs (both are dominated by per-operation overhead), so
batching the runs is how meta-training gets more inner steps per second.

Flat layout of the union: every run's edge-held entries (run by run), then
every run's node-held entries (run by run) -- the ParamGraph convention that
edges come first -- so :meth:`BatchedGraph.join` / :meth:`BatchedGraph.split`
are a ``cat`` and a gather. Node ids of run ``r`` are offset by the node
counts of the runs before it; nothing connects two runs, so message passing
never mixes them. ``edge_run`` / ``node_run`` / ``entry_run`` say which run
each element belongs to: the metanetworks read per-run time features through
them (the runs sit at different steps of training).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .param_graph import ParamGraph


@dataclass
class BatchedGraph(ParamGraph):
    num_runs: int = 1
    edge_run: Tensor | None = None      # [E] run of each edge
    node_run: Tensor | None = None      # [N] run of each node
    entry_run: Tensor | None = None     # [M] run of each node-held entry
    run_edges: tuple = ()               # (E_r) per run
    run_entries: tuple = ()             # (M_r) per run
    run_edge_tensors: tuple = ()        # edge-held tensors per run
    run_node_tensors: tuple = ()        # node-held tensors per run

    @classmethod
    def union(cls, graphs: list[ParamGraph]) -> "BatchedGraph":
        if not graphs:
            raise ValueError("union of no graphs")
        dev = graphs[0].device
        node_off = [0]
        for g in graphs:
            node_off.append(node_off[-1] + g.num_nodes)
        names, shapes, edge_order, node_order = [], [], [], []
        edge_tid, entry_tid = [], []
        n_edge_tensors = sum(g.num_edge_params for g in graphs)
        edge_t_off, node_t_off = 0, n_edge_tensors
        for g in graphs:
            base = len(names)
            names += g.param_names
            shapes += g.param_shapes
            edge_order += [base + i for i in g.flat_order[: g.num_edge_params]]
            node_order += [base + i for i in g.flat_order[g.num_edge_params:]]
            tid_e, tid_m = g.split_flat(g.tensor_id)
            edge_tid.append(tid_e + edge_t_off)
            # node-held tensors of g are numbered after its edge-held ones
            entry_tid.append(tid_m - g.num_edge_params + node_t_off)
            edge_t_off += g.num_edge_params
            node_t_off += g.num_tensors - g.num_edge_params

        def runs_of(counts: list[int]) -> Tensor:
            return torch.repeat_interleave(torch.arange(len(counts), device=dev),
                                           torch.tensor(counts, device=dev))

        return cls(
            num_nodes=node_off[-1],
            node_type=torch.cat([g.node_type for g in graphs]),
            node_io_index=torch.cat([g.node_io_index for g in graphs]),
            node_depth=torch.cat([g.node_depth for g in graphs]),
            edge_index=torch.cat([g.edge_index + o for g, o in zip(graphs, node_off)], dim=1),
            edge_kind=torch.cat([g.edge_kind for g in graphs]),
            edge_pos=torch.cat([g.edge_pos for g in graphs]),
            entry_node=torch.cat([g.entry_node + o for g, o in zip(graphs, node_off)]),
            entry_kind=torch.cat([g.entry_kind for g in graphs]),
            tensor_id=torch.cat(edge_tid + entry_tid),
            param_names=names, param_shapes=shapes, flat_order=edge_order + node_order,
            num_edge_params=n_edge_tensors,
            unstructured=[n for g in graphs for n in g.unstructured],
            num_runs=len(graphs),
            edge_run=runs_of([g.num_edges for g in graphs]),
            node_run=runs_of([g.num_nodes for g in graphs]),
            entry_run=runs_of([g.num_entries for g in graphs]),
            run_edges=tuple(g.num_edges for g in graphs),
            run_entries=tuple(g.num_entries for g in graphs),
            run_edge_tensors=tuple(g.num_edge_params for g in graphs),
            run_node_tensors=tuple(g.num_tensors - g.num_edge_params for g in graphs),
        )

    @property
    def flat_run(self) -> Tensor:
        """[E + M] run of each flat entry."""
        return torch.cat([self.edge_run, self.entry_run])

    def join(self, flats: list[Tensor], dim: int = 0) -> Tensor:
        """Per-run flat tensors (laid out by each run's own graph, along
        ``dim``) as one tensor laid out by the union."""
        edges = [f.narrow(dim, 0, e) for f, e in zip(flats, self.run_edges)]
        entries = [f.narrow(dim, e, m) for f, e, m in zip(flats, self.run_edges, self.run_entries)]
        return torch.cat(edges + entries, dim=dim)

    def split(self, flat: Tensor, dim: int = 0) -> list[Tensor]:
        """Inverse of :meth:`join`: one tensor per run, in its own graph's layout."""
        edges = flat.narrow(dim, 0, self.num_edges).split(list(self.run_edges), dim=dim)
        entries = flat.narrow(dim, self.num_edges, self.num_entries).split(list(self.run_entries), dim=dim)
        return [torch.cat([e, m], dim=dim) for e, m in zip(edges, entries)]


    def join_tensors(self, values: list[Tensor]) -> Tensor:
        """Per-run per-tensor vectors ``[T_r]`` (each run's tensor order) as one
        ``[T]`` in the union's tensor order (edge-held tensors of every run first)."""
        edges = [v[:e] for v, e in zip(values, self.run_edge_tensors)]
        nodes = [v[e:] for v, e in zip(values, self.run_edge_tensors)]
        return torch.cat(edges + nodes)

    def split_tensors(self, values: Tensor) -> list[Tensor]:
        """Inverse of :meth:`join_tensors`."""
        edge_total = sum(self.run_edge_tensors)
        edges = values[:edge_total].split(list(self.run_edge_tensors))
        nodes = values[edge_total:].split(list(self.run_node_tensors))
        return [torch.cat([e, m]) for e, m in zip(edges, nodes)]


def per_run(values: Tensor, index: Tensor | None) -> Tensor:
    """Rows of ``values`` for each element: ``values`` itself when it is one
    shared vector (``index`` None or ``values`` 1-D), else ``values[index]``."""
    if values.dim() == 1 or index is None:
        return values
    return values.index_select(0, index)


def run_index(graph: ParamGraph, part: str) -> Tensor | None:
    """The run of each edge / node / entry / flat entry (``part``) of a
    :class:`BatchedGraph`; None for a single graph, whose time features are
    one vector shared by every element."""
    if not isinstance(graph, BatchedGraph):
        return None
    return graph.flat_run if part == "flat" else getattr(graph, f"{part}_run")
