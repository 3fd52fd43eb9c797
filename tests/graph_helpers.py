"""Helpers shared by the graph tests: where a tensor sits in a ParamGraph, a
randomly initialised GMN's update (for permutation-equivariance checks), and a
graph's structure up to node numbering (to compare two ways to one graph),
and an uncached build with the ops it did not follow."""
from __future__ import annotations

import warnings

import torch

import l2o
from l2o.graph import build_graph
from lopt_helpers import seeded_weights


def build(model, *inputs, strict=True):
    """The eager graph, uncached; a non-strict build's "no graph structure" warning is expected."""
    with warnings.catch_warnings():
        if not strict:
            warnings.simplefilter("ignore")
        return build_graph(model, inputs, strict=strict, use_cache=False)


def not_followed(g):
    """The build's notes of ops the capture could not follow."""
    return [n for n in g.notes if n.startswith("op not followed")]


def _where(g, name):
    """(parameter index, flat tensor index, its flat slice) of parameter ``name``."""
    i = g.param_names.index(name)
    k = g.flat_order.index(i)
    return i, k, g.tensor_slices[k]


def part(g, name):
    """(src, dst) of an edge-held tensor shaped like it, or entry nodes of a node-held one."""
    i, k, s = _where(g, name)
    shape = g.param_shapes[i]
    if k < g.num_edge_params:
        return g.edge_index[0, s].view(shape), g.edge_index[1, s].view(shape)
    return g.entry_node[s.start - g.num_edges:s.stop - g.num_edges].view(shape)


def kinds(g, name):
    """The edge kinds of an edge-held tensor's entries, or the entry kinds of a node-held one."""
    _, k, s = _where(g, name)
    if k < g.num_edge_params:
        return g.edge_kind[s]
    return g.entry_kind[s.start - g.num_edges:s.stop - g.num_edges]


def random_gmn_update(model, loss) -> dict:
    """Parameter name -> the update of a GMN with random weights (scale 0.3, seed 0)
    for ``loss(model)``, the model's graph built afresh.

    Gradients that are zero in exact arithmetic (a key bias: shifting every score
    of a query leaves the softmax unchanged) are rounding noise in floats, which
    the Adam-normalised features blow up to +-1 in an order that depends on the
    summation order: they are made exactly zero."""
    g = build_graph(model, use_cache=False)
    model.zero_grad()
    loss(model).backward()
    named = dict(model.named_parameters())
    grads = [named[n].grad.detach().clone() for n in g.param_names]
    tiny = 1e-6 * max(float(gr.abs().max()) for gr in grads)
    for gr in grads:
        gr[gr.abs() < tiny] = 0.0
    flat, grad = g.gather([named[n].detach() for n in g.param_names]), g.gather(grads)
    lopt = seeded_weights(l2o.GMNLOpt())
    with torch.no_grad():
        upd, _ = lopt(g, flat, grad, lopt.init_state(flat))
    return dict(zip(g.param_names, g.scatter(upd)))


def canonical(g):
    """Per parameter: its entries' nodes relabelled by first appearance, and kinds;
    then each node's type and depth, in that order."""
    ids: dict[int, int] = {}

    def label(t):
        return [ids.setdefault(int(v), len(ids)) for v in t.tolist()]
    out = []
    for i, name in enumerate(g.param_names):
        k = g.flat_order.index(i)
        s = g.tensor_slices[k]
        if k < g.num_edge_params:
            out.append((name, label(g.edge_index[0, s]), label(g.edge_index[1, s]), g.edge_kind[s].tolist()))
        else:
            e = slice(s.start - g.num_edges, s.stop - g.num_edges)
            out.append((name, label(g.entry_node[e]), g.entry_kind[e].tolist()))
    nodes = sorted(ids, key=ids.get)
    return out, g.node_type[nodes].tolist(), [round(float(d), 5) for d in g.node_depth[nodes]]
